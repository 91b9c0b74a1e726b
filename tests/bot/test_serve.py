"""`tunebot serve` as an operator runs it: a real process, real sockets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bot.app import create_app, make_client
from bot.config import Settings
from bot.workflow import Workflow
from storage import BlobStore, Store
from tests.conftest import SECRET
from tests.fakes.signing import post_signed, slash_command_body, slash_command_payload
from tests.fakes.socket_mode import FakeSocketMode


def serve_env(slack, home, **extra) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEBOT_", "OPENAI_"))
    }
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=slack.base_url,
        TUNEBOT_HOME=str(home),
    )
    env.update(extra)
    return env


@contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    cmd = [sys.executable, "-m", "bot.cli", "serve", "--http", "--port", "0", *args]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                yield proc, match.group(1)
                return
            if not line and proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}")
        raise AssertionError("serve did not start listening")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bot.cli", "serve", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_http_mode_logs_listening_and_answers_signed_commands(slack, tmp_path):
    with serving(serve_env(slack, tmp_path / "home")) as (proc, url):
        status, body, _ = post_signed(url + "/slack/events", slash_command_body("help"), SECRET)
        assert status == 200 and "/finetune datasets" in json.loads(body)["text"]
        assert post_signed(url + "/slack/events", slash_command_body("help"), "nope")[0] == 401
    assert proc.returncode in (0, -15)


def test_a_second_bot_on_the_same_home_refuses_to_start(slack, tmp_path):
    env = serve_env(slack, tmp_path / "home")
    with serving(env) as (first, _):
        second = run_serve(env, "--http", "--port", "0")
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr


@pytest.mark.parametrize(
    ("drop", "extra", "args", "needle"),
    [
        ("SLACK_BOT_TOKEN", {}, ["--http"], "SLACK_BOT_TOKEN is not set"),
        ("SLACK_SIGNING_SECRET", {}, ["--http"], "SLACK_SIGNING_SECRET is not set"),
        (None, {}, [], "SLACK_APP_TOKEN is not set"),
        (
            None,
            {"SLACK_BOT_TOKEN": "xoxb-wrong"},
            ["--http"],
            "Slack refused SLACK_BOT_TOKEN: invalid_auth",
        ),
        (None, {"TUNEBOT_MAX_FILE_MB": "-3"}, ["--http"], "TUNEBOT_MAX_FILE_MB must be at least 1"),
        (
            None,
            {"TUNEBOT_PROVIDERS": "/nonexistent/providers.toml"},
            ["--http"],
            "TUNEBOT_PROVIDERS: cannot read providers file /nonexistent/providers.toml",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(slack, tmp_path, drop, extra, args, needle):
    env = serve_env(slack, tmp_path / "home", **extra)
    env.pop(drop or "", None)
    out = run_serve(env, *args, "--port", "0")
    assert out.returncode == 2
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_socket_mode_acks_a_slash_command(slack, tmp_path):
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    settings = Settings(
        slack_bot_token=slack.bot_token,
        slack_app_token=slack.app_token,
        slack_api_url=slack.base_url,
        home=tmp_path / "home",
    )
    store = Store.in_home(settings.home)
    workflow = Workflow(settings, store, BlobStore(settings.home / "blobs"), make_client(settings))
    with FakeSocketMode(slack) as socket_mode:
        handler = SocketModeHandler(create_app(settings, workflow), settings.slack_app_token)
        handler.connect()
        try:
            socket_mode.wait_connected()
            envelope = socket_mode.send_envelope(
                type="slash_commands", payload=slash_command_payload("help")
            )
            ack = socket_mode.wait_for_ack(envelope, timeout=10)
            assert "/finetune estimate" in ack["payload"]["text"]
            assert ack["payload"]["response_type"] == "ephemeral"
        finally:
            handler.close()
            workflow.close()
            store.close()
