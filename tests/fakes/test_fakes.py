"""The Slack fakes, driven through the real slack_sdk and slack_bolt."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from slack_bolt import Ack, App
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.signature import Clock, SignatureVerifier

from tests.fakes import (
    DOWNLOAD,
    RESPOND,
    UPLOAD,
    FakeSlack,
    FakeSocketMode,
    event_body,
    file_share_message_event,
    file_shared_event,
    interaction_body,
    post_signed,
    signed_headers,
    slash_command_body,
    slash_command_payload,
)

BOT_TOKEN = "xoxb-test"
APP_TOKEN = "xapp-test"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN, usergroups={"S1": ["U1", "U2"]}) as s:
        yield s


@pytest.fixture
def client(slack: FakeSlack) -> WebClient:
    return WebClient(token=BOT_TOKEN, base_url=slack.base_url, timeout=5)


def _get(url: str, token: str | None = None) -> tuple[int, bytes, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get_content_type()


def test_base_url_joins_like_slack_sdk(slack: FakeSlack) -> None:
    assert slack.base_url == slack.url + "api/"
    # Without the trailing slash the SDK appends one; both reach /api/auth.test.
    WebClient(token=BOT_TOKEN, base_url=slack.base_url.rstrip("/")).auth_test()
    assert [c.path for c in slack.calls_to("auth.test")] == ["/api/auth.test"]


def test_auth_test_and_token_checks(slack: FakeSlack, client: WebClient) -> None:
    response = client.auth_test()
    assert (response["user_id"], response["bot_id"], response["team_id"]) == ("UBOT", "BBOT", "T1")
    assert response["team"] == "Test"
    assert slack.calls[0].headers["authorization"] == f"Bearer {BOT_TOKEN}"

    for token in ("xoxb-wrong", None):
        with pytest.raises(SlackApiError) as err:
            WebClient(token=token, base_url=slack.base_url).auth_test()
        assert err.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as err:
        WebClient(token=APP_TOKEN, base_url=slack.base_url).chat_postMessage(channel="C1", text="x")
    assert err.value.response["error"] == "not_allowed_token_type"


def test_post_update_and_read_back_a_thread(slack: FakeSlack, client: WebClient) -> None:
    parent = client.chat_postMessage(channel="C1", text="validating train.jsonl")
    reply = client.chat_postMessage(
        channel="C1", thread_ts=parent["ts"], text="ok", blocks=[{"type": "divider"}]
    )
    assert reply["channel"] == "C1"
    assert reply["message"]["thread_ts"] == parent["ts"]
    assert float(reply["ts"]) > float(parent["ts"])
    client.chat_update(channel="C1", ts=reply["ts"], text="42 examples, no errors")

    (in_thread,) = slack.messages(channel="C1", thread_ts=parent["ts"])
    assert in_thread["text"] == "42 examples, no errors"
    assert in_thread["blocks"] == [{"type": "divider"}]
    assert len(slack.messages(channel="C1")) == 2
    assert (
        slack.wait_for("chat.postMessage", count=2, timeout=1)[1].params["thread_ts"]
        == (parent["ts"])
    )

    client.chat_delete(channel="C1", ts=parent["ts"])
    assert [m["ts"] for m in slack.messages()] == [reply["ts"]]
    with pytest.raises(SlackApiError, match="message_not_found"):
        client.chat_update(channel="C1", ts="1.000000", text="nope")


def test_file_info_and_download_needs_the_bot_token(slack: FakeSlack, client: WebClient) -> None:
    content = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    shared = slack.add_file(content, name="train.jsonl", channel="C1", user="U1")
    assert shared["id"].startswith("F")
    assert shared["url_private_download"].startswith(f"{slack.url}files-pri/T1-{shared['id']}/")

    file = client.files_info(file=shared["id"])["file"]
    assert (file["name"], file["size"], file["user"]) == ("train.jsonl", len(content), "U1")
    (share,) = file["shares"]["public"]["C1"]
    url = file["url_private_download"]

    assert _get(url, BOT_TOKEN)[:2] == (200, content)
    assert _get(url)[0] == 403
    assert _get(url, "xoxb-other")[0] == 403
    slack.login_page_on_bad_auth = True
    assert _get(url)[::2] == (200, "text/html")  # what real Slack does: check content-type
    slack.fail_downloads = 500
    assert _get(url, BOT_TOKEN)[0] == 500
    assert [c.status for c in slack.calls_to(DOWNLOAD)] == [200, 403, 403, 200, 500]

    with pytest.raises(SlackApiError, match="file_not_found"):
        client.files_info(file="F404")

    message_event = file_share_message_event(file)
    assert (message_event["ts"], message_event["channel"]) == (share["ts"], "C1")
    assert file_shared_event(file)["file_id"] == file["id"]


def test_files_upload_v2_into_a_thread(slack: FakeSlack, client: WebClient) -> None:
    parent = client.chat_postMessage(channel="C1", text="eval done")
    response = client.files_upload_v2(
        channel="C1",
        thread_ts=parent["ts"],
        content=b"id,score\n1,0.9\n",
        filename="eval.csv",
        title="Evaluation rows",
        initial_comment="every row",
    )
    assert response["file"]["title"] == "Evaluation rows"

    (upload,) = slack.uploads
    assert (upload.filename, upload.title, upload.content) == (
        "eval.csv",
        "Evaluation rows",
        b"id,score\n1,0.9\n",
    )
    assert (upload.channel_id, upload.thread_ts, upload.initial_comment) == (
        "C1",
        parent["ts"],
        "every row",
    )
    assert [c.method for c in slack.calls[1:]] == [
        "files.getUploadURLExternal",
        UPLOAD,
        "files.completeUploadExternal",
    ]
    uploaded = client.files_info(file=upload.file_id)["file"]
    assert uploaded["shares"]["public"]["C1"][0]["thread_ts"] == parent["ts"]
    assert _get(uploaded["url_private_download"], BOT_TOKEN)[1] == upload.content

    with pytest.raises(SlackApiError, match="method_deprecated"):
        client.api_call("files.upload", params={"channels": "C1", "content": "x"})


def test_rate_limit_is_retried_only_with_the_retry_handler(
    slack: FakeSlack, client: WebClient
) -> None:
    slack.rate_limit_next("chat.postMessage", retry_after=0)
    with pytest.raises(SlackApiError) as err:
        client.chat_postMessage(channel="C1", text="hi")
    assert err.value.response.status_code == 429
    assert err.value.response.headers["Retry-After"] == "0"

    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=1))
    slack.rate_limit_next("chat.postMessage", retry_after=0)
    assert client.chat_postMessage(channel="C1", text="hi")["ok"]
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 429, 200]


def test_other_methods(slack: FakeSlack, client: WebClient) -> None:
    assert client.usergroups_users_list(usergroup="S1")["users"] == ["U1", "U2"]
    with pytest.raises(SlackApiError, match="no_such_subteam"):
        client.usergroups_users_list(usergroup="S9")
    assert client.users_info(user="U7")["user"]["id"] == "U7"
    assert client.conversations_info(channel="G1")["channel"]["is_private"] is True
    dm = client.conversations_open(users="U1")["channel"]["id"]
    assert dm == client.conversations_open(users="U1")["channel"]["id"]
    assert client.chat_postEphemeral(channel="C1", user="U1", text="only you")["message_ts"]
    assert slack.ephemerals[0]["user"] == "U1"

    client.reactions_add(channel="C1", timestamp="1700000000.000100", name="eyes")
    with pytest.raises(SlackApiError, match="already_reacted"):
        client.reactions_add(channel="C1", timestamp="1700000000.000100", name="eyes")

    home = {"type": "home", "blocks": [{"type": "divider"}]}
    assert client.views_publish(user_id="U1", view=home)["view"]["id"].startswith("V")
    assert slack.home_tabs["U1"]["blocks"] == home["blocks"]
    modal = {"type": "modal", "title": {"type": "plain_text", "text": "Train"}, "blocks": []}
    assert client.views_open(trigger_id="t.1", view=modal)["view"]["type"] == "modal"

    with pytest.raises(SlackApiError, match="unknown_method"):
        client.api_call("nope.nope")
    # Form-encoded bodies carry JSON fields as strings; the fake parses them the same.
    client.api_call("chat.postMessage", data={"channel": "C2", "blocks": '[{"type": "divider"}]'})
    assert slack.messages(channel="C2")[0]["blocks"] == [{"type": "divider"}]


def test_missing_scope(slack: FakeSlack) -> None:
    with FakeSlack(bot_token=BOT_TOKEN, scopes=["chat:write"]) as strict:
        client = WebClient(token=BOT_TOKEN, base_url=strict.base_url)
        assert client.auth_test().headers["x-oauth-scopes"] == "chat:write"
        with pytest.raises(SlackApiError) as err:
            client.files_info(file="F1")
        assert (err.value.response["error"], err.value.response["needed"]) == (
            "missing_scope",
            "files:read",
        )


def test_response_url(slack: FakeSlack) -> None:
    body = json.dumps({"response_type": "ephemeral", "text": "queued"}).encode()
    request = urllib.request.Request(
        slack.response_url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    assert slack.wait_for(RESPOND)[0].params["text"] == "queued"
    assert slack.responses == [{"response_type": "ephemeral", "text": "queued"}]
    assert slack.new_response_url() != slack.response_url


def test_signed_bodies_verify_with_slack_sdk() -> None:
    verifier = SignatureVerifier("s3cret")
    for body in (
        slash_command_body("train provider=local"),
        event_body({"type": "app_home_opened", "user": "U1"}),
        interaction_body({"type": "block_actions", "actions": []}),
    ):
        headers = signed_headers(body, "s3cret")
        assert verifier.is_valid_request(body, headers)
        assert not verifier.is_valid_request(body + "x", headers)
    assert signed_headers("{}", "s")["Content-Type"] == "application/json"
    assert signed_headers("a=b", "s")["Content-Type"] == "application/x-www-form-urlencoded"


def test_post_signed_sends_exactly_what_it_signed(slack: FakeSlack) -> None:
    body = json.dumps({"text": "signed"})
    status, text, elapsed = post_signed(slack.response_url, body, "s3cret", timestamp=1700000000)
    assert (status, json.loads(text)) == (200, {"ok": True})
    assert elapsed >= 0  # seconds taken, for callers that report them
    (call,) = slack.calls_to(RESPOND)
    assert call.headers["x-slack-request-timestamp"] == "1700000000"
    assert call.body == body.encode()
    verifier = SignatureVerifier("s3cret", clock=_FrozenClock(1700000000))
    assert verifier.is_valid(call.body, "1700000000", call.headers["x-slack-signature"])

    status, _, _ = post_signed(slack.url + "nowhere", body, "s3cret")
    assert status == 404  # errors come back as values, not exceptions


class _FrozenClock(Clock):
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def test_socket_mode_slash_command_round_trip(slack: FakeSlack) -> None:
    logger = logging.getLogger("test_fakes.bolt")
    app = App(client=WebClient(token=BOT_TOKEN, base_url=slack.base_url), logger=logger)

    @app.command("/finetune")
    def finetune(ack: Ack, command: dict[str, Any]) -> None:
        ack(text=f"got: {command['text']}")

    with FakeSocketMode(slack) as socket_mode:
        handler = SocketModeHandler(app, APP_TOKEN)
        try:
            handler.connect()
            (opened,) = slack.calls_to("apps.connections.open")
            assert opened.headers["authorization"] == f"Bearer {APP_TOKEN}"
            envelope_id = socket_mode.send_envelope(
                "slash_commands", slash_command_payload("status", response_url=slack.response_url)
            )
            ack = socket_mode.wait_for_ack(envelope_id, timeout=5)
            assert ack["payload"]["text"] == "got: status"
            assert socket_mode.ack_latency(envelope_id) >= 0  # measured, for reports

            # Slack recycles connections: the client must fetch a new URL and carry on.
            socket_mode.send_disconnect()
            socket_mode.wait_connected(2)
            slack.wait_for("apps.connections.open", count=2, timeout=5)
            second = socket_mode.send_envelope(
                "slash_commands", slash_command_payload("runs"), envelope_id="env-2"
            )
            assert socket_mode.wait_for_ack(second)["payload"]["text"] == "got: runs"
        finally:
            handler.close()
