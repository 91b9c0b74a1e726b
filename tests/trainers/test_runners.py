"""The Runner interface (trainers.runner): OpenAI and the local worker driven the same way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.openai_api import FakeOpenAI
from tests.trainers.test_openai_ft import API_KEY, JOBS, MODEL, chat_jsonl
from trainers.errors import RunnerError
from trainers.local import PIDFILE, PROGRESS, RESULT, LocalRunner, Worker
from trainers.openai_ft import OpenAIError, OpenAIFineTuner
from trainers.openai_runner import OpenAIRunner
from trainers.runner import Handle, RunState, TrainingSpec
from trainers.runners import RUNNERS, runner_class

KEY = "tbtest:r1"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(API_KEY, polls_per_stage=1, running_polls=3) as fake:
        yield fake


@pytest.fixture
def runner(fake: FakeOpenAI) -> OpenAIRunner:
    return OpenAIRunner(OpenAIFineTuner.from_settings(API_KEY, fake.base_url, max_retries=0))


@pytest.fixture
def spec(tmp_path: Path) -> TrainingSpec:
    train = tmp_path / "train.jsonl"
    train.write_bytes(chat_jsonl(12))
    return TrainingSpec(run_id="r1", model=MODEL, train_file=train, hyperparameters={"epochs": 2})


def test_every_registered_runner_has_the_four_methods():
    assert {"openai", "local"} <= set(RUNNERS)
    for name in RUNNERS:
        cls = runner_class(name)
        assert cls.name == name
        for method in ("submit", "find", "poll", "cancel", "delete_file"):
            assert callable(getattr(cls, method)), (name, method)
    with pytest.raises(KeyError, match="no runner 'nope'"):
        runner_class("nope")


def test_openai_submits_once_per_key_and_tells_each_step(fake, runner, spec):
    steps: list[tuple[str, str]] = []
    first = runner.submit(spec, KEY, step=lambda what, value: steps.append((what, value)))
    again = runner.submit(spec, KEY, step=lambda what, value: steps.append((what, value)))
    assert [w for w, _ in steps] == ["uploading", "uploaded", "creating"]
    assert first.id == again.id and not first.reused and again.reused
    assert first.files == (steps[1][1],) and first.status == "queued"
    assert len(fake.calls_to("POST", "/files", exact=True)) == 1
    assert len(fake.calls_to("POST", JOBS, exact=True)) == 1
    assert runner.find(KEY).id == first.id and runner.find("tbtest:r2") is None


def test_a_step_that_raises_stops_before_the_job_and_the_retry_reuses_the_upload(
    fake, runner, spec
):
    def stop_after_upload(what: str, value: str) -> None:
        if what == "creating":
            raise RuntimeError("the claim was lost")

    with pytest.raises(RuntimeError, match="claim was lost"):
        runner.submit(spec, KEY, step=stop_after_upload)
    assert not fake.calls_to("POST", JOBS, exact=True)
    handle = runner.submit(spec, KEY)
    assert len(fake.calls_to("POST", "/files", exact=True)) == 1  # found by its name
    assert len(fake.calls_to("POST", JOBS, exact=True)) == 1 and handle.id


def test_openai_poll_maps_statuses_events_and_output(fake, runner, spec):
    handle = runner.submit(spec, KEY)
    states: list[RunState] = []
    cursor = None
    for _ in range(30):
        state = runner.poll(handle, cursor=cursor)
        states.append(state)
        cursor = state.cursor
        if state.terminal:
            break
    assert states[-1].status == "succeeded", [s.status for s in states]
    assert {s.status for s in states} <= {"queued", "running", "succeeded"}
    seen = [e.id for s in states for e in s.events]
    assert len(seen) == len(set(seen)) == len(fake.events(handle.id))  # each event once
    done = states[-1]
    assert done.output["fine_tuned_model"] == fake.job(handle.id)["fine_tuned_model"]
    assert done.trained_tokens and done.metrics and done.progress == 1.0


def test_openai_failure_carries_the_providers_message(fake, runner, spec):
    fake.fail_next_job = "The training file has too few examples."
    handle = runner.submit(spec, KEY)
    fake.run_to_end(handle.id)
    state = runner.poll(handle)
    assert state.status == "failed" and "too few examples" in state.error


def test_openai_errors_are_runner_errors_with_a_summary(fake, runner, spec):
    fake.inject("POST", "/files", 400, exact=True)
    with pytest.raises(RunnerError) as caught:
        runner.submit(spec, KEY)
    assert isinstance(caught.value, OpenAIError) and not caught.value.retryable
    assert caught.value.summary.startswith(caught.value.message)


def test_openai_cancel_and_delete_file(fake, runner, spec):
    handle = runner.submit(spec, KEY)
    runner.cancel(handle)
    assert fake.job(handle.id)["status"] == "cancelled"
    assert runner.delete_file(handle.files[0]) is True
    assert handle.files[0] not in fake.files


def write_run(run_dir: Path, events: list[dict], result: dict | None, pid: int = 0) -> Handle:
    run_dir.mkdir(parents=True)
    (run_dir / PROGRESS).write_text("".join(json.dumps(e) + "\n" for e in events))
    if result is not None:
        (run_dir / RESULT).write_text(json.dumps(result))
    (run_dir / PIDFILE).write_text(Worker(pid or 2**22 + 7, "gone").to_json())
    return Handle("local", f"pid:{pid}", where=str(run_dir))


def test_local_poll_reads_progress_and_result_as_a_run_state(tmp_path):
    runner = LocalRunner(tmp_path)
    events = [
        {"event": "start", "max_steps": 4},
        {"event": "step", "step": 1, "loss": 2.5, "max_steps": 4, "tokens_per_second": 900},
        {"event": "step", "step": 2, "loss": 2.0, "max_steps": 4, "eta_seconds": 12},
    ]
    done = write_run(
        tmp_path / "r1",
        events,
        {"status": "succeeded", "adapter_dir": "/runs/r1/adapter", "metrics": {"eval_loss": 1.9}},
    )
    state = runner.poll(done)
    assert (state.status, state.step, state.total_steps, state.train_loss) == (
        "succeeded", 2, 4, 2.0,
    )  # fmt: skip
    assert state.metrics == ((1, 2.5), (2, 2.0)) and state.eta_seconds == 12
    assert state.output["adapter_dir"] == "/runs/r1/adapter"
    died = runner.poll(write_run(tmp_path / "r2", events[:2], None))
    assert died.status == "failed" and "without a result" in died.error
    assert runner.find("tbtest:r2") is None  # its worker is not alive
    assert runner.run_dir("tb3f:r9") == tmp_path / "r9"
    assert runner.delete_file("anything") is False
