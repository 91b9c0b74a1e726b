"""Local stand-ins for Slack, reached over real sockets on 127.0.0.1.

`FakeSlack` is the Web API (plus file hosting, upload and response_url endpoints),
`FakeSocketMode` the Socket Mode websocket, and `signing` builds signed HTTP-mode
requests. Tests drive them through the real slack_sdk / slack_bolt, never mocks.
"""

from __future__ import annotations

from tests.fakes.signing import (
    event_body,
    event_payload,
    file_share_message_event,
    file_shared_event,
    interaction_body,
    post_signed,
    signature,
    signed_headers,
    slash_command_body,
    slash_command_payload,
    view_submission_payload,
)
from tests.fakes.slack_api import DOWNLOAD, RESPOND, UPLOAD, Call, FakeSlack, Upload
from tests.fakes.socket_mode import FakeSocketMode

__all__ = [
    "DOWNLOAD",
    "RESPOND",
    "UPLOAD",
    "Call",
    "FakeSlack",
    "FakeSocketMode",
    "Upload",
    "event_body",
    "event_payload",
    "file_share_message_event",
    "file_shared_event",
    "interaction_body",
    "post_signed",
    "signature",
    "signed_headers",
    "slash_command_body",
    "slash_command_payload",
    "view_submission_payload",
]
