"""Signed Slack requests for HTTP-mode tests, and the payloads Slack would send.

Slack signs each request with ``v0=`` + hex HMAC-SHA256(signing secret,
``v0:{timestamp}:{raw body}``) and Bolt rejects anything older than five minutes,
so a test signs the exact bytes it posts, with a current timestamp by default.
The ``*_payload`` builders return the dicts Socket Mode envelopes carry; the
``*_body`` builders encode the same thing the way Slack posts it over HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

_PLACEHOLDER_RESPONSE_URL = "https://hooks.slack.com/commands/T1/1/fake"


def signature(body: bytes | str, secret: str, timestamp: int) -> str:
    raw = body.encode() if isinstance(body, str) else body
    base = b"v0:" + str(timestamp).encode() + b":" + raw
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def signed_headers(body: bytes | str, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """Signature headers plus the content type Slack uses for this kind of body."""
    ts = int(time.time()) if timestamp is None else timestamp
    raw = body.encode() if isinstance(body, str) else body
    # Events arrive as JSON; commands and interactions as form posts.
    is_json = raw.lstrip()[:1] == b"{"
    return {
        "Content-Type": "application/json" if is_json else "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": str(ts),
        "X-Slack-Signature": signature(raw, secret, ts),
    }


def slash_command_payload(
    text: str,
    command: str = "/finetune",
    user_id: str = "U1",
    channel_id: str = "C1",
    response_url: str = _PLACEHOLDER_RESPONSE_URL,
    trigger_id: str = "13345224609.738474920.8088930838d88f008e0",
    *,
    team_id: str = "T1",
    user_name: str | None = None,
    channel_name: str | None = None,
    api_app_id: str = "A1",
) -> dict[str, str]:
    """The fields of a slash command; every value is a string, over HTTP and Socket Mode."""
    return {
        "token": "verification-token-unused",
        "team_id": team_id,
        "team_domain": "test",
        "channel_id": channel_id,
        "channel_name": channel_name or f"channel-{channel_id.lower()}",
        "user_id": user_id,
        "user_name": user_name or user_id.lower(),
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id,
    }


def slash_command_body(
    text: str,
    command: str = "/finetune",
    user_id: str = "U1",
    channel_id: str = "C1",
    response_url: str = _PLACEHOLDER_RESPONSE_URL,
    trigger_id: str = "13345224609.738474920.8088930838d88f008e0",
    **kwargs: Any,
) -> str:
    """A slash command as Slack posts it: form-encoded."""
    payload = slash_command_payload(
        text, command, user_id, channel_id, response_url, trigger_id, **kwargs
    )
    return urlencode(payload)


def event_payload(
    event: Mapping[str, Any],
    event_id: str = "Ev1",
    team_id: str = "T1",
    *,
    api_app_id: str = "A1",
    bot_user_id: str = "UBOT",
    event_time: int | None = None,
) -> dict[str, Any]:
    """An ``event_callback`` envelope around ``event``."""
    return {
        "token": "verification-token-unused",
        "team_id": team_id,
        "api_app_id": api_app_id,
        "event": dict(event),
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()) if event_time is None else event_time,
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": team_id,
                "user_id": bot_user_id,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": f"4-fake-{event_id}",
    }


def event_body(event: Mapping[str, Any], event_id: str = "Ev1", team_id: str = "T1") -> str:
    """An Events API request body (JSON)."""
    return json.dumps(event_payload(event, event_id, team_id))


def view_submission_payload(
    callback_id: str,
    private_metadata: str,
    values: Mapping[str, Any],
    user_id: str = "U1",
    view_id: str = "V1",
) -> dict[str, Any]:
    """A modal's submission: ``values`` is ``view.state.values`` (block id -> action id -> state)."""
    return {
        "type": "view_submission",
        "user": {"id": user_id, "team_id": "T1"},
        "api_app_id": "A1",
        "team": {"id": "T1"},
        "view": {
            "id": view_id,
            "type": "modal",
            "callback_id": callback_id,
            "private_metadata": private_metadata,
            "state": {"values": dict(values)},
        },
    }


def button_click_payload(
    user: str,
    action_id: str,
    run_id: str = "r1",
    channel: str = "C1",
    trigger_id: str = "trigger-1",
) -> dict[str, Any]:
    """The ``block_actions`` payload of a click on a run card's button."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "team_id": "T1"},
        "api_app_id": "A1",
        "team": {"id": "T1", "domain": "test"},
        "trigger_id": trigger_id,
        "channel": {"id": channel, "name": "ml"},
        "container": {"type": "message", "message_ts": "1.0", "channel_id": channel},
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": f"decide_{run_id}",
                "value": run_id,
                "action_ts": "1.1",
            }
        ],
    }


def interaction_body(payload: Mapping[str, Any]) -> str:
    """An interaction (button click, view submission) as Slack posts it: ``payload=<json>``."""
    return urlencode({"payload": json.dumps(dict(payload))})


def file_share_message_event(file: Mapping[str, Any], text: str = "") -> dict[str, Any]:
    """The ``message``/``file_share`` event for a file from ``FakeSlack.add_file``."""
    channel, share = _first_share(file)
    event: dict[str, Any] = {
        "type": "message",
        "subtype": "file_share",
        "text": text,
        "files": [dict(file)],
        "upload": False,
        "user": file["user"],
        "display_as_bot": False,
        "ts": share["ts"],
        "event_ts": share["ts"],
        "channel": channel,
        "channel_type": "channel" if channel.startswith("C") else "group",
    }
    if "thread_ts" in share:
        event["thread_ts"] = share["thread_ts"]
    return event


def file_shared_event(file: Mapping[str, Any]) -> dict[str, Any]:
    """The ``file_shared`` event Slack sends alongside (it carries only the file id)."""
    channel, share = _first_share(file)
    return {
        "type": "file_shared",
        "file_id": file["id"],
        "user_id": file["user"],
        "file": {"id": file["id"]},
        "channel_id": channel,
        "event_ts": share["ts"],
    }


def post_signed(
    url: str,
    body: bytes | str,
    secret: str,
    headers: Mapping[str, str] | None = None,
    timestamp: int | None = None,
    timeout: float = 10.0,
) -> tuple[int, str, float]:
    """POST a signed body; return (status, response text, seconds taken).

    HTTP errors are returned, not raised, so tests can assert on 401s.
    """
    raw = body.encode() if isinstance(body, str) else body
    all_headers = {**signed_headers(raw, secret, timestamp), **(headers or {})}
    request = urllib.request.Request(url, data=raw, headers=all_headers, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return status, text, time.monotonic() - started


def _first_share(file: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    for visibility in ("public", "private"):
        for channel, shares in file.get("shares", {}).get(visibility, {}).items():
            return channel, shares[0]
    raise ValueError(f"file {file.get('id')} has no channel share to build an event from")
