"""trainers.ray_runner against a real Ray cluster: LoRA runs as Ray jobs, end to end.

The cluster is one you start (`ray start --head`, see `CLUSTER` below); the
tests that need it skip, saying why, when ray is not installed or no
dashboard answers at ``TUNEBOT_RAY_ADDRESS`` (default http://127.0.0.1:8265).
Each session's keys carry a fresh nonce: the cluster remembers every job it
ran, and an old key would be adopted.

The worker trains the tiny Llama of tests/trainers/test_lora.py (built offline) with
a few steps at most; most of each job's time is Ray's start of the job and
the worker's import of torch + transformers + trl.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.request
import uuid
from importlib.util import find_spec
from pathlib import Path

import pytest

from trainers import artifacts
from trainers.local import log_line, parse_log
from trainers.ray_runner import DEFAULT_ADDRESS, RayRunner, submission_id
from trainers.runner import Handle, RunnerError, RunState, TrainingSpec

CLUSTER = (
    "start one (in a network and PID namespace of its own, so that it keeps to loopback): "
    "unshare -n -p -f --mount-proc -- bash -c 'ip link set lo up; ray start --head --num-cpus 2 "
    "--include-dashboard true --dashboard-host 127.0.0.1 --disable-usage-stats; pytest ...'"
)
ADDRESS = os.environ.get("TUNEBOT_RAY_ADDRESS", DEFAULT_ADDRESS)
NONCE = uuid.uuid4().hex[:8]
RUN_TIMEOUT = 300.0
FAST = {"lr": 1e-2, "batch": 4, "grad_accum": 1, "max_length": 128, "num_cpus": 1}


def _no_cluster() -> str | None:
    if find_spec("ray") is None:
        return "ray is not installed (pip install -e '.[ray]' in tunebot's folder)"
    try:
        with urllib.request.urlopen(f"{ADDRESS}/api/version", timeout=5) as resp:
            json.load(resp)
    except (OSError, ValueError) as exc:
        return f"no Ray cluster answers at {ADDRESS} ({exc}); {CLUSTER}"
    return None


NO_CLUSTER = _no_cluster()
needs_cluster = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")


def key(name: str) -> str:
    return f"test-{NONCE}:{name}"


try:
    from tests.trainers.test_lora import tiny
except pytest.skip.Exception as exc:  # test_lora skips without the [local] extra
    _NO_LOCAL = str(exc)

    @pytest.fixture(scope="session")
    def tiny():
        pytest.skip(f"the worker needs the [local] extra ({_NO_LOCAL})")


@pytest.fixture
def runner(tmp_path, request):
    """A runner with its artifacts under tmp_path; jobs left running at the end are stopped."""
    made: list[RayRunner] = []
    handles: list[Handle] = []

    def make(**kwargs) -> RayRunner:
        r = RayRunner(ADDRESS, tmp_path / "artifacts", **kwargs)
        made.append(r)
        return r

    make.handles = handles  # type: ignore[attr-defined]
    yield make
    for handle in handles:
        with contextlib.suppress(RunnerError):
            made[0].cancel(handle)


def spec(tiny, name: str, **hyper) -> TrainingSpec:
    return TrainingSpec(
        run_id=name,
        model=str(tiny.model),
        train_file=tiny.train,
        eval_file=tiny.eval,
        hyperparameters={**FAST, **hyper},
    )


def poll_until(runner, handle, statuses, timeout=RUN_TIMEOUT, cursor=None, seen=None):
    """Poll every 0.5 s until the status is one of `statuses`; events collected in `seen`."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = runner.poll(handle, cursor=cursor)
        cursor = state.cursor
        if seen is not None:
            seen.extend(state.events)
        if state.status in statuses:
            return state
        time.sleep(0.5)
    raise AssertionError(f"{handle.id} stayed {state.status if state else 'unknown'}")


def ray_jobs(sid: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(ADDRESS).list_jobs() if j.submission_id == sid]


# --- no cluster needed ---------------------------------------------------------------


def test_submission_ids_are_safe_stable_and_distinct():
    sid = submission_id("T0123:r1")
    assert sid == submission_id("T0123:r1")
    assert sid.startswith("tunebot-T0123-r1-")
    assert submission_id("T0123-r1") != sid  # the same slug, another key
    long = submission_id("x" * 500 + "/../?#%")
    assert len(long) < 100 and all(c.isalnum() or c in "_.-" for c in long)
    with pytest.raises(ValueError):
        submission_id(" ")


def test_a_hyperparameter_it_cannot_honour_is_refused_before_any_call(tmp_path):
    # No cluster at this address: the refusal must come before any network call.
    r = RayRunner("http://127.0.0.1:9", tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    for hyper, word in (({"lr_mult": 2}, "lr_mult"), ({"beta": 1}, "beta"),
                        ({"num_gpus": -1}, "num_gpus"), ({"epochs": 0}, "epochs")):  # fmt: skip
        with pytest.raises(RunnerError, match=word):
            r.submit(TrainingSpec("r1", "m", train, hyperparameters=hyper), "k:r1")
    assert not (tmp_path / submission_id("k:r1")).exists()


def test_an_artifacts_root_is_a_folder_or_a_file_uri(tmp_path):
    fs, root = artifacts.resolve(tmp_path / "a b")
    assert artifacts.resolve((tmp_path / "a b").as_uri())[1] == root == str(tmp_path / "a b")
    where = artifacts.uri(fs, f"{root}/run")
    assert where.startswith("file:///") and artifacts.path_of(fs, where) == f"{root}/run"
    fs.pipe_file(f"{root}/run/spec.json", b"{}")
    assert artifacts.read_text(fs, f"{root}/run/spec.json") == "{}"
    assert artifacts.read_text(fs, f"{root}/run/result.json") is None
    assert [p.name for p in (tmp_path / "a b" / "run").iterdir()] == ["spec.json"]
    for bad in ("gs://bucket/runs", "file://otherhost/runs", ""):
        with pytest.raises(ValueError, match="artifacts"):
            artifacts.resolve(bad)


def test_the_jobs_environment_holds_none_of_the_bots_secrets(tmp_path):
    """What `submit` sends as the job's runtime_env env vars: an allow-list of the bot's."""
    secrets = {
        "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "SLACK_SIGNING_SECRET": "sig-1",
        "OPENAI_API_KEY": "sk-1", "TOGETHER_API_KEY": "tg-1", "HF_TOKEN": "hf_1",
        "TUNEBOT_PRICES": "/srv/prices.json", "AWS_SECRET_ACCESS_KEY": "aws-1",
        "HTTPS_PROXY": "http://user:pw@proxy:3128", "TORCH_HUB_TOKEN": "th-1", "RAY_ADDRESS": "ray://x",
    }  # fmt: skip
    kept = {"PATH": "/usr/bin", "HF_HOME": "/cache/hf", "NCCL_IB_PKEY": "1"}
    devices = {"CUDA_VISIBLE_DEVICES": "0"}  # Ray sets it from num_gpus
    r = RayRunner("http://127.0.0.1:9", tmp_path, env={**secrets, **kept, **devices})
    env_vars = r._runtime_env()["env_vars"]
    assert env_vars == {**kept, "RAY_JOB_STOP_WAIT_TIME_S": "120", "PYTHONUNBUFFERED": "1"}
    assert not [v for v in secrets.values() if v in str(r._runtime_env())]


def test_with_an_s3_root_the_job_gets_the_stores_aws_variables_and_no_other_secret(tmp_path):
    """An s3 root: the worker reaches the store with the AWS variables botocore reads, and
    still with none of the bot's tokens (nor an AWS profile, which names a file it lacks)."""
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    secrets = {
        "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "SLACK_SIGNING_SECRET": "sig-1",
        "OPENAI_API_KEY": "sk-1", "TOGETHER_API_KEY": "tg-1", "HF_TOKEN": "hf_1",
        "TUNEBOT_ARTIFACTS": "s3://team/runs", "HTTPS_PROXY": "http://user:pw@proxy:3128",
        "AWS_PROFILE": "admin", "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
    }  # fmt: skip
    store = {
        "AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "aws-1",
        "AWS_SESSION_TOKEN": "sess-1", "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
    }  # fmt: skip
    kept = {"PATH": "/usr/bin"}
    r = RayRunner("http://127.0.0.1:9", "s3://team/runs", env={**secrets, **store, **kept})
    env_vars = r._runtime_env()["env_vars"]
    assert env_vars == {
        **kept, **store, "RAY_JOB_STOP_WAIT_TIME_S": "120", "PYTHONUNBUFFERED": "1"
    }  # fmt: skip
    assert not [v for v in secrets.values() if v in str(r._runtime_env())]
    # A local root gets none of them.
    local = RayRunner("http://127.0.0.1:9", tmp_path, env={**secrets, **store, **kept})
    assert not [v for v in store.values() if v in str(local._runtime_env())]


def test_progress_lines_in_a_log_are_read_strictly():
    """Only well-formed records of this run count; look-alikes neither crash nor finish."""
    good = [
        log_line("r1", {"event": "start", "max_steps": 6, "step": 0, "time": 1.0}),
        "\x1b[36m(RayTrainWorker pid=7, ip=127.0.0.1)\x1b[0m "
        + log_line("r1", {"event": "step", "step": 1, "max_steps": 6, "loss": 2.5, "time": 2.0}),
        log_line("r1", {"event": "checkpoint", "step": 1, "path": "c", "time": 3.0}),
    ]
    fakes = [
        "tunebot-progress r1 {not json",
        'tunebot-progress r1 {"event": "result", "status": "succeeded"} [repeated 2x]',
        'print: tunebot-progress r1 {"event": "result", "status": "succeeded"}',
        log_line("r2", {"event": "result", "status": "succeeded"}),  # another run
        log_line("r1", {"event": "result", "status": "done"}),  # no such status
        log_line("r1", {"event": "result", "status": "succeeded", "metrics": {"steps": "6"}}),
        log_line("r1", {"event": "step", "step": True, "loss": 1.0}),  # a bool is no step
        log_line("r1", {"event": "step", "step": -1, "loss": 1.0}),
        log_line("r1", {"event": "step", "step": 2}).replace("}", ',"loss":NaN}'),
        log_line("r1", {"event": "step", "step": 2, "loss": [1]}),
        log_line("r1", {"event": "shutdown", "step": 2}),
        "tunebot-progress r1 [1, 2]",
        "tunebot-progress r1 " + '{"event": "step", "step": 2, "x": "' + "a" * 70_000 + '"}',
        "tunebot-progress  r1 {}",
        "\x00\xff tunebot-progress",
    ]
    text = "\n".join([good[0], *fakes[:7], good[1], *fakes[7:], good[2], "Traceback ..."])
    events, result = parse_log(text, "r1")
    assert [e["event"] for e in events] == ["start", "step", "checkpoint"]
    assert events[1]["loss"] == 2.5 and result is None
    done = {"status": "succeeded", "adapter_dir": "/x/adapter", "metrics": {"steps": 6}}
    events, result = parse_log(text + "\n" + log_line("r1", {"event": "result", **done}), "r1")
    assert result == done and len(events) == 3
    assert parse_log("", "r1") == ([], None)


def test_a_result_line_the_run_goes_on_after_is_not_its_end():
    """A well-formed result line printed mid-run (by whatever prints the run's id and a
    record: a library echoing a training example) is not the run's end: the worker prints
    its own result last, so a result with the run's records after it counts for nothing.
    Else a job stopped before its own result would read as succeeded."""
    fake = {"status": "succeeded", "adapter_dir": "/x/adapter", "metrics": {"train_loss": 0.01}}
    own = {"status": "cancelled", "checkpoint": "/x/checkpoints/checkpoint-4"}
    text = "\n".join([
        log_line("r1", {"event": "start", "max_steps": 6, "step": 0, "time": 1.0}),
        log_line("r1", {"event": "result", **fake}),
        log_line("r1", {"event": "step", "step": 1, "loss": 2.5, "time": 2.0}),
        log_line("r1", {"event": "step", "step": 2, "loss": 2.4, "time": 3.0}),
    ])  # fmt: skip
    events, result = parse_log(text, "r1")
    assert result is None and [e["step"] for e in events] == [0, 1, 2]
    events, result = parse_log(text + "\n" + log_line("r1", {"event": "result", **own}), "r1")
    assert result == own and len(events) == 3
    # Another run's records and other lines after the result leave it the end.
    tail = "\n".join([log_line("r2", {"event": "step", "step": 9, "loss": 1.0}), "done."])
    assert parse_log(text + "\n" + log_line("r1", {"event": "result", **own}) + "\n" + tail,
                     "r1")[1] == own  # fmt: skip


def test_no_cluster_is_a_retryable_error(tmp_path):
    if find_spec("ray") is None:
        pytest.skip("ray is not installed")
    r = RayRunner("http://127.0.0.1:9", tmp_path)
    with pytest.raises(RunnerError) as info:
        r.find("k:r1")
    assert info.value.retryable


# --- against the cluster ---------------------------------------------------------------


@needs_cluster
def test_a_run_trains_as_a_ray_job_end_to_end(runner, tiny):
    secrets = {"SLACK_BOT_TOKEN": "xoxb-1", "OPENAI_API_KEY": "sk-1", "TUNEBOT_HOME": "/h"}
    r = runner(env={**os.environ, **secrets, "CUDA_VISIBLE_DEVICES": "7"})
    steps = []
    handle = r.submit(spec(tiny, "r1", epochs=1), key("r1"), step=lambda *s: steps.append(s))
    runner.handles.append(handle)
    assert handle.runner == "ray" and not handle.reused
    assert handle.id == submission_id(key("r1"))
    assert [s[0] for s in steps] == ["uploaded", "created"]
    run_dir = Path(handle.where.removeprefix("file://"))
    assert (run_dir / "spec.json").is_file() and (run_dir / "data" / "train.jsonl").is_file()

    seen: list = []
    state = poll_until(r, handle, ("succeeded", "failed", "cancelled"), seen=seen)
    assert state.status == "succeeded", (state.error, state.log_tail)
    assert state.step == state.total_steps == 6 and state.progress == 1.0
    assert len(state.metrics) == 6 and state.train_loss is not None
    assert [e.message for e in seen][:1] == ["training started: 6 steps"]
    assert any(e.message.startswith("eval loss") for e in seen)
    assert len({e.id for e in seen}) == len(seen)  # the cursor gave each event once
    adapter = Path(state.output["adapter_dir"])
    assert adapter.parent == run_dir and (adapter / "adapter_config.json").is_file()
    assert (run_dir / "progress.jsonl").is_file()

    # The key again, from this runner and from a fresh one: the same job, adopted.
    again = r.submit(spec(tiny, "r1", epochs=1), key("r1"))
    assert again.reused and again.id == handle.id and again.where == handle.where
    assert RayRunner(ADDRESS, "/nonexistent").find(key("r1")) == again
    jobs = ray_jobs(handle.id)
    assert len(jobs) == 1 and str(jobs[0].status) == "SUCCEEDED"
    assert jobs[0].metadata["tunebot_run"] == "r1"
    env_vars = jobs[0].runtime_env["env_vars"]
    assert not set(secrets) & set(env_vars) and "CUDA_VISIBLE_DEVICES" not in env_vars
    assert env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "120" and "PATH" in env_vars
    assert r.find(key("never-submitted")) is None


@needs_cluster
def test_one_key_from_five_threads_makes_exactly_one_job(runner, tiny):
    runners = [runner() for _ in range(5)]
    start = threading.Barrier(5)
    handles: list = [None] * 5
    errors: list = []

    def go(i: int) -> None:
        start.wait()
        try:
            handles[i] = runners[i].submit(spec(tiny, "r2", max_steps=2), key("r2"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    runner.handles.append(handles[0])
    assert len({h.id for h in handles}) == 1
    assert sorted(h.reused for h in handles) == [False, True, True, True, True]
    jobs = ray_jobs(handles[0].id)
    assert len(jobs) == 1
    # The refused duplicates did not spoil the first job (ray-project/ray#31356).
    state = poll_until(runners[0], handles[0], ("succeeded", "failed", "cancelled"))
    assert state.status == "succeeded", (state.error, state.log_tail)


@needs_cluster
def test_cancel_mid_run_saves_a_checkpoint_and_ends_cancelled(runner, tiny):
    r = runner(stop_grace_s=60)
    handle = r.submit(spec(tiny, "r3", epochs=200, save_steps=2), key("r3"))
    runner.handles.append(handle)
    run_dir = Path(handle.where.removeprefix("file://"))
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        state = r.poll(handle)
        assert not state.terminal, (state.error, state.log_tail)
        if any(e.message.startswith("checkpoint saved") for e in state.events):
            break
        time.sleep(0.5)
    assert state.status == "running" and state.step is not None
    asked = time.monotonic()
    r.cancel(handle)
    state = poll_until(r, handle, ("succeeded", "failed", "cancelled"), timeout=90)
    assert state.status == "cancelled", (state.error, state.log_tail)
    # Ray saw the worker go (it did not wait out the 60 s grace, then SIGKILL it).
    assert time.monotonic() - asked < 45
    assert str(ray_jobs(handle.id)[0].status) == "STOPPED"
    # The worker had the time to stop cleanly: a result and a checkpoint to resume from.
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "cancelled" and Path(result["checkpoint"]).is_dir()
    assert state.output["checkpoint"] == result["checkpoint"]
    assert state.step is not None and state.step < state.total_steps
    r.cancel(handle)  # a finished job is left as it is


@needs_cluster
def test_a_failing_worker_reports_its_error_rays_message_and_the_log(runner, tiny, tmp_path):
    r = runner()
    bad = TrainingSpec(
        run_id="r4",
        model=str(tmp_path / "no-such-model"),
        train_file=tiny.train,
        hyperparameters={**FAST, "max_steps": 1},
    )
    handle = r.submit(bad, key("r4"))
    runner.handles.append(handle)
    state = poll_until(r, handle, ("succeeded", "failed", "cancelled"))
    assert state.status == "failed"
    assert "no-such-model" in state.error and "exit code 1" in state.error
    assert state.log_tail and "Traceback" in state.log_tail
    assert isinstance(state, RunState) and state.terminal


@needs_cluster
def test_a_job_ray_forgot_is_judged_by_its_files(runner, tmp_path):
    r = runner()
    folder = tmp_path / "forgotten"
    folder.mkdir()
    ghost = Handle(runner="ray", id=submission_id(key("ghost")), where=folder.as_uri())
    state = r.poll(ghost)  # a cluster started afresh has no record of the job
    assert state.status == "failed" and "no longer knows job" in state.error
    adapter = str(folder / "adapter")
    (folder / "result.json").write_text(json.dumps({"status": "succeeded", "adapter_dir": adapter}))
    state = r.poll(ghost)
    assert state.status == "succeeded" and state.output["adapter_dir"] == adapter
    with pytest.raises(RunnerError, match="no job"):
        r.cancel(ghost)


@needs_cluster
def test_two_ray_train_workers_each_train_on_half_the_batches(runner, tiny):
    r = runner()
    two = spec(tiny, "r6", epochs=1, num_workers=2, record_shards=True)
    handle = r.submit(two, key("r6"))
    runner.handles.append(handle)
    (job,) = ray_jobs(handle.id)
    assert "trainers.ray_train --workers 2 --gpus-per-worker 0 " in job.entrypoint
    state = poll_until(r, handle, ("succeeded", "failed", "cancelled"))
    assert state.status == "succeeded", (state.error, state.log_tail)
    run_dir = Path(handle.where.removeprefix("file://"))
    shards = [json.loads((run_dir / "shards" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in shards] == [(0, 2), (1, 2)]
    # One process trains the 24 examples in 6 batches of 4 (the end-to-end test above):
    # each of the two workers gets 3 of them, and no example goes to both.
    assert [s["batches"] for s in shards] == [3, 3]
    first, second = (set(s["examples"]) for s in shards)
    assert len(first) == len(second) == 12 and not first & second
    assert state.total_steps == 3 and state.step == 3
    start = json.loads((run_dir / "progress.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 2
    # The same layout as a one-process run: the adapter, loadable by PEFT.
    assert Path(state.output["adapter_dir"]) == run_dir / "adapter"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert not (run_dir / "shards" / "rank-2.json").exists()


@needs_cluster
def test_a_run_whose_folder_this_machine_cannot_see_is_followed_in_the_jobs_log(
    runner, tiny, tmp_path
):
    """The bot's view of the artifacts lacks the run folder: progress and the finish
    come from the worker's progress lines in the job's log."""
    r = runner()
    handle = r.submit(spec(tiny, "r7", epochs=1), key("r7"))
    runner.handles.append(handle)
    run_dir = Path(handle.where.removeprefix("file://"))
    # Another machine's view: the same job, a root where the folder is not mounted.
    elsewhere = RayRunner(ADDRESS, tmp_path / "not-mounted")
    blind = Handle(runner="ray", id=handle.id, where=(tmp_path / "not-mounted" / "x").as_uri())
    seen: list = []
    steps: set = set()
    deadline = time.monotonic() + RUN_TIMEOUT
    cursor = None
    while time.monotonic() < deadline:
        state = elsewhere.poll(blind, cursor=cursor)
        cursor = state.cursor
        seen.extend(state.events)
        if state.step is not None and not state.terminal:
            steps.add(state.step)
        if state.terminal:
            break
        time.sleep(0.5)
    assert state.status == "succeeded", (state.error, state.log_tail)
    assert state.step == state.total_steps == 6 and len(state.metrics) == 6
    assert state.output["adapter_dir"] == str(run_dir / "adapter")
    assert steps and max(steps) <= 6  # progress while it ran, from the log
    assert [e.message for e in seen][:1] == ["training started: 6 steps"]
    assert len({e.id for e in seen}) == len(seen)
    assert any(e.message.startswith("eval loss") for e in seen)
    # The same numbers as the folder gives.
    direct = r.poll(handle)
    assert direct.metrics == state.metrics and direct.status == "succeeded"
    assert not (tmp_path / "not-mounted").exists()


@needs_cluster
def test_cancel_of_two_ray_train_workers_keeps_a_checkpoint_and_resume_finishes(runner, tiny):
    """SIGTERM reaches only the driver: it asks the workers through the stop file, they
    stop at the same step, rank 0 saves the checkpoint; a new job resumes from it."""
    r = runner(stop_grace_s=60)
    two = spec(tiny, "r8", epochs=100, num_workers=2, save_steps=1000)
    handle = r.submit(two, key("r8"))
    runner.handles.append(handle)
    run_dir = Path(handle.where.removeprefix("file://"))
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        state = r.poll(handle)
        assert not state.terminal, (state.error, state.log_tail)
        if (state.step or 0) >= 2:
            break
        time.sleep(0.5)
    assert state.status == "running" and r.checkpoints(handle.where) == []
    r.cancel(handle)
    state = poll_until(r, handle, ("succeeded", "failed", "cancelled"), timeout=120)
    assert state.status == "cancelled", (state.error, state.log_tail)
    assert str(ray_jobs(handle.id)[0].status) == "STOPPED"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "cancelled", result
    saved = Path(result["checkpoint"])
    assert saved.parent == run_dir / "checkpoints"
    assert saved.name == f"checkpoint-{result['step']}" and 2 <= result["step"] < 300
    assert r.checkpoints(handle.where) == [saved.name]  # complete: weights and trainer state
    assert (run_dir / "stop.request").exists()

    # Resume: a new job in the same folder continues from that step to the end.
    shorter = spec(tiny, "r8", epochs=100, num_workers=2, save_steps=1000,
                   max_steps=result["step"] + 2)  # fmt: skip
    again = r.submit(shorter, key("r8") + ":attempt-2", folder_key=key("r8"))
    runner.handles.append(again)
    assert not again.reused and again.where == handle.where
    state = poll_until(r, again, ("succeeded", "failed", "cancelled"))
    assert state.status == "succeeded", (state.error, state.log_tail)
    assert state.step == result["step"] + 2
    starts = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    resumed = [e for e in starts if e["event"] == "start"][-1]
    assert resumed["resumed_from"] == str(saved) and resumed["world_size"] == 2
    assert not (run_dir / "stop.request").exists()


@needs_cluster
@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_result_naming_files_outside_its_run_folder_fails_and_nothing_is_fetched(
    runner, tmp_path, request, where
):
    """Whoever can write the run folder (a cluster node, another tenant of the bucket)
    writes a result.json whose adapter lies elsewhere: another bucket, this machine's
    own files, a sibling run. The run fails, nothing outside its folder is named in
    its output, and copying it home fetches nothing."""
    from bot import ray_runs

    if where == "s3":
        s3 = request.getfixturevalue("s3")
        r = RayRunner(ADDRESS, f"s3://{s3.bucket_name}/runs")
        other = s3.bucket()
        s3.client().put_object(Bucket=other, Key="secret/adapter_config.json", Body=b"{}")
        elsewhere = [f"s3://{other}/secret", "file:///etc", f"{other}/secret"]
    else:
        r = runner()
        secret = tmp_path / "secret"
        secret.mkdir()
        (secret / "adapter_config.json").write_text("{}")
        elsewhere = [str(secret), secret.as_uri(), "secret"]
    sid = submission_id(key(f"outside-{where}"))
    run_dir = r.run_dir(sid)
    ghost = Handle(runner="ray", id=sid, where=artifacts.uri(r.fs, run_dir))
    inside = f"{run_dir}/adapter"
    r.fs.pipe_file(f"{inside}/adapter_config.json", b"{}")
    sibling = f"{run_dir}/../{submission_id(key('sibling'))}/adapter"
    for name in ("adapter_dir", "merged_dir", "checkpoint"):
        for bad in [*elsewhere, sibling, artifacts.uri(r.fs, sibling)]:
            result = {"status": "succeeded", "adapter_dir": inside, name: bad}
            r.fs.pipe_file(f"{run_dir}/result.json", json.dumps(result).encode())
            state = r.poll(ghost)  # Ray has no such job: the files are all there is
            assert state.status == "failed", (name, bad, state)
            assert state.error == (
                f"the run's result.json names files outside its run folder ({name})"
            )
            assert bad not in str(state.output) and "secret" not in str(state)
            home = tmp_path / f"home-{name}"
            copied = ray_runs.copy_home(r, state, home)  # what it names is its own alone
            assert set(copied.values()) <= {str(home / "adapter")}, copied
            assert not (home / "secret").exists() and not (home / "etc").exists()
    # Its own folder, as a URI or a path, is fetched as before.
    for own in (inside, artifacts.uri(r.fs, inside)):
        result = {"status": "succeeded", "adapter_dir": own}
        r.fs.pipe_file(f"{run_dir}/result.json", json.dumps(result).encode())
        state = r.poll(ghost)
        assert state.status == "succeeded" and state.output["adapter_dir"] == own
        copied = ray_runs.copy_home(r, state, tmp_path / "home")
        assert (Path(copied["adapter_dir"]) / "adapter_config.json").read_text() == "{}"


@needs_cluster
def test_a_store_that_blinks_when_the_job_ends_does_not_end_the_run_from_the_log(s3, monkeypatch):
    """An s3 root that does not answer for a moment just as the job has ended: the poll
    says so (a retryable error) instead of ending the run from the job's log, where
    its adapter would count as out of reach and never come home. Once the store
    answers, the run ends from its files."""
    from ray.job_submission import JobSubmissionClient

    root = f"s3://{s3.bucket_name}/runs"
    live = RayRunner(ADDRESS, root)
    sid = submission_id(key("blink"))
    run_dir = live.run_dir(sid)
    adapter = f"{run_dir}/adapter"
    live.fs.pipe_file(f"{adapter}/adapter_config.json", b"{}")
    result = {"status": "succeeded", "adapter_dir": artifacts.uri(live.fs, adapter)}
    live.fs.pipe_file(f"{run_dir}/result.json", json.dumps(result).encode())
    line = log_line("r9", {"event": "result", "status": "succeeded", "adapter_dir": "/x/adapter"})
    client = JobSubmissionClient(ADDRESS)
    client.submit_job(
        entrypoint=f"echo {json.dumps(line)}", submission_id=sid, metadata={"tunebot_run": "r9"}
    )
    handle = Handle(runner="ray", id=sid, where=artifacts.uri(live.fs, run_dir))
    deadline = time.monotonic() + RUN_TIMEOUT
    while str(client.get_job_status(sid)) != "SUCCEEDED":
        assert time.monotonic() < deadline, client.get_job_status(sid)
        time.sleep(0.5)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    down = RayRunner(ADDRESS, root)
    with pytest.raises(RunnerError) as caught:
        down.poll(handle)
    assert caught.value.retryable and caught.value.summary.startswith(
        "the artifacts store did not answer"
    )
    state = live.poll(handle)  # it answers again
    assert state.status == "succeeded" and "unreachable" not in state.output
    assert state.output["adapter_dir"] == result["adapter_dir"]


@needs_cluster
@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_poll_reads_only_the_end_of_a_huge_progress_log(runner, request, monkeypatch, where):
    """A progress.jsonl far longer than a run writes (a runaway or hostile writer): a poll
    reads its last PROGRESS_READ_BYTES alone (one ranged read), from a whole line."""
    from trainers import ray_runner

    monkeypatch.setattr(ray_runner, "PROGRESS_READ_BYTES", 64 * 1024)
    if where == "s3":
        r = RayRunner(ADDRESS, f"s3://{request.getfixturevalue('s3').bucket_name}/runs")
    else:
        r = runner()
    sid = submission_id(key(f"huge-{where}"))
    run_dir = r.run_dir(sid)
    lines = [json.dumps({"event": "step", "step": n, "loss": 1.0 / (n + 1)}) for n in range(20_000)]
    r.fs.pipe_file(f"{run_dir}/progress.jsonl", ("\n".join(lines) + "\n").encode())
    r.fs.pipe_file(f"{run_dir}/result.json", json.dumps({"status": "failed"}).encode())
    state = r.poll(Handle(runner="ray", id=sid, where=artifacts.uri(r.fs, run_dir)))
    steps = [step for step, _ in state.metrics]
    assert 0 < len(steps) < 2_000 and state.step == 19_999
    assert steps == list(range(20_000 - len(steps), 20_000))  # whole lines, the last ones


def test_an_s3_runs_workers_are_kept_on_the_drivers_node():
    """With an object-store root the workers share the driver's scratch folder: its
    ScalingConfig pins them to the driver's node; spread and one node exclude each other."""
    pytest.importorskip("ray.train", reason="the [ray] extra")
    from trainers.ray_train import main, scaling

    pinned = scaling(2, 1, False, "10.0.0.5")
    assert pinned.placement_strategy == "STRICT_PACK"
    assert pinned.resources_per_worker == {"CPU": 1, "GPU": 1, "node:10.0.0.5": 0.001}
    packed = scaling(2, 0, False)
    assert packed.placement_strategy == "PACK" and packed.resources_per_worker == {"CPU": 1}
    assert scaling(2, 0, True).placement_strategy == "SPREAD"
    with pytest.raises(ValueError):
        scaling(2, 0, True, "10.0.0.5")
    assert main(["--workers", "2", "--spread", "--same-node", "spec.json"]) == 2


@needs_cluster
def test_two_workers_with_an_s3_root_train_on_the_drivers_node(tiny, s3):
    """The pin is a resource the cluster really has (a wrong name would wait forever)."""
    r = RayRunner(ADDRESS, f"s3://{s3.bucket_name}/runs")
    r.sync_seconds = 0.5
    handle = r.submit(spec(tiny, "r9", epochs=1, num_workers=2), key("s3-two-workers"))
    try:
        (job,) = ray_jobs(handle.id)
        assert "trainers.ray_train --workers 2 --gpus-per-worker 0 --same-node" in job.entrypoint
        state = poll_until(r, handle, ("succeeded", "failed", "cancelled"))
        assert state.status == "succeeded", (state.error, state.log_tail)
        assert state.total_steps == 3 and state.step == 3  # 6 batches over two workers
        adapter = artifacts.path_of(r.fs, state.output["adapter_dir"])
        assert r.fs.exists(f"{adapter}/adapter_config.json")
    finally:
        with contextlib.suppress(RunnerError):
            r.cancel(handle)
