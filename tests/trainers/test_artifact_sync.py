"""s3:// artifacts roots against a real S3 API (moto's server on 127.0.0.1), without Ray.

`trainers.artifacts` on an s3 root: the paths, URIs and the FileSystem
methods the runner calls; and `trainers.artifact_sync`, the worker of a node
without the run folder, run as the Ray job would run it (a subprocess) on
the tiny Llama of tests/trainers/test_lora.py: it uploads progress while it
trains, a checkpoint on SIGTERM, then a resumed run continues from that
checkpoint brought back down and uploads its adapter and result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainers import artifacts
from trainers.ray_runner import RayRunner
from trainers.runner import RunnerError

RUN_TIMEOUT = 300.0


def test_an_s3_root_resolves_to_its_bucket_and_prefix_and_back(s3):
    fs, root = artifacts.resolve(f"s3://{s3.bucket_name}/runs/team-a/")
    assert root == f"{s3.bucket_name}/runs/team-a"
    assert fs.protocol == "s3" and not artifacts.is_local(fs)
    where = artifacts.uri(fs, f"{root}/tunebot-r1")
    assert where == f"s3://{s3.bucket_name}/runs/team-a/tunebot-r1"
    assert artifacts.path_of(fs, where) == f"{root}/tunebot-r1"

    fs.pipe_file(f"{root}/r1/progress.jsonl", b'{"event": "start"}\n')
    assert s3.read(s3.bucket_name, "runs/team-a/r1/progress.jsonl") == b'{"event": "start"}\n'
    assert artifacts.read_text(fs, f"{root}/r1/progress.jsonl") == '{"event": "start"}\n'
    assert artifacts.read_text(fs, f"{root}/r1/result.json") is None  # not there yet
    assert fs.exists(f"{root}/r1/progress.jsonl") and not fs.exists(f"{root}/r1/result.json")


def test_a_folder_comes_down_whole_replacing_the_old_copy(s3, tmp_path):
    fs, root = artifacts.resolve(f"s3://{s3.bucket_name}/runs")
    fs.pipe_file(f"{root}/r1/adapter/adapter_config.json", b"{}")
    fs.pipe_file(f"{root}/r1/adapter/sub/tokenizer.json", b"[]")
    home = tmp_path / "home" / "adapter"
    home.mkdir(parents=True)
    (home / "stale.bin").write_bytes(b"old")
    runner = RayRunner("http://127.0.0.1:9", f"s3://{s3.bucket_name}/runs")  # no call is made
    assert runner.fetch(f"s3://{root}/r1/adapter", home) == home
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()) == [
        "adapter_config.json",
        "sub/tokenizer.json",
    ]
    with pytest.raises(RunnerError, match="cannot copy"):
        runner.fetch(f"s3://{root}/r2/adapter", tmp_path / "none")


def test_only_complete_checkpoints_on_the_store_count(s3):
    fs, root = artifacts.resolve(f"s3://{s3.bucket_name}/runs")
    run = f"{root}/r1"
    for step in (2, 10):  # complete: trainer state and adapter weights
        fs.pipe_file(f"{run}/checkpoints/checkpoint-{step}/adapter_model.safetensors", b"w")
        fs.pipe_file(f"{run}/checkpoints/checkpoint-{step}/trainer_state.json", b"{}")
    fs.pipe_file(f"{run}/checkpoints/checkpoint-12/adapter_model.safetensors", b"w")  # cut short
    fs.pipe_file(f"{run}/checkpoints/checkpoint-x/trainer_state.json", b"{}")
    runner = RayRunner("http://127.0.0.1:9", f"s3://{s3.bucket_name}/runs")
    assert runner.checkpoints(f"s3://{run}") == ["checkpoint-2", "checkpoint-10"]
    assert runner.checkpoints(f"s3://{root}/r2") == []


def test_a_run_over_several_nodes_is_refused_with_an_s3_root_before_any_call(s3, tmp_path):
    from trainers.runner import TrainingSpec

    runner = RayRunner("http://127.0.0.1:9", f"s3://{s3.bucket_name}/runs")  # nothing answers
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    hyper = {"num_workers": 2, "spread": True}
    with pytest.raises(RunnerError) as err:
        runner.submit(TrainingSpec("r1", "m", train, hyperparameters=hyper), "k:r1")
    assert str(err.value) == (
        "spread: runs over several nodes need an artifacts folder every node sees, "
        "not an s3:// store"
    )
    assert s3.keys(s3.bucket_name) == []


def test_an_s3_root_with_credentials_or_a_query_is_refused_without_repeating_them():
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    for root in (
        "s3://AKIASECRETKEY:hunter2@bucket/runs",
        "s3://bucket/runs?X-Amz-Signature=abc123",
        "s3://bucket/runs#part9",
    ):
        with pytest.raises(ValueError) as err:
            artifacts.resolve(root)
        text = str(err.value)
        assert "without credentials" in text
        assert not [s for s in ("AKIASECRETKEY", "hunter2", "abc123", "part9") if s in text]
    with pytest.raises(ValueError, match="names its bucket"):
        artifacts.resolve("s3:///runs")
    with pytest.raises(ValueError, match="not supported"):
        artifacts.resolve("gs://bucket/runs")


def test_without_s3fs_an_s3_root_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the [s3] extra were not installed
    with pytest.raises(ValueError) as err:
        artifacts.resolve("s3://bucket/runs")
    assert str(err.value) == (
        "artifacts: s3:// roots need the [s3] extra: pip install -e '.[s3]' in tunebot's folder"
    )


# --- the worker of a node without the run folder ---------------------------------------

try:
    from tests.trainers.test_lora import tiny
except pytest.skip.Exception as exc:  # test_lora skips without the [local] extra
    _NO_LOCAL = str(exc)

    @pytest.fixture(scope="session")
    def tiny():
        pytest.skip(f"the worker needs the [local] extra ({_NO_LOCAL})")


def stage(fs, run: str, tiny, **overrides) -> None:
    """What RayRunner stages for a run: its data and spec.json, the paths on the store."""
    fs.put_file(str(tiny.train), f"{run}/data/train.jsonl")
    fs.put_file(str(tiny.eval), f"{run}/data/eval.jsonl")
    spec = {
        "run_id": "s1",
        "model": str(tiny.model),
        "train_file": f"{run}/data/train.jsonl",
        "eval_file": f"{run}/data/eval.jsonl",
        "output_dir": run,
        "epochs": 6,  # 36 steps: long enough to stop mid-way
        "lr": 1e-2,
        "batch": 4,
        "grad_accum": 1,
        "max_length": 128,
        **overrides,
    }
    fs.pipe_file(f"{run}/spec.json", json.dumps(spec).encode())


def start_sync(fs, run: str) -> subprocess.Popen:
    """The Ray job's entrypoint for an s3 root, as a subprocess of this test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    spec_uri = artifacts.uri(fs, f"{run}/spec.json")
    wrapper = [sys.executable, "-m", "trainers.artifact_sync", "--every", "0.2", spec_uri]
    return subprocess.Popen(
        [*wrapper, "--", "-m", "trainers.lora"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def store_events(fs, run: str) -> list[dict]:
    text = artifacts.read_text(fs, f"{run}/progress.jsonl") or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the sync worker did not end:\n{out[-3000:]}") from None
    return proc.returncode, out


def test_the_sync_worker_uploads_progress_a_cancel_checkpoint_and_resumes_from_it(s3, tiny):
    fs, root = artifacts.resolve(f"s3://{s3.bucket_name}/runs")
    run = f"{root}/tunebot-s1"
    stage(fs, run, tiny)
    proc = start_sync(fs, run)
    deadline = time.monotonic() + RUN_TIMEOUT
    # Progress reaches the store while the worker trains (not only at the end).
    while not [e for e in store_events(fs, run) if e.get("event") == "step"]:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no step reached the store"
        time.sleep(0.05)
    assert not fs.exists(f"{run}/result.json")
    proc.send_signal(signal.SIGTERM)  # Ray's stop_job: passed on to the trainer
    code, out = finish(proc)
    assert code == 0, out[-3000:]

    result = json.loads(fs.cat_file(f"{run}/result.json"))
    assert result["status"] == "cancelled", result
    saved = artifacts.complete_checkpoints(fs, run)
    assert saved and result["checkpoint"] == f"s3://{run}/checkpoints/{saved[-1]}"
    first = store_events(fs, run)
    assert [e["step"] for e in first if e["event"] == "checkpoint"][-1] == result["step"]
    assert "/tmp" not in json.dumps(result) and "tunebot-run-" not in json.dumps(result)

    # Resume, as the runner stages it: the same folder, resume on, the old result gone.
    fs.rm_file(f"{run}/result.json")
    stage(fs, run, tiny, resume=True)
    code, out = finish(start_sync(fs, run))
    assert code == 0, out[-3000:]
    result = json.loads(fs.cat_file(f"{run}/result.json"))
    assert result["status"] == "succeeded", result
    assert result["adapter_dir"] == f"s3://{run}/adapter"
    assert result["metrics"]["steps"] == 36
    keys = s3.keys(s3.bucket_name, "runs/tunebot-s1/adapter/")
    assert "runs/tunebot-s1/adapter/adapter_config.json" in keys
    assert "runs/tunebot-s1/adapter/adapter_model.safetensors" in keys
    events = store_events(fs, run)
    assert events[: len(first)] == first  # the first attempt's progress kept, appended to
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and Path(starts[1]["resumed_from"]).name == saved[-1]
    resumed_steps = [e["step"] for e in events[len(first) :] if e["event"] == "step"]
    assert min(resumed_steps) == int(saved[-1].rsplit("-", 1)[1]) + 1
    # At most the worker's rotation's 3 checkpoints stay on the store, all complete.
    names = {k.split("/")[3] for k in s3.keys(s3.bucket_name, "runs/tunebot-s1/checkpoints/")}
    assert names == set(artifacts.complete_checkpoints(fs, run)) and 1 <= len(names) <= 3


def test_a_run_folder_the_store_does_not_have_fails_in_one_line(s3):
    fs, root = artifacts.resolve(f"s3://{s3.bucket_name}/runs")
    proc = start_sync(fs, f"{root}/tunebot-none")
    code, out = finish(proc)
    assert code == 1
    assert f"artifact_sync: cannot copy the run from s3://{root}/tunebot-none" in out
    assert "Traceback" not in out
