"""trainers.together_ft through the real together SDK against FakeTogether on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import together

import trainers.together_ft as together_ft
from tests.fakes.together_api import FakeTogether, count_tokens, train_loss
from trainers.runner import Handle, RunnerError, RunState, TrainingSpec
from trainers.together_data import check_example, check_messages
from trainers.together_ft import (
    STATUSES,
    TogetherAPIError,
    TogetherRunner,
    create_arguments,
    file_name,
    unpack,
)

API_KEY = "tg-test-0123456789"
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
FILES = "/v1/files"
JOBS = "/v1/fine-tunes"
KEY = "tb3f9a:r7"


def chat_jsonl(n: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a concise support assistant."},
                {"role": "user", "content": f"How do I reset device {i}?"},
                {"role": "assistant", "content": f"Hold the power button of device {i}."},
            ]
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def fake() -> Iterator[FakeTogether]:
    with FakeTogether(API_KEY, polls_per_stage=1, running_polls=3) as fake:
        yield fake


@pytest.fixture
def runner(fake: FakeTogether) -> TogetherRunner:
    return TogetherRunner.from_settings(API_KEY, fake.base_url, max_retries=2, timeout=10)


@pytest.fixture
def train(tmp_path: Path) -> Path:
    path = tmp_path / "3f2a9c"  # a content-addressed blob: no .jsonl
    path.write_bytes(chat_jsonl(12))
    return path


def spec_for(train: Path, **hyper) -> TrainingSpec:
    return TrainingSpec(run_id="r7", model=MODEL, train_file=train, hyperparameters=hyper)


def uploads(fake: FakeTogether) -> list:
    return fake.calls_to("POST", FILES, exact=True)


def creates(fake: FakeTogether) -> list:
    return fake.calls_to("POST", JOBS, exact=True)


def poll_to_end(runner: TogetherRunner, handle: Handle, limit: int = 30) -> list[RunState]:
    states: list[RunState] = []
    cursor = None
    for _ in range(limit):
        state = runner.poll(handle, cursor=cursor)
        states.append(state)
        cursor = state.cursor
        if state.terminal:
            return states
    raise AssertionError(f"job {handle.id} still {states[-1].status} after {limit} polls")


# -- submit ------------------------------------------------------------------------


def test_submit_uploads_once_and_creates_a_lora_job(fake, runner, train):
    spec = TrainingSpec(
        run_id="r7",
        model=MODEL,
        train_file=train,
        hyperparameters={"epochs": 2, "batch": 4, "lr": 1e-4, "r": 8, "alpha": 16, "dropout": 0.05},
        suffix="support",
    )

    handle = runner.submit(spec, KEY)

    assert handle.runner == "together" and handle.id.startswith("ft-") and not handle.reused
    (upload,) = uploads(fake)
    assert upload.params["purpose"] == "fine-tune" and upload.params["file_type"] == "jsonl"
    assert upload.params["file_name"] == file_name(KEY) == handle_file_name(fake, handle)
    (put,) = fake.calls_to("PUT", "/upload/")
    assert put.body == train.read_bytes() and "authorization" not in put.headers
    assert len(fake.calls_to("POST", f"{FILES}/{handle.files[0]}/preprocess")) == 1
    (create,) = creates(fake)
    body = create.params
    assert body["model"] == MODEL and body["training_file"] == handle.files[0]
    assert (body["n_epochs"], body["batch_size"], body["learning_rate"]) == (2, 4, 1e-4)
    assert body["training_type"] == {
        "type": "Lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_trainable_modules": "all-linear",
    }
    assert body["training_method"] == {"method": "sft", "train_on_inputs": "auto"}
    assert body["suffix"] == "support"
    assert fake.job(handle.id)["status"] == "pending"


def handle_file_name(fake: FakeTogether, handle: Handle) -> str:
    return fake.files[handle.files[0]]["filename"]


def test_lora_false_is_a_full_fine_tune(fake, runner, train):
    handle = runner.submit(spec_for(train, lora=False, epochs=1), KEY)

    assert creates(fake)[0].params["training_type"] == {"type": "Full"}
    assert fake.job(handle.id)["adapter_output_name"] is None


def test_the_lora_rank_defaults_to_the_models_and_alpha_to_twice_it(fake, runner, train):
    runner.submit(spec_for(train), KEY)

    body = creates(fake)[0].params
    assert (body["training_type"]["lora_r"], body["training_type"]["lora_alpha"]) == (8, 16)
    assert body["n_epochs"] == 1 and body["batch_size"] == "max"  # Together's defaults
    assert len(fake.calls_to("GET", f"{JOBS}/models/limits")) == 1


def test_an_eval_file_is_uploaded_and_evaluated_once(fake, runner, train, tmp_path):
    valid = tmp_path / "valid"
    valid.write_bytes(chat_jsonl(4))
    spec = TrainingSpec(run_id="r7", model=MODEL, train_file=train, eval_file=valid)

    handle = runner.submit(spec, KEY)

    assert [c.params["file_name"] for c in uploads(fake)] == [
        file_name(KEY, "train"),
        file_name(KEY, "eval"),
    ]
    body = creates(fake)[0].params
    assert body["validation_file"] == handle.files[1] != handle.files[0]
    assert body["n_evals"] == 1


def test_a_second_submit_finds_the_job_and_sends_nothing(fake, runner, train):
    first = runner.submit(spec_for(train), KEY)
    again = runner.submit(spec_for(train), KEY)

    assert again.id == first.id and again.reused and again.files == first.files
    assert len(uploads(fake)) == 1 and len(creates(fake)) == 1
    assert runner.find(KEY) == again
    assert runner.find("tb3f9a:r8") is None

    other = runner.submit(spec_for(train), "tb3f9a-r7")  # the same once made safe
    assert other.id != first.id and file_name("tb3f9a-r7") != file_name(KEY)
    assert len(creates(fake)) == 2


def test_twenty_concurrent_submits_make_one_upload_and_one_job(fake, runner, train):
    fake.upload_delay = 0.2  # widen the window between upload and create
    barrier = threading.Barrier(20)

    def submit(_: int) -> Handle:
        barrier.wait()
        return runner.submit(spec_for(train, epochs=1), KEY)

    with ThreadPoolExecutor(20) as pool:
        handles = list(pool.map(submit, range(20)))

    assert len({h.id for h in handles}) == 1
    assert sum(not h.reused for h in handles) == 1
    assert len(uploads(fake)) == 1 and len(fake.calls_to("PUT", "/upload/")) == 1
    assert len(creates(fake)) == 1 and len(fake.jobs()) == 1


def test_a_submit_that_dies_after_the_upload_is_retried_without_a_second_upload(
    fake, runner, train
):
    steps: list[tuple[str, str]] = []

    def lost_claim(name: str, value: str) -> None:
        steps.append((name, value))
        if name == "uploaded":
            raise RuntimeError("claim lost")

    with pytest.raises(RuntimeError, match="claim lost"):
        runner.submit(spec_for(train), KEY, step=lost_claim)
    assert len(uploads(fake)) == 1 and fake.jobs() == []

    handle = runner.submit(spec_for(train), KEY, step=lambda n, v: steps.append((n, v)))

    assert len(uploads(fake)) == 1 and len(creates(fake)) == 1
    file_id = handle.files[0]
    assert steps == [("uploaded", file_id), ("uploaded", file_id), ("created", handle.id)]


def test_an_upload_of_another_size_is_not_reused(fake, runner, train):
    def stop(name: str, value: str) -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        runner.submit(spec_for(train), KEY, step=stop)
    (first,) = fake.files
    train.write_bytes(chat_jsonl(13))  # not the bytes uploaded for the key before

    handle = runner.submit(spec_for(train), KEY)

    assert len(uploads(fake)) == 2 and len(creates(fake)) == 1
    assert handle.files[0] != first


# -- create retries ------------------------------------------------------------------


def test_a_create_answered_500_once_still_makes_exactly_one_job(fake, runner, train):
    fake.inject("POST", JOBS, 500, exact=True, retry_after=0.01)

    handle = runner.submit(spec_for(train), KEY)

    assert [c.status for c in creates(fake)] == [500, 200]
    assert [j["id"] for j in fake.jobs()] == [handle.id]


def test_a_create_that_reached_together_but_lost_its_reply_is_not_repeated(fake, runner, train):
    fake.inject("POST", JOBS, 502, exact=True, retry_after=0.01, after_handling=True)

    handle = runner.submit(spec_for(train), KEY)

    assert len(creates(fake)) == 1
    assert [j["id"] for j in fake.jobs()] == [handle.id]


def test_the_sdk_alone_would_repeat_such_a_create(fake, runner, train):
    # Why submit() makes its own create retries: the SDK sends no idempotency key.
    handle = runner.submit(spec_for(train), KEY)
    client = together.Together(api_key=API_KEY, base_url=fake.base_url, max_retries=1)
    fake.inject("POST", JOBS, 502, exact=True, retry_after=0.01, after_handling=True)

    client.fine_tuning.create(training_file=handle.files[0], model=MODEL, train_on_inputs="auto")

    assert len(fake.jobs()) == 3
    assert not any("idempotency-key" in c.headers for c in creates(fake))


def test_a_429_on_the_upload_is_retried_by_the_sdk(fake, runner, train):
    fake.inject("POST", FILES, 429, exact=True, retry_after=0.01)

    handle = runner.submit(spec_for(train), KEY)

    assert [c.status for c in uploads(fake)] == [429, 302]
    assert [j["id"] for j in fake.jobs()] == [handle.id]


def test_a_create_refused_past_the_retries_is_retryable_and_makes_no_job(fake, runner, train):
    fake.inject("POST", JOBS, 503, times=3, exact=True, retry_after=0.01)

    with pytest.raises(TogetherAPIError) as caught:
        runner.submit(spec_for(train), KEY)

    err = caught.value
    assert isinstance(err, RunnerError) and err.retryable and err.status == 503
    assert err.provider_message == "Service unavailable. Please try again later."
    assert "next poll" in str(err)
    assert len(creates(fake)) == 3 and fake.jobs() == []

    handle = runner.submit(spec_for(train), KEY)  # later: the upload is reused
    assert len(uploads(fake)) == 1 and [j["id"] for j in fake.jobs()] == [handle.id]


def test_rate_limited_past_the_retries_is_a_retryable_error(fake, runner, train):
    handle = runner.submit(spec_for(train), KEY)
    fake.inject("GET", f"{JOBS}/{handle.id}", 429, times=5, retry_after=0.01, exact=True)

    with pytest.raises(TogetherAPIError) as caught:
        runner.poll(handle)

    assert caught.value.status == 429 and caught.value.retryable
    assert caught.value.provider_message == "Rate limit exceeded. Please retry later."
    assert len(fake.calls_to("GET", f"{JOBS}/{handle.id}", exact=True)) == 3  # max_retries=2


def test_an_unreachable_server_is_a_retryable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = TogetherRunner.from_settings(API_KEY, f"http://127.0.0.1:{port}", max_retries=0)

    with pytest.raises(TogetherAPIError) as caught:
        runner.poll(Handle("together", "ft-1"))

    assert caught.value.status is None and caught.value.retryable
    assert "could not reach Together" in str(caught.value)


def test_a_wrong_api_key_is_a_401_that_is_not_retried(fake, train):
    runner = TogetherRunner.from_settings("tg-wrong", fake.base_url, max_retries=2)

    with pytest.raises(TogetherAPIError) as caught:
        runner.submit(spec_for(train), KEY)

    err = caught.value
    assert err.status == 401 and not err.retryable and "TOGETHER_API_KEY" in str(err)
    assert err.provider_message == "Invalid API key provided."
    assert len(fake.calls) == 1 and fake.files == {}


def test_an_unknown_model_is_refused_with_togethers_words(fake, runner, train):
    with pytest.raises(TogetherAPIError) as caught:
        runner.submit(TrainingSpec(run_id="r7", model="acme/nope", train_file=train), KEY)

    assert caught.value.status == 404 and not caught.value.retryable
    assert "is not available for fine-tuning" in caught.value.provider_message
    assert creates(fake) == []


# -- data Together refuses ---------------------------------------------------------


def test_data_the_server_rejects_fails_with_its_message_and_no_job(fake, runner, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(chat_jsonl(2) + b'{"text": "plain text"}\n')

    with pytest.raises(TogetherAPIError) as caught:
        runner.submit(spec_for(bad), KEY)

    assert not caught.value.retryable
    assert caught.value.provider_message == "Line 3: missing a non-empty 'messages' list"
    assert "rejected the training data" in str(caught.value)
    assert creates(fake) == []


def test_a_line_that_is_not_json_is_refused_by_the_sdk_before_any_upload(fake, runner, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(chat_jsonl(2) + b"{not json\n")

    with pytest.raises(TogetherAPIError) as caught:
        runner.submit(spec_for(bad), KEY)

    assert not caught.value.retryable and "line 3" in caught.value.provider_message
    assert uploads(fake) == []


# -- poll ----------------------------------------------------------------------------


def test_polling_to_success_gives_events_progress_output_tokens_and_cost(fake, runner, train):
    handle = runner.submit(spec_for(train, epochs=2, batch=3), KEY)

    states = poll_to_end(runner, handle)

    final = states[-1]
    seen = [s.status for s in states]
    assert seen[0] == "queued" and "running" in seen and final.status == "succeeded"
    assert final.error is None and final.progress == 1.0
    job = fake.job(handle.id)
    assert final.output == {"fine_tuned_model": job["model_output_name"]}
    total = 2 * 4  # epochs x ceil(12 examples / batch 3)
    assert final.metrics == tuple((s, train_loss(s)) for s in range(1, total + 1))
    assert (final.step, final.total_steps, final.train_loss) == (total, total, train_loss(total))
    assert final.trained_tokens == job["token_count"] == 2 * count_tokens(train.read_bytes())[1]
    assert final.cost_usd == pytest.approx(job["total_price"] / 1e9) and final.cost_usd > 0

    events = [e for s in states for e in s.events]
    assert [e.message for e in events] == [e["message"] for e in fake.events(handle.id)]
    assert len({e.id for e in events}) == len(events)  # nothing repeated across polls
    assert events[0].message == "Fine-tune request created"
    assert events[-1].message.endswith(job["model_output_name"])
    assert all(e.created_at > 1_700_000_000 for e in events)
    running = [s for s in states if s.status == "running" and s.step]
    assert running and all(0 < s.progress <= 1 for s in running)
    assert final.cursor == str(len(events))


def test_a_poll_with_no_new_events_keeps_the_cursor(fake, runner, train):
    fake.advance_on_get = False
    handle = runner.submit(spec_for(train), KEY)
    first = runner.poll(handle)

    again = runner.poll(handle, cursor=first.cursor)

    assert first.events and again.events == ()
    assert again.cursor == first.cursor == "1"
    assert again.step is None and again.progress is None and again.cost_usd is None
    assert len(fake.calls_to("GET", f"{JOBS}/{handle.id}/metrics")) == 0  # not started


def test_progress_part_way_through(fake, runner, train):
    fake.advance_on_get = False
    handle = runner.submit(spec_for(train, epochs=3, batch=4), KEY)
    fake.advance(handle.id, 3)  # queued, running, a third of the steps

    state = runner.poll(handle)

    assert state.status == "running"
    assert (state.step, state.total_steps, state.train_loss) == (3, 9, train_loss(3))
    assert state.progress == pytest.approx(1 / 3)
    assert state.trained_tokens and state.cost_usd  # tokenized once running


def test_a_failing_job_surfaces_togethers_message(fake, runner, train):
    fake.fail_next_job = "Out of memory: reduce max_seq_length or batch_size"
    handle = runner.submit(spec_for(train), KEY)

    final = poll_to_end(runner, handle)[-1]

    assert final.status == "failed" and final.terminal
    assert final.error == "Out of memory: reduce max_seq_length or batch_size"
    assert final.output == {} and final.metrics == ()
    assert any(e.level == "error" and e.message == final.error for e in final.events)


def test_a_job_failing_mid_run_keeps_its_progress(fake, runner, train):
    fake.advance_on_get = False
    handle = runner.submit(spec_for(train, epochs=3, batch=4), KEY)
    fake.advance(handle.id, 4)
    fake.fail(handle.id, "CUDA error: an illegal memory access was encountered")

    state = runner.poll(handle)

    assert state.status == "failed" and state.error.startswith("CUDA error")
    assert state.step == 6 and state.metrics[-1] == (6, train_loss(6))


def test_cancel(fake, runner, train):
    handle = runner.submit(spec_for(train), KEY)
    runner.poll(handle)

    runner.cancel(handle)

    assert fake.job(handle.id)["status"] == "cancel_requested"
    assert runner.poll(handle).status == "cancelled"  # the fake stops it at the next tick
    runner.cancel(handle)  # cancelling an ended job is harmless and sends no cancel
    assert len(fake.calls_to("POST", f"{JOBS}/{handle.id}/cancel")) == 1


def test_delete_file_removes_the_upload_once(fake, runner, train):
    handle = runner.submit(spec_for(train), KEY)
    assert runner.delete_file(handle.files[0]) is True
    assert runner.delete_file(handle.files[0]) is False  # already gone
    assert len(fake.calls_to("DELETE", f"{FILES}/{handle.files[0]}")) == 2


def test_cancel_of_a_finished_job_leaves_it_alone(fake, runner, train):
    handle = runner.submit(spec_for(train), KEY)
    fake.run_to_end(handle.id)

    runner.cancel(handle)

    assert fake.job(handle.id)["status"] == "completed"
    assert fake.calls_to("POST", f"{JOBS}/{handle.id}/cancel") == []


def test_an_unknown_job_is_a_404(fake, runner):
    with pytest.raises(TogetherAPIError) as caught:
        runner.poll(Handle("together", "ft-nope"))
    assert caught.value.status == 404 and not caught.value.retryable


def test_every_together_status_has_a_runstate_status():
    from together.lib.types.fine_tuning import FinetuneJobStatus

    assert {s.value for s in FinetuneJobStatus} == set(STATUSES)
    assert set(STATUSES.values()) == {"queued", "running", "succeeded", "failed", "cancelled"}


# -- download ------------------------------------------------------------------------


def test_download_the_adapter_and_unpack_it(fake, runner, train, tmp_path):
    handle = runner.submit(spec_for(train, r=16, alpha=32), KEY)
    fake.run_to_end(handle.id)

    archive = runner.download(handle, tmp_path / "out")

    name = fake.job(handle.id)["model_output_name"].replace("/", "-")
    assert archive == tmp_path / "out" / f"{name}-adapter.tar.gz"
    assert archive.read_bytes() == fake.adapter_archive(handle.id)
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # no temporary left
    (call,) = fake.calls_to("GET", "/v1/finetune/download")
    assert call.query == {"ft_id": handle.id, "checkpoint": "adapter"}

    unpacked = unpack(archive, tmp_path / "adapter")
    config = json.loads((unpacked / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (16, 32, MODEL)
    assert (unpacked / "adapter_model.safetensors").is_file()

    merged = runner.download(handle, tmp_path / "out", kind="merged")
    assert merged.name.endswith("-merged.tar.gz") and merged != archive


def test_download_refuses_an_unfinished_job_and_a_kind_it_lacks(fake, runner, train, tmp_path):
    handle = runner.submit(spec_for(train), KEY)

    with pytest.raises(RunnerError, match="only a completed job"):
        runner.download(handle, tmp_path / "out")
    fake.run_to_end(handle.id)
    with pytest.raises(RunnerError, match="not 'model'"):
        runner.download(handle, tmp_path / "out", kind="model")
    with pytest.raises(ValueError, match="kind"):
        runner.download(handle, tmp_path / "out", kind="gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_full_fine_tune_downloads_its_model(fake, runner, train, tmp_path):
    handle = runner.submit(spec_for(train, lora=False), KEY)
    fake.run_to_end(handle.id)

    archive = runner.download(handle, tmp_path, kind="model")

    assert archive.name.endswith("-model.tar.gz")
    assert (unpack(archive, tmp_path / "m") / "config.json").is_file()


def test_unpack_of_zstd_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    archive = tmp_path / "x-adapter.tar.zst"
    archive.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as when it is not installed

    with pytest.raises(RunnerError, match="zstandard"):
        unpack(archive, tmp_path / "into")


def test_archive_suffix_follows_the_first_bytes():
    assert together_ft._suffix(b"\x28\xb5\x2f\xfd\x00") == ".tar.zst"
    assert together_ft._suffix(b"\x1f\x8b\x08") == ".tar.gz"
    assert together_ft._suffix(b"adapter_") == ".tar"


# -- price ---------------------------------------------------------------------------


def test_quote_asks_together_and_submit_reuses_its_upload(fake, runner, train):
    spec = spec_for(train, epochs=3)

    quote = runner.quote(spec, KEY)

    tokens = 3 * count_tokens(train.read_bytes())[1]
    assert quote.available and quote.train_tokens == tokens and quote.eval_tokens == 0
    assert quote.total_usd == pytest.approx(tokens * 0.48 / 1e6, abs=1e-6)
    assert quote.allowed and quote.limit_usd == 100.0
    (ask,) = fake.calls_to("POST", f"{JOBS}/estimate-price")
    assert ask.params["training_type"] == {"type": "Lora", "lora_r": 8, "lora_alpha": 16}
    assert ask.params["training_method"] == {"method": "sft", "train_on_inputs": "auto"}

    handle = runner.submit(spec, KEY)
    assert handle.files == quote.files and len(uploads(fake)) == 1


def test_quote_of_a_full_fine_tune_over_the_credit_limit(fake, runner, train):
    fake.credit_limit_usd = 0.0

    quote = runner.quote(spec_for(train, lora=False), KEY)

    assert quote.available and not quote.allowed
    assert fake.calls_to("POST", f"{JOBS}/estimate-price")[0].params["training_type"] == {
        "type": "Full"
    }


# -- the spec ------------------------------------------------------------------------


def test_create_arguments_maps_the_hyperparameters(train, tmp_path):
    valid = tmp_path / "v.jsonl"
    valid.write_bytes(chat_jsonl(1))
    spec = TrainingSpec(
        run_id="r",
        model=MODEL,
        train_file=train,
        eval_file=valid,
        hyperparameters={
            "epochs": 3,
            "batch": "max",
            "lr": 2e-4,
            "r": 32,
            "alpha": 64,
            "dropout": 0.1,
            "targets": ["q_proj", "v_proj"],
            "max_length": 4096,
            "n_evals": 5,
            "seed": 42,
            "warmup_ratio": 0.1,
            "lr_mult": None,  # None: the backend's default, taken as absent
        },
        suffix="sup",
    )

    assert create_arguments(spec) == {
        "model": MODEL,
        "lora": True,
        "training_method": "sft",
        "train_on_inputs": "auto",
        "n_epochs": 3,
        "batch_size": "max",
        "learning_rate": 2e-4,
        "lora_r": 32,
        "lora_alpha": 64.0,
        "lora_dropout": 0.1,
        "lora_trainable_modules": "q_proj,v_proj",
        "max_seq_length": 4096,
        "n_evals": 5,
        "random_seed": 42,
        "warmup_ratio": 0.1,
        "suffix": "sup",
    }


@pytest.mark.parametrize(
    ("hyper", "suffix", "words"),
    [
        ({"lr_mult": 2.0}, None, "does not take the hyper-parameter(s) lr_mult"),
        ({"lora": False, "r": 8}, None, "r apply to LoRA only"),
        ({"lora": "yes"}, None, "lora must be true or false"),
        ({"epochs": 0}, None, "epochs must be an integer of at least 1"),
        ({"batch": 2.5}, None, "batch must be"),
        ({"dropout": 1.0}, None, "dropout must be"),
        ({"lr": float("nan")}, None, "lr must be"),
        ({"n_evals": 2}, None, "n_evals needs an eval file"),
        ({"beta": 0.1}, None, "beta applies to method=dpo only"),
        ({"method": "rft"}, None, "method must be"),
        ({}, "x" * 41, "suffix must be 1..40"),
    ],
)
def test_a_spec_together_cannot_take_is_refused_before_any_request(
    fake, runner, train, hyper, suffix, words
):
    spec = TrainingSpec(
        run_id="r", model=MODEL, train_file=train, hyperparameters=hyper, suffix=suffix
    )

    with pytest.raises(RunnerError, match=re.escape(words)):
        runner.submit(spec, KEY)

    assert fake.calls == []


def test_dpo_is_passed_with_its_beta(fake, runner, train):
    assert create_arguments(spec_for(train, method="dpo", beta=0.2))["dpo_beta"] == 0.2
    assert "train_on_inputs" not in create_arguments(spec_for(train, method="dpo"))


def test_keys_and_file_names():
    assert file_name(KEY).startswith("tunebot-tb3f9a-r7-") and file_name(KEY).endswith(
        "-train.jsonl"
    )
    assert file_name(KEY, "eval").endswith("-eval.jsonl")
    with pytest.raises(ValueError, match="key is empty"):
        file_name("")
    with pytest.raises(ValueError, match="key is over"):
        file_name("k" * 65)


def test_a_missing_train_file_is_refused_before_any_request(fake, runner, tmp_path):
    with pytest.raises(RunnerError, match="no such file"):
        runner.submit(spec_for(tmp_path / "gone.jsonl"), KEY)
    assert fake.calls == []


# -- settings ------------------------------------------------------------------------


def test_before_request_runs_before_every_request(fake, train, tmp_path):
    seen: list[int] = []
    runner = TogetherRunner.from_settings(
        API_KEY, fake.base_url, before_request=lambda: seen.append(1)
    )
    handle = runner.submit(spec_for(train), KEY)
    fake.run_to_end(handle.id)
    runner.download(handle, tmp_path)

    assert len(seen) == len(fake.calls) > 8  # the upload's PUT and the download's redirect too


def test_from_settings_checks_its_input():
    with pytest.raises(ValueError, match="TOGETHER_API_KEY"):
        TogetherRunner.from_settings("", None)
    with pytest.raises(ValueError, match="max_retries"):
        TogetherRunner.from_settings("k", None, max_retries=-1)
    client = TogetherRunner.from_settings("k")._client
    assert str(client.base_url).rstrip("/") == "https://api.together.ai"


def test_importing_the_module_does_not_import_together():
    code = "import sys, trainers.together_ft, trainers.together_data; sys.exit('together' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- Together's data rules -----------------------------------------------------------


def codes(findings) -> list[str]:
    return [f.code for f in findings]


def test_a_good_conversation_has_no_findings():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "weight": 1},
        {"role": "user", "content": [{"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "Done.", "reasoning": "short"},
    ]
    assert check_messages(messages) == []
    assert check_example({"messages": messages}, line=3) == []


def test_tool_calls_and_results_in_order_are_fine():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "assistant", "content": "18C in Paris."},
    ]
    assert check_messages(messages) == []


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"role": "assistant", "content": "Hi"}], "together_first_role"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "together_alternation",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "together_alternation",
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "c"},
            ],
            "together_alternation",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "tool", "content": "c"},
            ],
            "together_tool_order",
        ),
        ([{"role": "user", "content": "a"}], "together_no_assistant"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 0.5},
            ],
            "together_weight",
        ),
        (
            [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}],
            "together_content",
        ),
        ([{"role": "developer", "content": "a"}], "together_role"),
        ([], "together_not_messages"),
    ],
)
def test_broken_conversations(messages, code):
    findings = check_messages(messages, line=7)
    assert code in codes(findings)
    assert all(f.line == 7 and f.severity == "error" for f in findings)


def test_two_formats_on_one_line_and_lines_without_messages():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert codes(check_example({**row, "text": "x"})) == ["together_mixed_format"]
    assert codes(check_example({"prompt": "p", "completion": "c"})) == ["together_not_messages"]
    assert codes(check_example(["not", "an", "object"])) == ["together_not_messages"]
