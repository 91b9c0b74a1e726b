"""A bot killed in the middle of a paid submission, and started again: one job, one upload.

Everything is real but Slack and OpenAI, which are the local fakes: `tunebot
serve --http` runs as a subprocess, gets signed HTTP requests, and is killed
with SIGKILL (no clean-up, no lock release, no last words) while OpenAI is
still holding its training-file upload. A new process on the same home must
take the lapsed claim over, find the file the dead one uploaded by its name,
and create exactly one job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import Store
from tests.conftest import ROOT, SECRET, training_file
from tests.fakes.openai_api import FakeOpenAI
from tests.fakes.signing import (
    button_click_payload,
    event_body,
    file_share_message_event,
    interaction_body,
    post_signed,
    slash_command_body,
)
from tests.fakes.slack_api import FakeSlack

TUNEBOT = ROOT / ".venv" / "bin" / "tunebot"
JOBS = "/fine_tuning/jobs"
FILES = "/files"
SUCCEEDED = "r1 🎉 succeeded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Bot:
    """One `tunebot serve --http` process, in a process group of its own, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(TUNEBOT), "serve", "--http", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the finally can end it all
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout: float = 60) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the bot exited with {self.proc.returncode} before /healthz")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/healthz", timeout=2) as response,
            ):
                return response.status == 200
            return False

        _wait(f"{self.url}/healthz", healthy, timeout)

    def post(self, body: str) -> tuple[int, str]:
        status, text, _ = post_signed(self.url + "/slack/events", body, SECRET)
        return status, text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM (a clean stop), then SIGKILL the whole group if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the pid is the group's id
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeSlack, FakeOpenAI]]:
    with FakeSlack() as slack, FakeOpenAI(api_key="sk-test") as openai:
        yield slack, openai


def _env(slack: FakeSlack, openai: FakeOpenAI, home: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEBOT_", "OPENAI_"))
    }
    slack_host = slack.url.removeprefix("http://").rstrip("/")  # 127.0.0.1:PORT
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=slack.base_url,
        TUNEBOT_SLACK_FILE_HOSTS=slack_host,
        OPENAI_API_KEY=openai.api_key,
        OPENAI_BASE_URL=openai.base_url,
        TUNEBOT_HOME=str(home),
        TUNEBOT_APPROVERS="UA,UB",
        TUNEBOT_DEFAULT_PROVIDER="openai",
        TUNEBOT_POLL_SECONDS="0.2",
        TUNEBOT_CLAIM_LEASE_SECONDS="1",
        TUNEBOT_PROGRESS_SECONDS="0.01",  # 0 is refused: "must be a positive number"
        PYTHONUNBUFFERED="1",
    )
    return env


def _posted(slack: FakeSlack, needle: str) -> list[str]:
    """Texts of every chat.postMessage call containing `needle` (each post, not the last edit)."""
    return [
        c.params.get("text", "")
        for c in slack.calls_to("chat.postMessage")
        if needle in c.params.get("text", "")
    ]


def _has_approve_button(slack: FakeSlack) -> bool:
    for message in slack.messages(channel="C1"):
        for block in message.get("blocks") or []:
            for element in block.get("elements", []) if block.get("type") == "actions" else []:
                if element.get("action_id") == "approve_run" and element.get("value") == "r1":
                    return True
    return False


def drop_training_file(bot: Bot, slack: FakeSlack, examples: int = 40) -> None:
    """Drop support.jsonl in #C1 through `bot` and wait for its validation report."""
    file = slack.add_file(training_file(examples), name="support.jsonl")
    status, _ = bot.post(event_body(file_share_message_event(file), event_id="EvDrop1"))
    assert status == 200
    share_ts = file["shares"]["public"]["C1"][0]["ts"]
    _wait(
        "the validation report of support.jsonl",
        lambda: [
            m
            for m in slack.messages(channel="C1", thread_ts=share_ts)
            if "support.jsonl (d" in m["text"] and f"{examples} valid" in m["text"]
        ],
        timeout=60,
    )


def test_sigkill_during_the_upload_then_restart_makes_exactly_one_job(fakes, tmp_path):
    slack, openai = fakes
    home = tmp_path / "home"
    env = _env(slack, openai, home)
    bots: list[Bot] = []
    finished = False
    try:
        first = Bot(env, tmp_path / "bot-1.log")
        bots.append(first)
        first.wait_healthy()

        drop_training_file(first, slack)

        # UR asks for a paid run; UA approves it while OpenAI holds every upload 3 s.
        status, ack = first.post(slash_command_body("train", user_id="UR"))
        assert status == 200 and "r1 needs approval" in json.loads(ack)["text"], ack
        _wait("the approval card of r1", lambda: _has_approve_button(slack), timeout=30)
        openai.upload_delay = 3.0
        status, _ = first.post(interaction_body(button_click_payload("UA", "approve_run")))
        assert status == 200

        # OpenAI has the file (it is stored before the delay); the bot never hears back.
        _wait(
            "the training-file upload to reach OpenAI",
            lambda: openai.calls_to("POST", FILES, exact=True),
            timeout=60,
            interval=0.02,
        )
        assert not openai.calls_to("POST", JOBS, exact=True), "a job before the upload returned"
        os.kill(first.pid, signal.SIGKILL)
        assert first.proc.wait(timeout=30) == -signal.SIGKILL
        openai.upload_delay = 0.0

        # A new bot on the same home: the lock must accept the dead holder, and the
        # scheduler must take the lapsed claim over and finish the submission.
        second = Bot(env, tmp_path / "bot-2.log")
        bots.append(second)
        second.wait_healthy()
        jobs = _wait("the restarted bot to create a job", openai.jobs, timeout=60)
        job_id = jobs[0]["id"]
        openai.run_to_end(job_id)
        _wait("the success message of r1", lambda: _posted(slack, SUCCEEDED), timeout=60)
        _wait(
            "the evaluation summary of r1",
            lambda: _posted(slack, "r1 evaluation:"),
            timeout=120,
        )
        time.sleep(1.0)  # a few more ticks: nothing may be created or posted twice
        assert second.stop() in (0, -signal.SIGTERM)

        creates = openai.calls_to("POST", JOBS, exact=True)
        uploads = openai.calls_to("POST", FILES, exact=True)
        assert [c.status for c in creates] == [200], creates
        assert len(openai.jobs()) == 1
        assert len(uploads) == 1, [c.params["file"].filename for c in uploads]
        key = json.loads(creates[0].body)["metadata"]["tunebot_key"]
        assert key.endswith(":r1")
        assert uploads[0].params["file"].filename == f"tunebot-{key.replace(':', '-')}-train.jsonl"
        assert openai.job(job_id)["training_file"] == next(iter(openai.files))

        with Store.in_home(home) as store:
            assert key == f"{store.installation_id}:r1"
            run = store.get_run("r1")
            assert run.status == "succeeded", (run.status, run.error)
            assert run.external_id == job_id
        assert len(_posted(slack, SUCCEEDED)) == 1

        for bot in bots:
            assert "Traceback" not in bot.log(), f"{bot.log_path.name}:\n{bot.log()[-4000:]}"
        assert "taking over its submission" in second.log()
        finished = True
        print(
            f"jobs created: {len(creates)}, uploads: {len(uploads)}, "
            f"file look-ups: {len(openai.calls_to('GET', FILES, exact=True))}, "
            f"job look-ups: {len(openai.calls_to('GET', JOBS, exact=True))}, "
            f"success posts: {len(_posted(slack, SUCCEEDED))}"
        )
    finally:
        for bot in bots:
            bot.kill_group()
        if not finished:
            for bot in bots:
                print(f"--- {bot.log_path.name} (tail) ---\n{bot.log()[-6000:]}")
            print("--- OpenAI calls ---")
            for call in openai.calls:
                print(call.method, call.path, call.status)
