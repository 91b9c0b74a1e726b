"""`/finetune chat` on a local run: the model lives in a worker process, never in the bot.

The real worker (`python -m trainers.chat_worker`) loads a tiny Llama with a
LoRA adapter built offline; a stand-in worker (a few lines of Python speaking
the same JSON lines) shows taking turns, "busy", and a worker dying mid-answer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.bot.test_runs import texts, upload
from trainers import local
from trainers.chat_worker import ChatBusy, ChatWorker, ChatWorkerDied

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-must-not-leak",
    "SLACK_SIGNING_SECRET": "signing-must-not-leak",
    "SLACK_APP_TOKEN": "xapp-must-not-leak",
    "OPENAI_API_KEY": "sk-must-not-leak",
    "TUNEBOT_HOME": "/must/not/leak",
}

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        text = json.loads(line)["messages"][-1]["content"]
        if "die" in text:
            os.kill(os.getpid(), signal.SIGKILL)
        if "slow" in text:
            time.sleep(1.0)
        answer = {"base": "b:" + text, "tuned": "t:" + text, "pid": os.getpid(), "loaded": False}
        print(json.dumps(answer), flush=True)
    """
)


@pytest.fixture
def fake_python(tmp_path) -> str:
    """An interpreter stand-in: runs the fake worker whatever module it is asked for."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def ask(worker: ChatWorker, text: str):
    return worker.ask("base", "adapter", [{"role": "user", "content": text}])


def environ_names(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw if entry)
    return {name: value for name, _, value in pairs}


def add_local_run(bot, base_dir: Path, adapter_dir: Path):
    """A succeeded local run r1 of C1, as training leaves it: its spec and its adapter."""
    dataset = bot.store.get_dataset("d1")
    run = bot.store.add_run(
        dataset_id="d1",
        provider="local",
        model=str(base_dir),
        status="succeeded",
        channel="C1",
        thread_ts=dataset.thread_ts,
        requested_by="UR",
        plan_json={},
        result_json={"adapter_dir": str(adapter_dir), "merged_dir": None},
    )
    run_dir = bot.workflow.runs.run_dir(run.id)
    run_dir.mkdir(parents=True)
    (run_dir / local.SPEC).write_text(json.dumps({"model": str(base_dir)}))
    return run


def side_by_side(bot) -> list[str]:
    return [t for t in texts(bot) if t.startswith("r1 — prompt:")]


def test_local_chat_runs_in_one_kept_worker_without_secrets(paid_bot, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests.trainers.test_evaluate import tiny_llama_with_adapter

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)  # what a bot's own environment holds
    bot = paid_bot(default_provider="local", chat_idle_seconds=120.0)
    upload(bot)
    base_dir, adapter_dir = tiny_llama_with_adapter(tmp_path)
    add_local_run(bot, base_dir, adapter_dir)
    worker = bot.workflow.runs.distiller.chat_worker
    try:
        _, body = bot.command('chat r1 "how do i reset"', user_id="U2")
        assert "Asking the base and the tuned model of r1" in body["text"]
        bot.wait_idle()
        assert len(side_by_side(bot)) == 1, texts(bot)
        first = worker.pid
        assert first is not None and first != os.getpid()  # the model was loaded over there

        env = environ_names(first)
        assert not [n for n in env if n.startswith(("SLACK_", "OPENAI_", "TUNEBOT_"))], env
        assert not [v for v in env.values() if "must-not-leak" in v or "/must/not" in v]

        bot.command('chat r1 "how do i reset my device"', user_id="U3")
        bot.wait_idle()
        assert len(side_by_side(bot)) == 2
        assert worker.pid == first  # the same process, the model kept loaded

        os.kill(first, signal.SIGKILL)  # dies between chats: the next chat starts another
        deadline = time.monotonic() + 10
        while worker.pid is not None:
            assert time.monotonic() < deadline, "the worker's death went unnoticed"
            time.sleep(0.05)
        bot.command('chat r1 "hello"', user_id="U2")
        bot.wait_idle()
        assert len(side_by_side(bot)) == 3
        assert worker.pid not in (None, first)
        assert any(
            "the previous chat worker had stopped (signal SIGKILL)" in t for t in texts(bot)
        ), texts(bot)
    finally:
        worker.close()


def test_a_worker_that_dies_while_answering_is_said_and_replaced(paid_bot, fake_python):
    bot = paid_bot(default_provider="local")
    upload(bot)
    add_local_run(bot, Path("/unused/base"), Path("/unused/adapter"))
    worker = ChatWorker(python=fake_python)
    bot.workflow.runs.distiller.chat_worker = worker  # the stand-in speaks the same protocol
    try:
        bot.command('chat r1 "please die"', user_id="U2")
        bot.wait_idle()
        said = [t for t in texts(bot) if "r1's models did not answer" in t]
        assert len(said) == 1, texts(bot)
        assert "the chat worker stopped while answering (signal SIGKILL" in said[0]
        assert "the next chat starts a new one" in said[0]
        assert worker.pid is None

        bot.command('chat r1 "hello"', user_id="U2")
        bot.wait_idle()
        (answer,) = side_by_side(bot)
        assert "t:hello" in answer and worker.pid is not None
    finally:
        worker.close()


def test_chats_take_turns_and_a_long_line_is_told_busy(fake_python):
    worker = ChatWorker(python=fake_python, max_waiting=1)
    results: dict[str, object] = {}

    def chat(name: str) -> None:
        try:
            results[name] = ask(worker, f"slow {name}")
        except Exception as exc:
            results[name] = exc

    try:
        ask(worker, "warm up")
        first = threading.Thread(target=chat, args=("a",))
        first.start()
        time.sleep(0.3)  # a is being answered
        second = threading.Thread(target=chat, args=("b",))
        second.start()
        time.sleep(0.2)  # b waits its turn
        with pytest.raises(ChatBusy, match="busy"):
            ask(worker, "c")
        first.join(10)
        second.join(10)
        a, b = results["a"], results["b"]
        assert a.tuned == "t:slow a" and b.tuned == "t:slow b"  # type: ignore[union-attr]
        assert a.pid == b.pid == worker.pid  # type: ignore[union-attr]
    finally:
        worker.close()
    assert worker.pid is None


def test_the_worker_dies_mid_answer_then_starts_again(fake_python):
    worker = ChatWorker(python=fake_python)
    try:
        first = ask(worker, "hello").pid
        with pytest.raises(ChatWorkerDied, match="while answering"):
            ask(worker, "die now")
        again = ask(worker, "hello")
        assert again.pid != first and again.notice is None  # the death was said already
    finally:
        worker.close()


def test_the_real_worker_leaves_when_idle(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests.trainers.test_evaluate import tiny_llama_with_adapter

    base_dir, adapter_dir = tiny_llama_with_adapter(tmp_path)
    worker = ChatWorker(idle_seconds=2.0, log_path=tmp_path / "chat-worker.log")
    messages = [{"role": "user", "content": "how do i reset"}]
    try:
        one = worker.ask(str(base_dir), str(adapter_dir), messages, max_new_tokens=4)
        assert one.loaded
        two = worker.ask(str(base_dir), str(adapter_dir), messages, max_new_tokens=4)
        assert two.pid == one.pid and not two.loaded and two.tuned == one.tuned
        deadline = time.monotonic() + 20
        while worker.pid is not None:  # it leaves on its own, exit 0
            assert time.monotonic() < deadline, "the idle worker did not leave"
            time.sleep(0.1)
        assert "idle for 2 s; exiting" in (tmp_path / "chat-worker.log").read_text()
        three = worker.ask(str(base_dir), str(adapter_dir), messages, max_new_tokens=4)
        assert three.pid != one.pid and three.loaded and three.notice is None
        assert three.tuned == one.tuned
        with pytest.raises(Exception, match="adapter_config"):
            worker.ask(str(base_dir), str(tmp_path), messages)
        assert worker.pid == three.pid  # a refused request leaves the worker running
    finally:
        worker.close()
