"""A fake Slack Web API on 127.0.0.1 for tests that use the real slack_sdk.

Point a client at it with ``WebClient(token=..., base_url=slack.base_url)``. The
SDK builds each URL with ``urljoin(base_url, method)``, so ``base_url`` must end
in ``/`` (the SDK adds one when missing) and every method lands on ``/api/<method>``.

Besides the Web API the same server hosts what Slack serves from other hosts:
private file downloads (``url_private_download``), the upload URLs that
``files.getUploadURLExternal`` hands out, and ``response_url`` endpoints. Those
requests are recorded as calls too, under the pseudo-methods ``DOWNLOAD``,
``UPLOAD`` and ``RESPOND``, so ``wait_for`` works for them as well.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import itertools
import json
import mimetypes
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from tests.fakes.local_server import LocalHTTPServer

if TYPE_CHECKING:
    from tests.fakes.socket_mode import FakeSocketMode

# Pseudo-method names for the non-API endpoints, as recorded in `FakeSlack.calls`.
DOWNLOAD = "download"
UPLOAD = "upload"
RESPOND = "respond"

# The bot scope each method needs; enforced only when FakeSlack(scopes=...) is given.
# conversations.info and users.conversations depend on the channel types asked for and
# are handled in `_required_scopes`.
METHOD_SCOPES: dict[str, str] = {
    "chat.postMessage": "chat:write",
    "chat.update": "chat:write",
    "chat.delete": "chat:write",
    "chat.postEphemeral": "chat:write",
    "conversations.open": "im:write",
    "files.info": "files:read",
    "files.getUploadURLExternal": "files:write",
    "files.completeUploadExternal": "files:write",
    "reactions.add": "reactions:write",
    "users.info": "users:read",
    "usergroups.users.list": "usergroups:read",
    DOWNLOAD: "files:read",
}

# Parameters that carry JSON: a form-encoded request sends them as JSON strings,
# a JSON request as structures. Parsed so recorded params look the same either way.
_JSON_PARAMS = frozenset({"attachments", "blocks", "files", "metadata", "view"})

_FIRST_TS = 1_700_000_000


@dataclass(frozen=True)
class Call:
    """One HTTP request the fake received. Header names are lower-cased."""

    method: str
    params: dict[str, Any]
    headers: dict[str, str]
    body: bytes
    at: float
    path: str = ""
    status: int = 200


@dataclass(frozen=True)
class Upload:
    """A file completed through the files_upload_v2 flow."""

    file_id: str
    filename: str
    title: str
    content: bytes
    channel_id: str | None
    thread_ts: str | None
    initial_comment: str | None


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class FakeSlack(LocalHTTPServer):
    """Slack's Web API in a ThreadingHTTPServer on 127.0.0.1, started on a daemon thread.

    ``scopes=None`` grants every scope; pass the manifest's bot scopes to catch
    calls the installed app would be refused (``missing_scope``).
    """

    thread_name = "fake-slack-http"

    def __init__(
        self,
        bot_token: str = "xoxb-test",
        app_token: str = "xapp-test",
        *,
        team_id: str = "T1",
        team: str = "Test",
        bot_user_id: str = "UBOT",
        bot_id: str = "BBOT",
        scopes: Iterable[str] | None = None,
        usergroups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.bot_token = bot_token
        self.app_token = app_token
        self.team_id = team_id
        self.team = team
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.scopes: frozenset[str] | None = None if scopes is None else frozenset(scopes)
        self.usergroups: dict[str, list[str]] = {k: list(v) for k, v in (usergroups or {}).items()}
        # Overrides for users.info / conversations.info; other ids get synthesised objects.
        self.users: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        # users.conversations: the channel ids each user belongs to, in order; a user
        # not named here belongs to none. Channel objects come from conversations.info
        # (so `channels` overrides, e.g. is_archived, apply).
        self.memberships: dict[str, list[str]] = {}
        # Failure injection: an HTTP status for every download / raw upload while set.
        self.fail_downloads: int | None = None
        self.fail_uploads: int | None = None
        # Real Slack answers some unauthenticated file GETs with 200 and an HTML login
        # page; by default the fake answers 403 instead, which any client notices.
        self.login_page_on_bad_auth = False
        # A URL every authorised download is redirected to (302) while set.
        self.redirect_downloads: str | None = None
        self.socket_mode: FakeSocketMode | None = None
        # files.info as Slack answers right after an upload (see `lag_file`): calls
        # left during which a file is not found, has no download link, has no shares.
        self._lag: dict[str, dict[str, int]] = {}
        self._deleted: set[str] = set()

        self.calls: list[Call] = []
        self.uploads: list[Upload] = []
        self.responses: list[dict[str, Any]] = []
        self.ephemerals: list[dict[str, Any]] = []
        self.reactions: list[dict[str, str]] = []
        self.home_tabs: dict[str, dict[str, Any]] = {}
        self.opened_views: list[dict[str, Any]] = []
        self._messages: list[dict[str, Any]] = []
        self._files: dict[str, dict[str, Any]] = {}
        self._contents: dict[str, bytes] = {}
        self._pending_uploads: dict[str, dict[str, Any]] = {}
        self._rate_limits: dict[str, deque[int]] = {}
        self._dm_ids: dict[str, str] = {}
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._response_urls = itertools.count(2)  # 1 is `response_url`
        self._cond = threading.Condition()

    # -- lifecycle -------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:PORT/``."""
        return f"{self._root()}/"

    @property
    def base_url(self) -> str:
        """What ``WebClient(base_url=...)`` takes: ``http://127.0.0.1:PORT/api/``."""
        return f"{self.url}api/"

    @property
    def response_url(self) -> str:
        """A response_url to put in slash command / interaction payloads."""
        return f"{self.url}respond/1"

    def new_response_url(self) -> str:
        """A distinct response_url, for telling several commands' replies apart."""
        return f"{self.url}respond/{next(self._response_urls)}"

    def attach_socket_mode(self, socket_mode: FakeSocketMode) -> None:
        """Make ``apps.connections.open`` hand out this Socket Mode server's URL."""
        self.socket_mode = socket_mode

    # -- what tests read -------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.method == method]

    def wait_for(self, method: str, count: int = 1, timeout: float = 10.0) -> list[Call]:
        """Block until ``count`` calls to ``method`` arrived; return all of them so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [c for c in self.calls if c.method == method]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({c.method for c in self.calls})
                    raise TimeoutError(
                        f"expected {count} call(s) to {method} within {timeout}s, "
                        f"got {len(found)}; methods seen: {seen}"
                    )
                self._cond.wait(left)

    def messages(
        self, channel: str | None = None, thread_ts: str | None = None
    ) -> list[dict[str, Any]]:
        """Messages the app posted and has not deleted, as last updated, oldest first.

        ``thread_ts`` selects the replies in that thread (not the parent itself).
        """
        with self._cond:
            return [
                dict(m)
                for m in self._messages
                if (channel is None or m["channel"] == channel)
                and (thread_ts is None or m.get("thread_ts") == thread_ts)
            ]

    def rate_limit_next(self, method: str, retry_after: int = 1) -> None:
        """Answer the next call to ``method`` with HTTP 429 and ``Retry-After``."""
        with self._cond:
            self._rate_limits.setdefault(method, deque()).append(int(retry_after))

    def add_file(
        self,
        content: bytes,
        name: str = "train.jsonl",
        channel: str = "C1",
        user: str = "U1",
        filetype: str | None = None,
        *,
        title: str | None = None,
        thread_ts: str | None = None,
    ) -> dict[str, Any]:
        """Register a file a user shared in ``channel`` and return its Slack file object.

        The share gets a fresh message ``ts`` (in ``shares``); ``thread_ts`` makes it
        a share inside that thread.
        """
        with self._cond:
            file_id = self._new_id("F")
            share_ts = self._next_ts()
            return self._store_file(
                file_id, content, name, title or name, user, filetype, channel, share_ts, thread_ts
            )

    def lag_file(
        self, file_id: str, *, not_found: int = 0, no_link: int = 0, no_shares: int = 0
    ) -> None:
        """Make files.info answer as Slack does just after an upload: `file_not_found`
        for the first `not_found` calls, then the file without its download links for
        `no_link` calls and without `shares` for `no_shares` calls (the latter two
        count every call that finds the file)."""
        with self._cond:
            self._lag[file_id] = {
                "not_found": not_found,
                "no_link": no_link,
                "no_shares": no_shares,
            }

    def share_file(
        self, file_id: str, channel: str, thread_ts: str | None = None
    ) -> dict[str, Any]:
        """Share a file already uploaded into another channel (a new message there);
        returns its file object, which now lists both shares."""
        with self._cond:
            file_obj = self._files[file_id]
            share: dict[str, Any] = {
                "ts": self._next_ts(),
                "channel_name": _channel_name(channel),
                "team_id": self.team_id,
                "share_user_id": file_obj["user"],
            }
            if thread_ts is not None:
                share["thread_ts"] = thread_ts
            visibility = "private" if channel[:1] in ("G", "D") else "public"
            file_obj["shares"].setdefault(visibility, {})[channel] = [share]
            file_obj["channels" if channel.startswith("C") else "groups"].append(channel)
            return json.loads(json.dumps(file_obj))

    def delete_file(self, file_id: str) -> None:
        """files.info answers `file_deleted` from now on, and downloads 404."""
        with self._cond:
            self._deleted.add(file_id)
            self._contents.pop(file_id, None)

    # -- plumbing --------------------------------------------------------------

    def _next_ts(self) -> str:
        micros = next(self._ts) * 100
        return f"{_FIRST_TS + micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    def _record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def _store_file(
        self,
        file_id: str,
        content: bytes,
        name: str,
        title: str,
        user: str,
        filetype: str | None,
        channel: str | None,
        share_ts: str | None,
        thread_ts: str | None,
    ) -> dict[str, Any]:
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        mimetype = mimetypes.guess_type(name)[0] or _sniff_mimetype(content)
        base = f"{self.url}files-pri/{self.team_id}-{file_id}"
        now = int(time.time())
        shares: dict[str, Any] = {}
        if channel is not None and share_ts is not None:
            share: dict[str, Any] = {
                "ts": share_ts,
                "channel_name": _channel_name(channel),
                "team_id": self.team_id,
                "share_user_id": user,
                "reply_users": [],
                "reply_users_count": 0,
                "reply_count": 0,
            }
            if thread_ts is not None:
                share["thread_ts"] = thread_ts
            visibility = "private" if channel[:1] in ("G", "D") else "public"
            shares[visibility] = {channel: [share]}
        file_obj: dict[str, Any] = {
            "id": file_id,
            "created": now,
            "timestamp": now,
            "name": name,
            "title": title,
            "mimetype": mimetype,
            "filetype": filetype or ext or "binary",
            "pretty_type": (filetype or ext or "binary").upper(),
            "user": user,
            "user_team": self.team_id,
            "editable": False,
            "size": len(content),
            "mode": "hosted",
            "is_external": False,
            "external_type": "",
            "is_public": channel is not None and channel.startswith("C"),
            "public_url_shared": False,
            "display_as_bot": False,
            "username": "",
            "url_private": f"{base}/{quote(name)}",
            "url_private_download": f"{base}/download/{quote(name)}",
            "permalink": f"{self.url}files/{user}/{file_id}/{quote(name)}",
            "channels": [channel] if channel and channel.startswith("C") else [],
            "groups": [channel] if channel and channel.startswith("G") else [],
            "ims": [channel] if channel and channel.startswith("D") else [],
            "shares": shares,
            "comments_count": 0,
        }
        self._files[file_id] = file_obj
        self._contents[file_id] = content
        return json.loads(json.dumps(file_obj))  # a copy the caller may mutate

    # -- HTTP dispatch ---------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in req.headers.items()}
        split = urlsplit(req.path)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))

        content_type = headers.get("content-type", "")
        if path.startswith("/api/"):
            method = path[len("/api/") :]
            try:
                params = {**query, **_parse_body(body, content_type)}
            except ValueError:
                params, reply = dict(query), _json_reply({"ok": False, "error": "invalid_json"})
            else:
                for key in _JSON_PARAMS & params.keys():
                    params[key] = _maybe_json(params[key])
                reply = self._api(method, params, headers)
        elif path.startswith("/files-pri/") and req.command == "GET":
            method, params = DOWNLOAD, query
            reply = self._download(path, headers)
        elif path.startswith("/upload/v1/") and req.command == "POST":
            method, params = UPLOAD, {"file_id": path.rsplit("/", 1)[-1]}
            reply = self._upload(params["file_id"], body, content_type)
        elif path.startswith("/respond/") and req.command == "POST":
            method = RESPOND
            try:
                params = _parse_body(body, content_type)
            except ValueError:
                params = {}
            reply = self._respond(params)
        else:
            method, params = f"{req.command} {path}", query
            reply = _Reply(404, b"not found\n", "text/plain")

        self._record(Call(method, params, headers, body, time.time(), req.path, reply.status))
        req.send_response(reply.status)
        req.send_header("Content-Type", reply.content_type)
        req.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(reply.body)

    def _api(self, method: str, params: dict[str, Any], headers: dict[str, str]) -> _Reply:
        with self._cond:
            pending = self._rate_limits.get(method)
            retry_after = pending.popleft() if pending else None
        if retry_after is not None:
            return _json_reply(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": str(retry_after)},
            )

        auth = headers.get("authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else params.get("token")
        error = self._check_token(method, token)
        if error is None:
            error = self._check_scope(method, params)
        if error is not None:
            return _json_reply(error)

        handler: Callable[[dict[str, Any]], dict[str, Any]] | None = getattr(
            self, "_m_" + method.replace(".", "_"), None
        )
        if handler is None:
            return _json_reply({"ok": False, "error": "unknown_method"})
        with self._cond:
            result = handler(params)
        # Lower-case on purpose: Bolt reads scopes with headers.get("x-oauth-scopes")
        # from a plain dict, which only matches Slack's lower-case header name.
        extra = {"x-oauth-scopes": ",".join(sorted(self.scopes))} if self.scopes else {}
        return _json_reply(result, headers=extra)

    def _check_token(self, method: str, token: str | None) -> dict[str, Any] | None:
        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        if token == expected:
            return None
        if token in (self.app_token, self.bot_token):
            return {"ok": False, "error": "not_allowed_token_type"}
        # Real Slack says "not_authed" when no token is sent at all; one error is enough here.
        return {"ok": False, "error": "invalid_auth"}

    def _check_scope(self, method: str, params: dict[str, Any]) -> dict[str, Any] | None:
        missing = [s for s in _required_scopes(method, params) if s not in (self.scopes or ())]
        if self.scopes is None or not missing:
            return None
        needed = missing[0]
        return {
            "ok": False,
            "error": "missing_scope",
            "needed": needed,
            "provided": ",".join(sorted(self.scopes)),
        }

    def _download(self, path: str, headers: dict[str, str]) -> _Reply:
        if headers.get("authorization") != f"Bearer {self.bot_token}":
            if self.login_page_on_bad_auth:
                page = b"<!DOCTYPE html><html><title>Slack</title><body>Sign in</body></html>"
                return _Reply(200, page, "text/html; charset=utf-8")
            return _Reply(403, b"forbidden: send Authorization: Bearer <bot token>\n", "text/plain")
        if self.scopes is not None and "files:read" not in self.scopes:
            return _Reply(403, b"missing_scope: files:read\n", "text/plain")
        if self.fail_downloads is not None:
            return _Reply(self.fail_downloads, b"injected failure\n", "text/plain")
        if self.redirect_downloads is not None:
            return _Reply(302, b"", "text/plain", {"Location": self.redirect_downloads})
        # /files-pri/T1-F00000001/download/train.jsonl or /files-pri/T1-F00000001/train.jsonl
        parts = path.split("/")
        file_id = parts[2].split("-", 1)[-1] if len(parts) > 2 else ""
        with self._cond:
            file_obj = self._files.get(file_id)
            content = self._contents.get(file_id)
        if file_obj is None or content is None:
            return _Reply(404, b"file not found\n", "text/plain")
        return _Reply(
            200,
            content,
            file_obj["mimetype"],
            {"Content-Disposition": f'attachment; filename="{unquote(parts[-1])}"'},
        )

    def _upload(self, file_id: str, body: bytes, content_type: str) -> _Reply:
        if self.fail_uploads is not None:
            return _Reply(self.fail_uploads, b"injected failure\n", "text/plain")
        if content_type.startswith("multipart/form-data"):
            # curl -F filename=@x.csv style, as Slack's docs show; the SDK posts raw bytes.
            body = _multipart_file(body, content_type) or body
        with self._cond:
            pending = self._pending_uploads.get(file_id)
            if pending is None:
                return _Reply(404, b"unknown upload url\n", "text/plain")
            pending["content"] = body
        return _Reply(200, f"OK - {len(body)}".encode(), "text/plain")

    def _respond(self, params: dict[str, Any]) -> _Reply:
        if not params:
            return _Reply(400, b"invalid_payload", "text/plain")
        with self._cond:
            self.responses.append(params)
        return _json_reply({"ok": True})

    # -- Web API methods (called with the lock held) -------------------------------

    def _m_auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": f"https://{self.team.lower()}.slack.com/",
            "team": self.team,
            "user": "tunebot",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _m_apps_connections_open(self, p: dict[str, Any]) -> dict[str, Any]:
        if self.socket_mode is None:
            # Not an error Slack documents; the nearest real case is Socket Mode switched off.
            return {"ok": False, "error": "socket_mode_not_enabled"}
        return {"ok": True, "url": self.socket_mode.new_url()}

    def _m_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        channel = p.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not (p.get("text") or p.get("blocks") or p.get("attachments")):
            return {"ok": False, "error": "no_text"}
        ts = self._next_ts()
        message: dict[str, Any] = {
            "type": "message",
            "channel": channel,
            "ts": ts,
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "text": p.get("text", ""),
        }
        for key in ("thread_ts", "blocks", "attachments", "metadata", "reply_broadcast"):
            if p.get(key) is not None:
                message[key] = p[key]
        self._messages.append(message)
        shown = {k: v for k, v in message.items() if k != "channel"}
        return {"ok": True, "channel": channel, "ts": ts, "message": shown}

    def _m_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self._find_message(p.get("channel"), p.get("ts"))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        for key in ("text", "blocks", "attachments", "metadata"):
            if p.get(key) is not None:
                message[key] = p[key]
        message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        shown = {k: v for k, v in message.items() if k != "channel"}
        return {
            "ok": True,
            "channel": message["channel"],
            "ts": message["ts"],
            "text": message["text"],
            "message": shown,
        }

    def _m_chat_delete(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self._find_message(p.get("channel"), p.get("ts"))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        self._messages.remove(message)
        return {"ok": True, "channel": message["channel"], "ts": message["ts"]}

    def _m_chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not p.get("user"):
            return {"ok": False, "error": "user_not_in_channel"}
        if not (p.get("text") or p.get("blocks") or p.get("attachments")):
            return {"ok": False, "error": "no_text"}
        ts = self._next_ts()
        self.ephemerals.append({**p, "message_ts": ts})
        return {"ok": True, "message_ts": ts}

    def _m_conversations_info(self, p: dict[str, Any]) -> dict[str, Any]:
        channel_id = p.get("channel") or ""
        if channel_id in self.channels:
            return {"ok": True, "channel": self.channels[channel_id]}
        if channel_id[:1] not in ("C", "G", "D"):
            return {"ok": False, "error": "channel_not_found"}
        is_im = channel_id.startswith("D")
        channel: dict[str, Any] = {
            "id": channel_id,
            "created": _FIRST_TS,
            "is_channel": channel_id.startswith("C"),
            "is_group": channel_id.startswith("G"),
            "is_im": is_im,
            "is_mpim": False,
            "is_private": not channel_id.startswith("C"),
            "is_archived": False,
            "is_general": False,
            "is_shared": False,
            "is_ext_shared": False,
            "is_org_shared": False,
            "context_team_id": self.team_id,
        }
        if not is_im:
            channel |= {
                "name": _channel_name(channel_id),
                "is_member": True,
                "creator": "U1",
                "topic": {"value": "", "creator": "", "last_set": 0},
                "purpose": {"value": "", "creator": "", "last_set": 0},
            }
        return {"ok": True, "channel": channel}

    def _m_users_conversations(self, p: dict[str, Any]) -> dict[str, Any]:
        """The channels `user` (default: the bot) belongs to, from `memberships`.

        Honours `types` (default public_channel), `exclude_archived`, `limit` (1..1000,
        default 100) and `cursor`; `response_metadata.next_cursor` is "" on the last page.
        """
        user = p.get("user") or self.bot_user_id
        types = {t.strip() for t in str(p.get("types") or "public_channel").split(",") if t.strip()}
        if not types <= _CONVERSATION_TYPES:
            return {"ok": False, "error": "invalid_types"}
        exclude_archived = str(p.get("exclude_archived") or "").lower() in ("1", "true")
        try:
            limit = min(max(int(p.get("limit") or 100), 1), 1000)
            start = _cursor_offset(p.get("cursor"))
        except ValueError:
            return {"ok": False, "error": "invalid_cursor"}
        found = []
        for channel_id in self.memberships.get(user, []):
            channel = self._m_conversations_info({"channel": channel_id}).get("channel")
            if not channel or _conversation_type(channel) not in types:
                continue
            if exclude_archived and channel.get("is_archived"):
                continue
            found.append(json.loads(json.dumps(channel)))
        end = start + limit
        cursor = _cursor_for(end) if end < len(found) else ""
        return {
            "ok": True,
            "channels": found[start:end],
            "response_metadata": {"next_cursor": cursor},
        }

    def _m_conversations_open(self, p: dict[str, Any]) -> dict[str, Any]:
        users = [u for u in str(p.get("users") or "").split(",") if u]
        if len(users) != 1:
            # Group DMs (mpim) are not modelled.
            return {"ok": False, "error": "users_list_not_supplied"}
        channel_id = self._dm_ids.setdefault(users[0], self._new_id("D"))
        return {"ok": True, "channel": {"id": channel_id}}

    def _m_users_info(self, p: dict[str, Any]) -> dict[str, Any]:
        user_id = p.get("user") or ""
        if user_id in self.users:
            return {"ok": True, "user": self.users[user_id]}
        if user_id[:1] not in ("U", "W"):
            return {"ok": False, "error": "user_not_found"}
        is_bot = user_id == self.bot_user_id
        name = "tunebot" if is_bot else user_id.lower()
        real_name = "tunebot" if is_bot else f"User {user_id}"
        return {
            "ok": True,
            "user": {
                "id": user_id,
                "team_id": self.team_id,
                "name": name,
                "deleted": False,
                "real_name": real_name,
                "tz": "Europe/London",
                "tz_label": "Greenwich Mean Time",
                "tz_offset": 0,
                "is_admin": False,
                "is_owner": False,
                "is_bot": is_bot,
                "is_app_user": False,
                "profile": {
                    "real_name": real_name,
                    "display_name": name,
                    "team": self.team_id,
                },
            },
        }

    def _m_usergroups_users_list(self, p: dict[str, Any]) -> dict[str, Any]:
        group = p.get("usergroup")
        if group not in self.usergroups:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": list(self.usergroups[group])}

    def _m_reactions_add(self, p: dict[str, Any]) -> dict[str, Any]:
        if not (p.get("channel") and p.get("timestamp")):
            return {"ok": False, "error": "no_item_specified"}
        if not p.get("name"):
            return {"ok": False, "error": "invalid_name"}
        reaction = {"channel": p["channel"], "timestamp": p["timestamp"], "name": p["name"]}
        if reaction in self.reactions:
            return {"ok": False, "error": "already_reacted"}
        self.reactions.append(reaction)
        return {"ok": True}

    def _m_views_publish(self, p: dict[str, Any]) -> dict[str, Any]:
        view = p.get("view")
        if not p.get("user_id") or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}
        stored = self._view(view)
        self.home_tabs[p["user_id"]] = stored
        return {"ok": True, "view": stored}

    def _m_views_open(self, p: dict[str, Any]) -> dict[str, Any]:
        view = p.get("view")
        if not p.get("trigger_id") or not isinstance(view, dict):
            return {"ok": False, "error": "invalid_arguments"}
        stored = self._view(view)
        self.opened_views.append(stored)
        return {"ok": True, "view": stored}

    def _m_files_info(self, p: dict[str, Any]) -> dict[str, Any]:
        file_id = p.get("file") or ""
        if file_id in self._deleted:
            return {"ok": False, "error": "file_deleted"}
        file_obj = self._files.get(file_id)
        lag = self._lag.get(file_id) or {}
        if file_obj is None or lag.get("not_found", 0) > 0:
            if lag:
                lag["not_found"] -= 1
            return {"ok": False, "error": "file_not_found"}
        if lag.get("no_link", 0) > 0 or lag.get("no_shares", 0) > 0:
            file_obj = json.loads(json.dumps(file_obj))
            if lag["no_link"] > 0:
                lag["no_link"] -= 1
                file_obj.pop("url_private", None)
                file_obj.pop("url_private_download", None)
            if lag["no_shares"] > 0:
                lag["no_shares"] -= 1
                file_obj["shares"] = {}
        return {
            "ok": True,
            "file": file_obj,
            "comments": [],
            "response_metadata": {"next_cursor": ""},
        }

    def _m_files_upload(self, p: dict[str, Any]) -> dict[str, Any]:
        # Slack retired the one-step upload; files_upload_v2 is the only way in.
        return {"ok": False, "error": "method_deprecated"}

    def _m_files_getUploadURLExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("filename") or not str(p.get("length") or "").isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = self._new_id("F")
        self._pending_uploads[file_id] = {
            "filename": p["filename"],
            "length": int(p["length"]),
            "content": None,
        }
        return {"ok": True, "upload_url": f"{self.url}upload/v1/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        files = p.get("files")
        if not isinstance(files, list) or not files:
            return {"ok": False, "error": "invalid_arguments"}
        channels = [c for c in str(p.get("channels") or "").split(",") if c]
        channel_id = p.get("channel_id") or (channels[0] if channels else None)
        thread_ts = p.get("thread_ts")
        for item in files:
            pending = self._pending_uploads.get(item.get("id", ""))
            if pending is None or pending["content"] is None:
                return {"ok": False, "error": "file_not_found"}
        completed = []
        for item in files:
            pending = self._pending_uploads.pop(item["id"])
            title = item.get("title") or pending["filename"]
            share_ts = self._next_ts() if channel_id else None
            completed.append(
                self._store_file(
                    item["id"],
                    pending["content"],
                    pending["filename"],
                    title,
                    self.bot_user_id,
                    None,
                    channel_id,
                    share_ts,
                    thread_ts,
                )
            )
            self.uploads.append(
                Upload(
                    file_id=item["id"],
                    filename=pending["filename"],
                    title=title,
                    content=pending["content"],
                    channel_id=channel_id,
                    thread_ts=thread_ts,
                    initial_comment=p.get("initial_comment"),
                )
            )
        return {"ok": True, "files": completed}

    def _find_message(self, channel: str | None, ts: str | None) -> dict[str, Any] | None:
        for message in self._messages:
            if message["channel"] == channel and message["ts"] == ts:
                return message
        return None

    def _view(self, view: dict[str, Any]) -> dict[str, Any]:
        view_id = self._new_id("V")
        return {
            "id": view_id,
            "team_id": self.team_id,
            "app_id": "A1",
            "bot_id": self.bot_id,
            "hash": f"{_FIRST_TS}.{view_id}",
            "state": {"values": {}},
            "blocks": [],
            **view,
        }


def _handler_for(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "FakeSlack/1.0"

        def do_GET(self) -> None:
            fake._handle(self)

        def do_POST(self) -> None:
            fake._handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # every request is in fake.calls; stderr noise helps no one

    return Handler


_CONVERSATION_TYPES = frozenset({"public_channel", "private_channel", "mpim", "im"})
_TYPE_SCOPES = {
    "public_channel": "channels:read",
    "private_channel": "groups:read",
    "mpim": "mpim:read",
    "im": "im:read",
}


def _required_scopes(method: str, params: dict[str, Any]) -> tuple[str, ...]:
    if method == "users.conversations":
        types = str(params.get("types") or "public_channel").split(",")
        return tuple(_TYPE_SCOPES[t.strip()] for t in types if t.strip() in _TYPE_SCOPES)
    needed = _required_scope(method, params)
    return () if needed is None else (needed,)


def _conversation_type(channel: dict[str, Any]) -> str:
    if channel.get("is_im"):
        return "im"
    if channel.get("is_mpim"):
        return "mpim"
    return "private_channel" if channel.get("is_private") else "public_channel"


def _cursor_for(offset: int) -> str:
    """An opaque cursor, base64 like Slack's."""
    return base64.b64encode(f"offset:{offset}".encode()).decode()


def _cursor_offset(cursor: Any) -> int:
    """The offset a cursor from `_cursor_for` stands for; ValueError for anything else."""
    if not cursor:
        return 0
    try:
        kind, _, offset = base64.b64decode(str(cursor), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"bad cursor {cursor!r}") from None
    if kind != "offset" or not offset.isdigit():
        raise ValueError(f"bad cursor {cursor!r}")
    return int(offset)


def _required_scope(method: str, params: dict[str, Any]) -> str | None:
    if method == "conversations.info":
        prefix = str(params.get("channel") or "")[:1]
        return {"C": "channels:read", "G": "groups:read", "D": "im:read"}.get(prefix)
    return METHOD_SCOPES.get(method)


def _json_reply(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), headers=headers or {})


def _parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    if not body:
        return {}
    if content_type.startswith("application/json"):
        parsed = json.loads(body)
        return parsed if isinstance(parsed, dict) else {}
    if content_type.startswith("multipart/form-data"):
        return _multipart_fields(body, content_type)
    return dict(parse_qsl(body.decode(), keep_blank_values=True))


def _multipart_parts(body: bytes, content_type: str) -> list[Any]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(head + body)
    return list(message.iter_parts()) if message.is_multipart() else []


def _multipart_fields(body: bytes, content_type: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for part in _multipart_parts(body, content_type):
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True) or b""
            fields[name] = payload if part.get_filename() else payload.decode()
    return fields


def _multipart_file(body: bytes, content_type: str) -> bytes | None:
    for part in _multipart_parts(body, content_type):
        if part.get_filename():
            return part.get_payload(decode=True) or b""
    return None


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _sniff_mimetype(content: bytes) -> str:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


def _channel_name(channel_id: str) -> str:
    return f"channel-{channel_id.lower()}"
