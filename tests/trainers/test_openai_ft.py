"""trainers.openai_ft through the real openai SDK against FakeOpenAI on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import trainers.openai_ft as openai_ft
from tests.fakes.openai_api import FakeOpenAI, count_tokens, train_loss
from trainers.openai_ft import TERMINAL, Job, JobState, OpenAIError, OpenAIFineTuner

API_KEY = "sk-test-0123456789"
MODEL = "gpt-4o-mini-2024-07-18"
JOBS = "/fine_tuning/jobs"


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
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(API_KEY, polls_per_stage=1, running_polls=3) as fake:
        yield fake


@pytest.fixture
def tuner(fake: FakeOpenAI) -> OpenAIFineTuner:
    return OpenAIFineTuner.from_settings(API_KEY, fake.base_url, max_retries=2, timeout=10)


@pytest.fixture
def train(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_jsonl(12))
    return path


def creates(fake: FakeOpenAI) -> list:
    return fake.calls_to("POST", JOBS, exact=True)


def poll_to_end(tuner: OpenAIFineTuner, job_id: str, limit: int = 50) -> list[JobState]:
    states: list[JobState] = []
    last = None
    for _ in range(limit):
        state = tuner.poll(job_id, after_event_id=last)
        states.append(state)
        last = state.last_event_id
        if state.terminal:
            return states
    raise AssertionError(f"job {job_id} still {states[-1].status} after {limit} polls")


# -- start -----------------------------------------------------------------------


def test_start_uploads_and_creates_with_method_metadata_and_suffix(fake, tuner, train, tmp_path):
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(chat_jsonl(10))

    job = tuner.start(
        "run-1",
        train,
        MODEL,
        validation_path=valid,
        epochs=2,
        batch_size=4,
        lr_multiplier=0.5,
        suffix="support",
        seed=7,
    )

    assert isinstance(job, Job)
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.model == MODEL and not job.reused
    uploads = fake.calls_to("POST", "/files")
    assert [c.params["purpose"] for c in uploads] == ["fine-tune", "fine-tune"]
    assert [c.params["file"].content for c in uploads] == [train.read_bytes(), valid.read_bytes()]
    assert job.training_file == fake.jobs()[0]["training_file"]
    (create,) = creates(fake)
    body = create.params
    assert body["model"] == MODEL
    assert body["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
        },
    }
    assert "hyperparameters" not in body  # the deprecated top-level form
    assert body["metadata"] == {"tunebot_key": "run-1"}
    assert body["suffix"] == "support" and body["seed"] == 7
    assert body["training_file"] == job.training_file
    assert body["validation_file"] == job.validation_file != job.training_file


def test_only_the_given_hyperparameters_are_sent(fake, tuner, train):
    tuner.start("run-1", train, MODEL, epochs=3)

    body = creates(fake)[0].params
    assert body["method"]["supervised"]["hyperparameters"] == {"n_epochs": 3}
    assert not {"suffix", "seed", "validation_file"} & body.keys()


def test_a_second_start_with_the_same_run_id_returns_the_existing_job(fake, tuner, train):
    first = tuner.start("run-1", train, MODEL, epochs=1)
    again = tuner.start("run-1", train, MODEL, epochs=1)

    assert again.id == first.id and again.reused
    assert len(creates(fake)) == 1
    assert len(fake.calls_to("POST", "/files")) == 1  # nothing uploaded the second time
    lookups = fake.calls_to("GET", JOBS, exact=True)
    assert lookups[-1].query["metadata[tunebot_key]"] == "run-1"

    other = tuner.start("run-2", train, MODEL, epochs=1)
    assert other.id != first.id and not other.reused
    assert len(creates(fake)) == 2
    assert tuner.find("run-1").id == first.id
    assert tuner.find("run-3") is None


def test_the_run_id_is_checked_even_if_the_api_ignores_the_filter(fake, tuner, train):
    job = tuner.start("run-1", train, MODEL)
    for i in range(3):
        tuner.start(f"other-{i}", train, MODEL)
    fake.ignore_metadata_filter = True

    again = tuner.start("run-1", train, MODEL)

    assert again.id == job.id and again.reused
    assert len(creates(fake)) == 4


def test_a_create_answered_500_once_still_makes_exactly_one_job(fake, tuner, train):
    fake.inject("POST", JOBS, 500, exact=True, retry_after=0.01)

    job = tuner.start("run-1", train, MODEL)

    assert [c.status for c in creates(fake)] == [500, 200]
    assert [j["id"] for j in fake.jobs()] == [job.id]


def test_a_create_that_reached_openai_but_lost_its_reply_is_not_repeated(fake, tuner, train):
    # A 502 from a proxy after OpenAI created the job: a blind retry would pay twice.
    fake.inject("POST", JOBS, 502, exact=True, retry_after=0.01, after_handling=True)

    job = tuner.start("run-1", train, MODEL)

    assert len(creates(fake)) == 1
    assert [j["id"] for j in fake.jobs()] == [job.id]


def test_the_sdk_alone_would_repeat_such_a_create(fake, train):
    # Why start() does its own create retries: openai 3.x sends no idempotency key.
    client = openai.OpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=1)
    file_id = fake.add_file(train.read_bytes())["id"]
    fake.inject("POST", JOBS, 502, exact=True, retry_after=0.01, after_handling=True)

    client.fine_tuning.jobs.create(model=MODEL, training_file=file_id)

    assert len(fake.jobs()) == 2
    assert not any("idempotency-key" in c.headers for c in creates(fake))


def test_a_429_with_retry_after_0_is_retried_by_the_sdk(fake, tuner, train):
    fake.inject("POST", "/files", 429, retry_after=0)
    fake.inject("GET", JOBS, 429, exact=True, retry_after=0)

    job = tuner.start("run-1", train, MODEL)

    # Retry-After: 0 is not "now" to openai 3.x: it falls back to its backoff
    # (0.5 s less jitter), so two of them take about a second.
    assert [c.status for c in fake.calls_to("POST", "/files")] == [429, 200]
    assert [c.status for c in fake.calls_to("GET", JOBS, exact=True)] == [429, 200]
    assert fake.calls_to("POST", "/files")[1].headers["x-stainless-retry-count"] == "1"
    assert fake.calls_to("GET", JOBS, exact=True)[1].headers["x-stainless-retry-count"] == "1"
    assert len(fake.jobs()) == 1 and fake.jobs()[0]["id"] == job.id


def test_a_429_on_create_is_retried_and_still_makes_one_job(fake, tuner, train):
    fake.inject("POST", JOBS, 429, exact=True, retry_after=0)

    job = tuner.start("run-1", train, MODEL)

    assert [c.status for c in creates(fake)] == [429, 200]
    assert [j["id"] for j in fake.jobs()] == [job.id]


def test_rate_limited_past_the_retries_is_a_retryable_openai_error(fake, tuner, train):
    job = tuner.start("run-1", train, MODEL)
    fake.inject("GET", f"{JOBS}/{job.id}", 429, times=5, retry_after=0.01, exact=True)

    with pytest.raises(OpenAIError) as caught:
        tuner.poll(job.id)

    err = caught.value
    assert err.status == 429 and err.retryable
    assert "rate limited" in err.meaning and "next poll" in err.meaning
    assert err.message == "Rate limit reached for requests."
    assert len(fake.calls_to("GET", f"{JOBS}/{job.id}", exact=True)) == 3  # max_retries=2


def test_training_not_available_surfaces_code_message_and_meaning(fake, tuner, train):
    text = "Fine-tuning is no longer available for this organization."
    fake.inject(
        "POST",
        JOBS,
        403,
        exact=True,
        body={
            "error": {
                "code": "training_not_available",
                "message": text,
                "type": "invalid_request_error",
                "param": None,
            }
        },
    )

    with pytest.raises(OpenAIError) as caught:
        tuner.start("run-1", train, MODEL)

    err = caught.value
    assert isinstance(err, RuntimeError)
    assert (err.status, err.code, err.message) == (403, "training_not_available", text)
    assert "2027-01-06" in err.meaning and not err.retryable
    assert text in str(err) and err.meaning in str(err)
    assert len(creates(fake)) == 1  # a refusal is not retried
    assert fake.files == {}  # the uploaded training file was removed again
    assert fake.jobs() == []


def test_an_unknown_training_file_is_a_400(fake, tuner):
    client = openai.OpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    assert caught.value.code == "invalid_training_file"
    assert caught.value.param == "training_file"


# -- poll ------------------------------------------------------------------------


def test_polling_to_success_gives_model_tokens_events_and_step_metrics(fake, tuner, train):
    job = tuner.start("run-1", train, MODEL, epochs=2, batch_size=3, suffix="support")

    states = poll_to_end(tuner, job.id)

    final = states[-1]
    seen = [s.status for s in states]
    assert seen[0] == "queued" and "running" in seen and final.status == "succeeded"
    assert final.terminal and final.error is None and final.progress == 1.0
    assert final.fine_tuned_model == f"ft:{MODEL}:org-tunebot:support:fake000002"
    assert final.trained_tokens == 2 * count_tokens(train.read_bytes())[1]
    total = 2 * 4  # epochs x ceil(12 examples / batch 3)
    assert final.metrics == tuple((s, train_loss(s)) for s in range(1, total + 1))
    assert (final.step, final.total_steps, final.train_loss) == (total, total, train_loss(total))
    assert len(final.result_files) == 1

    events = [e for s in states for e in s.events]
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))  # nothing repeated across polls
    assert ids == [e["id"] for e in fake.events(job.id)]  # everything, oldest first
    assert events[0].message.startswith("Created fine-tuning job")
    assert events[-1].message == "The job has successfully completed"
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == list(range(1, total + 1))
    running = [s for s in states if s.status == "running" and s.step is not None]
    assert running and all(0 < s.progress < 1 for s in running)
    assert all(s.estimated_finish is not None for s in running)
    assert final.last_event_id == ids[-1]


def test_events_span_several_pages_without_gaps(fake, tuner, train, monkeypatch):
    monkeypatch.setattr(openai_ft, "EVENT_PAGE_SIZE", 4)
    job = tuner.start("run-1", train, MODEL, epochs=2)

    states = poll_to_end(tuner, job.id)

    ids = [e.id for s in states for e in s.events]
    assert ids == [e["id"] for e in fake.events(job.id)]
    assert len(fake.calls_to("GET", f"{JOBS}/{job.id}/events")) > len(states)


def test_a_poll_with_no_new_events_keeps_the_last_event_id(fake, tuner, train):
    fake.advance_on_get = False
    job = tuner.start("run-1", train, MODEL)
    first = tuner.poll(job.id)

    again = tuner.poll(job.id, after_event_id=first.last_event_id)

    assert first.events and again.events == ()
    assert again.last_event_id == first.last_event_id
    assert again.step is None and again.progress is None


def test_progress_is_read_from_events_older_than_the_known_one(fake, tuner, train):
    fake.advance_on_get = False
    job = tuner.start("run-1", train, MODEL)
    fake.advance(job.id, 3)  # queued, running, a third of the steps
    first = tuner.poll(job.id)

    again = tuner.poll(job.id, after_event_id=first.last_event_id)

    assert again.events == ()
    assert (again.step, again.total_steps) == (first.step, first.total_steps) == (12, 36)
    assert again.train_loss == train_loss(12)


def test_a_failing_job_surfaces_openais_error_text(fake, tuner, train):
    fake.fail_next_job = "Training file has too few examples"
    job = tuner.start("run-1", train, MODEL)

    final = poll_to_end(tuner, job.id)[-1]

    assert final.status == "failed" and final.terminal
    assert final.error is not None
    assert final.error.code == "invalid_training_file"
    assert final.error.message == "Training file has too few examples"
    assert final.error.param == "training_file"
    assert final.fine_tuned_model is None and final.metrics == ()
    assert any(e.level == "error" and e.message == final.error.message for e in final.events)


def test_a_too_small_file_fails_at_validation(fake, tuner, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_bytes(chat_jsonl(5))
    job = tuner.start("run-1", small, MODEL)

    final = poll_to_end(tuner, job.id)[-1]

    assert final.status == "failed"
    assert "at least 10 examples" in final.error.message


def test_cancel(fake, tuner, train):
    job = tuner.start("run-1", train, MODEL)
    tuner.poll(job.id)

    cancelled = tuner.cancel(job.id)

    assert cancelled.status == "cancelled"
    state = tuner.poll(job.id)
    assert state.status == "cancelled" and state.terminal
    assert state.events[-1].message == "Fine-tuning job cancelled"
    assert tuner.cancel(job.id).status == "cancelled"  # cancelling again is harmless


def test_cancel_of_an_unknown_job_is_a_404(fake, tuner):
    with pytest.raises(OpenAIError) as caught:
        tuner.cancel("ftjob-nope")
    assert caught.value.status == 404 and not caught.value.retryable


# -- files -----------------------------------------------------------------------


def test_upload_names_a_blob_without_extension_jsonl_and_delete_file(fake, tuner, tmp_path):
    blob = tmp_path / "3f2a9c"
    blob.write_bytes(chat_jsonl(10))

    file_id = tuner.upload(blob)

    assert fake.files[file_id]["filename"] == "3f2a9c.jsonl"
    assert tuner.delete_file(file_id) is True
    assert tuner.delete_file(file_id) is False  # already gone


# -- credentials, connections, bad input -----------------------------------------


def test_a_wrong_api_key_is_a_401_with_meaning(fake, train):
    tuner = OpenAIFineTuner.from_settings("sk-wrong-key-123456", fake.base_url, max_retries=2)

    with pytest.raises(OpenAIError) as caught:
        tuner.start("run-1", train, MODEL)

    err = caught.value
    assert (err.status, err.code) == (401, "invalid_api_key")
    assert err.message.startswith("Incorrect API key provided")
    assert "OPENAI_API_KEY" in err.meaning and not err.retryable
    assert fake.files == {} and fake.jobs() == []
    assert len(fake.calls) == 1  # a 401 is not retried


def test_an_unreachable_server_is_a_retryable_error(train):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tuner = OpenAIFineTuner.from_settings(API_KEY, f"http://127.0.0.1:{port}/v1", max_retries=0)

    with pytest.raises(OpenAIError) as caught:
        tuner.poll("ftjob-1")

    assert caught.value.status is None and caught.value.retryable
    assert "could not reach OpenAI" in caught.value.meaning


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr_multiplier": -1}, "lr_multiplier"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"validation_path": "/nonexistent.jsonl"}, "validation_path"),
    ],
)
def test_bad_input_is_a_value_error_before_any_request(fake, tuner, train, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tuner.start("run-1", train, MODEL, **kwargs)
    assert fake.calls == []


def test_from_settings_checks_its_input():
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIFineTuner.from_settings("", None)
    with pytest.raises(ValueError, match="key"):
        OpenAIFineTuner.from_settings("sk-x", None).start("", "x.jsonl", MODEL)


def test_parse_step_metrics_skips_rows_without_a_loss():
    text = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.5,0.4,,\n2.0,1.5,0.5,1.6,0.5\n3,,,,\n"
    assert openai_ft.parse_step_metrics(text) == ((1, 2.5), (2, 1.5))
    assert openai_ft.parse_step_metrics("a,b\n1,2\n") == ()


def test_terminal_statuses():
    assert frozenset({"succeeded", "failed", "cancelled"}) == TERMINAL


def test_importing_the_module_does_not_import_openai():
    code = "import sys, trainers.openai_ft; sys.exit('openai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the fake's own list endpoints ------------------------------------------------


def test_fake_lists_page_newest_first_with_after_and_metadata_filter(fake, train):
    client = openai.OpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
    file_id = fake.add_file(train.read_bytes())["id"]
    made = [
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, metadata={"team": "a" if i % 2 else "b"}
        ).id
        for i in range(5)
    ]

    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[:-3:-1] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == made[::-1]  # auto-paging
    team_a = client.fine_tuning.jobs.list(metadata={"team": "a"})
    assert [j.id for j in team_a] == [made[3], made[1]]

    fake.run_to_end(made[0])
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(made[0]))
    assert [c.step_number for c in checkpoints] == [36, 24, 12]  # newest first, one per epoch
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(f"ft:{MODEL}:")


def test_an_upload_is_found_again_by_its_key_and_size(fake, tuner, train):
    key = "tbabc:r7"
    name = tuner.file_name(key)
    assert name == "tunebot-tbabc-r7-train.jsonl"
    assert tuner.find_file(key) is None
    file_id = tuner.upload(train, filename=name)
    tuner.upload(train, filename=tuner.file_name("tbother:r7"))  # another installation's
    assert tuner.find_file(key, size=train.stat().st_size) == file_id
    assert tuner.find_file(key, size=1) is None  # a half-written upload is not reused
    assert tuner.find_file("tbabc:r8") is None


def test_create_from_an_uploaded_file_carries_the_key_and_is_found_by_it(fake, tuner, train):
    file_id = tuner.upload(train, filename=tuner.file_name("tbabc:r1"))
    job = tuner.create("tbabc:r1", MODEL, file_id, epochs=2)
    assert fake.job(job.id)["metadata"] == {"tunebot_key": "tbabc:r1"}
    assert tuner.find("tbabc:r1").id == job.id and tuner.find("tbxyz:r1") is None
    with pytest.raises(ValueError, match="training_file is empty"):
        tuner.create("tbabc:r2", MODEL, "")
    with pytest.raises(ValueError, match="key is over"):
        tuner.create("k" * 65, MODEL, file_id)
    assert len(creates(fake)) == 1
