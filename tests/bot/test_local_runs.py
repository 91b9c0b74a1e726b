"""Local LoRA runs through the bot: queue, progress, cancel, resume, a dying worker.

Real training: the worker trains a tiny Llama built from a config (the
`tiny` fixture) in its own process, driven by signed Slack requests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

pytest.importorskip("torch", reason="local training needs the [local] extra")
pytest.importorskip("trl", reason="local training needs the [local] extra")

from tests.bot.test_runs import request, texts, upload
from tests.conftest import training_file
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)
from trainers import local

FAST = {"lr": 1e-2, "grad_accum": 1, "max_length": 128}


@pytest.fixture
def local_bot(paid_bot, tiny):  # noqa: F811 (tiny)
    homes = []

    def start(**overrides):
        bot = paid_bot(
            local_base_model=str(tiny.model),
            model_dirs=(str(tiny.root),),  # a folder model must be inside TUNEBOT_MODEL_DIRS
            default_provider="local",
            **overrides,
        )
        bot.workflow.runs.local_overrides.update(FAST)
        homes.append(bot.settings.home)
        return bot

    yield start
    for home in homes:  # a failed test must not leave a worker training
        for run_dir in (home / "runs").glob("*"):
            worker = local.worker_of(run_dir)
            if local.alive(worker):
                os.killpg(worker.pid, signal.SIGKILL)


def tick_until(bot, run_id: str, statuses, timeout: float = 420.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        run = bot.store.get_run(run_id)
        if run.status in statuses:
            return run
        time.sleep(0.5)
    raise AssertionError(f"{run_id} stayed {bot.store.get_run(run_id).status}")


def test_a_local_run_trains_reports_once_and_is_evaluated(local_bot):
    bot = local_bot()
    upload(bot, training_file(40))
    body = request(bot, "train provider=local epochs=2")
    assert "r1 accepted: it goes to the local GPU queue" in body["text"]
    run = tick_until(bot, "r1", ("running",), timeout=30)
    assert run.external_id.startswith("pid:")
    run = tick_until(bot, "r1", ("succeeded", "failed"))
    assert run.status == "succeeded", run.error
    assert (bot.workflow.runs.run_dir("r1") / "adapter" / "adapter_config.json").is_file()
    finals = [t for t in texts(bot) if t.startswith("<@UR> r1 🎉 succeeded")]
    assert len(finals) == 1 and "Adapter: `runs/r1/adapter`" in finals[0], finals
    assert "Final train loss" in finals[0] and str(bot.settings.home) not in finals[0]
    progress = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.progress_ts)
    assert progress["text"].startswith("r1 succeeded") and "step" in progress["text"]
    assert any(u.filename == "loss-r1.png" for u in bot.slack.uploads)
    bot.wait_idle()  # the evaluation: base vs tuned through the adapter, offline scorers
    summary = [t for t in texts(bot) if t.startswith("r1 evaluation:")]
    assert len(summary) == 1 and "5 held-out examples" in summary[0]
    tick_until(bot, "r1", ("succeeded",))
    assert len([t for t in texts(bot) if t.startswith("<@UR> r1 🎉 succeeded")]) == 1


def test_queue_cancel_with_checkpoint_and_resume(local_bot):
    bot = local_bot(local_slots=1)
    bot.workflow.runs.local_overrides.update(save_steps=2)
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=6")  # long enough to cancel mid-way
    request(bot, "train provider=local epochs=1")
    assert bot.store.get_run("r2").status == "queued"
    assert any("r2 queued for the local GPU: position 1 of 1" in t for t in texts(bot))

    run_dir = bot.workflow.runs.run_dir("r1")
    deadline = time.monotonic() + 120
    while not local.complete_checkpoints(run_dir):
        assert time.monotonic() < deadline, f"r1 saved no checkpoint:\n{local.log_tail(run_dir)}"
        time.sleep(0.5)
    _, body = bot.command("cancel r1", user_id="UR")
    assert "Stopping r1: it saves a checkpoint first" in body["text"]
    run = tick_until(bot, "r1", ("cancelled", "failed", "succeeded"))
    assert run.status == "cancelled"
    assert any("A checkpoint was saved: `/finetune resume r1`" in t for t in texts(bot))
    # The slot is free: r2 ran next, in FIFO order.
    assert tick_until(bot, "r2", ("succeeded", "failed")).status == "succeeded"

    _, body = bot.command("resume r1", user_id="UR")
    assert "r1 resumes from checkpoint-" in body["text"]
    assert tick_until(bot, "r1", ("succeeded", "failed")).status == "succeeded"
    starts = [e for e in local._events(run_dir / local.PROGRESS) if e.get("event") == "start"]
    assert starts[-1].get("resumed_from")
    assert {"cancel_requested", "resume_requested", "resumed"} <= {
        e.action for e in bot.store.audit_log(run_id="r1")
    }


def test_a_killed_worker_is_reported_with_its_log(local_bot):
    bot = local_bot()
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=25")
    run = tick_until(bot, "r1", ("running",), timeout=30)
    worker = local.worker_of(bot.workflow.runs.run_dir("r1"))
    deadline = time.monotonic() + 60
    while not local.read_state(bot.workflow.runs.run_dir("r1")).step:
        assert time.monotonic() < deadline, "r1 never reported a training step"
        time.sleep(0.5)
    os.killpg(worker.pid, signal.SIGKILL)
    run = tick_until(bot, "r1", ("failed",))
    assert "stopped without a result" in run.error
    final = [t for t in texts(bot) if t.startswith("<@UR> r1 ❌ failed")]
    assert len(final) == 1 and "`/finetune resume r1`" in final[0]


def test_a_failed_worker_is_told_in_words_and_its_log_is_a_file(local_bot):
    bot = local_bot()
    missing = "/nonexistent/tunebot-home/runs/r1/train.jsonl"
    bot.workflow.runs.local_overrides.update(train_file=missing)
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=1")
    run = tick_until(bot, "r1", ("failed", "succeeded"))
    assert run.status == "failed" and missing in run.error  # the record keeps the detail
    (final,) = [m for m in bot.slack.messages(channel="C1") if m["text"].startswith("<@UR> r1 ❌")]
    shown = final["text"] + json.dumps(final["blocks"])
    assert "Traceback" not in shown and "```" not in shown
    assert not re.search(r"(?<![\w:/.])/[\w.-]+/", shown), shown  # no absolute path
    assert str(bot.settings.home) not in shown and "lora.py" not in shown
    assert "What failed: the local training of" in final["text"]
    assert "Error: FileNotFoundError: train_file: train.jsonl does not exist" in final["text"]
    assert "Next: `/finetune resume r1`" in final["text"] and "worker-r1.log" in final["text"]
    (log,) = [u for u in bot.slack.uploads if u.filename == "worker-r1.log"]
    assert log.thread_ts == run.thread_ts and log.channel_id == "C1"
    assert b"Traceback (most recent call last)" in log.content and missing.encode() in log.content


def test_a_restarted_bot_reattaches_to_a_running_worker(local_bot, make_bot, tiny):  # noqa: F811
    bot = local_bot()
    upload(bot, training_file(40))
    request(bot, "train provider=local epochs=3")
    tick_until(bot, "r1", ("running",), timeout=30)
    again = make_bot(
        local_base_model=str(tiny.model), model_dirs=(str(tiny.root),), progress_seconds=0.0
    )
    assert local.alive(local.worker_of(again.workflow.runs.run_dir("r1")))
    run = tick_until(again, "r1", ("succeeded", "failed"))
    assert run.status == "succeeded"
    tick_until(bot, "r1", ("succeeded",))
    assert len([t for t in texts(bot) if t.startswith("<@UR> r1 🎉 succeeded")]) == 1
