"""Downloads from Slack's file hosts: where the bot token may go, and an opener
that goes nowhere else.

`file_origins(settings)` is the set of (scheme, host, port) a download may
use; `file_opener(allowed)` speaks http(s) only and never carries the token
across origins on a redirect (`RefusedRedirect` for one it will not follow).
"""

from __future__ import annotations

import urllib.request
from typing import Any

from bot.config import Settings
from bot.errors import BotError

Origin = tuple[str, str, int]  # scheme, host, port


def origin(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL; None for any other scheme or a malformed URL."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def file_origins(settings: Settings) -> frozenset[Origin]:
    """Where the bot token may go for a download: https to each TUNEBOT_SLACK_FILE_HOSTS
    entry and to SLACK_API_URL's origin; plain http only where the host is loopback."""
    from urllib.parse import urlsplit

    origins: set[Origin] = set()
    api = origin(settings.slack_api_url)
    if api is not None and (api[0] == "https" or loopback(api[1])):
        origins.add(api)
    for entry in settings.slack_file_hosts:
        entry = entry.strip().lower()
        try:
            parts = urlsplit(entry if "://" in entry else f"//{entry}")
            port = parts.port
        except ValueError:
            continue
        if not parts.hostname:
            continue
        origins.add(("https", parts.hostname, port or 443))
        if loopback(parts.hostname):
            origins.add(("http", parts.hostname, port or 80))
    return frozenset(origins)


def hosts_named(settings: Settings) -> str:
    return ", ".join(settings.slack_file_hosts) or "files.slack.com"


def link_kind(url: str) -> str:
    """What a refused link was, for the log: its scheme and host, never the whole URL."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url))
        return f"{parts.scheme or '?'}://{parts.hostname or ''}"
    except ValueError:
        return "malformed"


class RefusedRedirect(BotError):
    """A download's redirect to somewhere the token may not go; `url` is where."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class SlackFileRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects of a file download: the token never leaves the origin it was sent to.

    Same origin: followed with the Authorization header. Another origin: followed
    without it, and only over https (or to an allowed origin). Anything else
    (http elsewhere, ftp:, file:) is refused.
    """

    def __init__(self, allowed: frozenset[Origin]) -> None:
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = origin(newurl)
        if target is None or (target[0] != "https" and target not in self.allowed):
            fp.close()
            raise RefusedRedirect(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and target != origin(req.full_url):
            new.remove_header("Authorization")
        return new


def file_opener(allowed: frozenset[Origin]) -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only: no file:, ftp: or data: handlers at all."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        SlackFileRedirects(allowed),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class Prefixed:
    """A stream's first bytes, already read, then the rest of it."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = self._head, b""
            return out
        return self._rest.read(n)
