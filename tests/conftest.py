"""Shared fixtures: a fake Slack on 127.0.0.1 and the real bot serving HTTP."""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from wsgiref.simple_server import make_server

import pytest

from bot.app import create_app, make_client
from bot.config import Settings
from bot.serve import ThreadingWSGIServer, _QuietHandler, wsgi_app
from bot.workflow import Workflow
from storage import BlobStore, Store
from tests.fakes.openai_api import FakeOpenAI
from tests.fakes.signing import event_body, post_signed, slash_command_body
from tests.fakes.slack_api import FakeSlack

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (README.md, manifest.yml, examples/, the packages)."""
CASES = ROOT / "tests" / "cases"
"""The real-world data files shared by the bot's and the trainers' tests."""

SECRET = "test-signing-secret"

SYSTEM = {"role": "system", "content": "You are a concise support assistant."}


def chat_jsonl(
    n: int,
    user: str = "How do I reset device {i}?",
    assistant: str = "Hold the power button of device {i} for ten seconds.",
    *,
    bad_lines: int = 0,
) -> bytes:
    """`n` system/user/assistant examples (`{i}` in a turn is the example's number),
    then `bad_lines` lines that are not JSON."""
    rows = [
        {
            "messages": [
                SYSTEM,
                {"role": "user", "content": user.format(i=i)},
                {"role": "assistant", "content": assistant.format(i=i)},
            ]
        }
        for i in range(n)
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"] * bad_lines
    return ("\n".join(lines) + "\n").encode()


def training_file(n: int = 12, *, bad_lines: int = 0) -> bytes:
    return chat_jsonl(n, bad_lines=bad_lines)


SECRET_KEY = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0" * 2  # looks like an OpenAI key


def secret_training_file(n: int) -> bytes:
    """`n` chat examples whose user turns hold SECRET_KEY: a `possible_secret` each."""
    return chat_jsonl(
        n,
        f"My key is {SECRET_KEY}, why does call {{i}} fail?",
        "Rotate the key and retry call {i} later.",
    )


@pytest.fixture(scope="session")
def validation_pool() -> Iterator[ProcessPoolExecutor]:
    """One worker process for the whole session: it loads the tokenizer once."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
    yield pool
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator:
    """One S3 API (moto's server) on 127.0.0.1 for the session; skips without moto."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the [dev] extra)")
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    from tests.fakes.s3_store import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, its AWS variables in this process's environment (as a
    deployment sets them), and a fresh bucket: `s3.bucket_name`."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3_server.bucket_name = s3_server.bucket()
    return s3_server


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@dataclass
class RunningBot:
    url: str
    settings: Settings
    workflow: Workflow
    store: Store
    slack: FakeSlack

    def post(self, body: str | bytes, **kwargs) -> tuple[int, str, float]:
        return post_signed(self.url + "/slack/events", body, SECRET, **kwargs)

    def command(self, text: str, **kwargs) -> tuple[int, dict | str]:
        status, body, _ = self.post(slash_command_body(text, **kwargs))
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def event(self, event: dict, event_id: str, headers: dict | None = None) -> int:
        return self.post(event_body(event, event_id=event_id), headers=headers)[0]

    def wait_idle(self, timeout: float = 300) -> None:
        """Wait until every job the bot has started has finished."""
        assert self.workflow.drain(timeout), "bot jobs still running"


@pytest.fixture
def make_bot(tmp_path, slack, validation_pool):
    started: list[tuple[ThreadingWSGIServer, Workflow, Store]] = []

    def start(**overrides) -> RunningBot:
        settings = Settings(
            slack_bot_token=slack.bot_token,
            slack_signing_secret=SECRET,
            slack_api_url=slack.base_url,
            home=tmp_path / "home",
        )
        settings = replace(settings, **overrides)
        store = Store.in_home(settings.home)
        workflow = Workflow(
            settings,
            store,
            BlobStore(settings.home / "blobs"),
            make_client(settings),
            validation_pool=validation_pool,
        )
        app = create_app(settings, workflow)
        server = make_server(
            "127.0.0.1",
            0,
            wsgi_app(app),
            server_class=ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        started.append((server, workflow, store))
        url = f"http://127.0.0.1:{server.server_address[1]}"
        return RunningBot(url, settings, workflow, store, slack)

    yield start
    for server, workflow, store in started:
        server.shutdown()
        server.server_close()
        workflow.ctx.jobs.shutdown(wait=True)
        workflow.ctx.long_jobs.shutdown(wait=True)
        store.close()


@pytest.fixture
def bot(make_bot) -> RunningBot:
    return make_bot()


APPROVERS = ("UA", "UB")


@pytest.fixture
def openai_fake():
    with FakeOpenAI(api_key="sk-test") as fake:
        yield fake


@pytest.fixture
def paid_bot(make_bot, openai_fake):
    """A bot for paid runs: OpenAI is the local fake, approvers UA and UB."""

    def start(**overrides):
        settings = {
            "openai_api_key": "sk-test",
            "openai_base_url": openai_fake.base_url,
            "approvers": APPROVERS,
            "default_provider": "openai",
            "progress_seconds": 0.0,
            **overrides,
        }
        bot = make_bot(**settings)
        bot.openai = openai_fake
        return bot

    return start
