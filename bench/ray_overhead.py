"""What a Ray job adds to a local LoRA run: the same tiny run through both runners.

Builds the tiny Llama of tests/trainers/test_lora.py (2 layers, hidden 64, offline),
then trains it for one epoch (6 steps) `--repeat` times per arm, interleaved
(local, ray, ray, local, ...):

  local  ``trainers.local.launch``: ``python -m trainers.lora`` as a subprocess,
         followed through its files until ``result.json`` is there and the
         process has exited;
  ray    ``trainers.ray_runner.RayRunner``: the same worker as a Ray job,
         polled every 0.2 s until Ray says SUCCEEDED.

Both arms get the same OMP_NUM_THREADS (`--threads`; Ray would otherwise
give the job one thread per reserved CPU) and the Ray job reserves one CPU.
Prints each run's wall time and the medians, and for Ray where the time
goes: the submit call, PENDING (runtime env and the job's supervisor
actor), the worker's start (imports) and the tail after ``result.json``.

With ``--s3`` a third arm, ``ray-s3``, runs the same job with its artifacts
on S3 (moto's S3 server from tests/fakes/s3_store.py, on 127.0.0.1 in this
process): the job is ``trainers.artifact_sync``, which copies the run down
to a scratch folder, trains, and uploads progress (every 5 s), checkpoints,
adapter and result.

With ``--start-cluster`` it also times ``ray start --head`` (and ``ray
stop --force`` at the end, which stops every Ray process it can see: run it
inside a PID and network namespace of its own, as the tests do)::

    unshare -n -p -f --mount-proc -- bash -c 'ip link set lo up;
        .venv/bin/python bench/ray_overhead.py --start-cluster'
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers import local  # noqa: E402
from trainers.ray_runner import DEFAULT_ADDRESS, RayRunner  # noqa: E402
from trainers.runner import TrainingSpec  # noqa: E402

HYPER = {"epochs": 1, "lr": 1e-2, "batch": 4, "grad_accum": 1, "max_length": 128}


def tiny_model(root: Path) -> tuple[Path, Path]:
    """(model folder, training file): the tiny Llama and data of tests/trainers/test_lora.py."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.trainers.test_lora import PLAIN_CHATML, _bpe, chat_row, write_jsonl

    rows = [chat_row(i) for i in range(32)]
    texts = [m["content"] for r in rows for m in r["messages"]]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = PLAIN_CHATML
    model = root / "model"
    fast.save_pretrained(model)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, vocab_size=len(fast), max_position_embeddings=256,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model)
    return model, write_jsonl(root / "train.jsonl", rows[:24])


def run_local(root: Path, model: Path, train: Path, name: str, env: dict) -> dict:
    run_dir = root / "local" / name
    spec = {"run_id": name, "model": str(model), "train_file": str(train),
            "output_dir": str(run_dir), **HYPER}  # fmt: skip
    t0 = time.monotonic()
    worker = local.launch(run_dir, spec, env=env)
    while True:
        state = local.read_state(run_dir, worker)
        if state.status != "running" and not local.alive(worker):
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    assert state.status == "succeeded", (state.error, state.log_tail)
    return {"wall": wall}


def run_ray(runner: RayRunner, model: Path, train: Path, name: str) -> dict:
    spec = TrainingSpec(name, str(model), train, hyperparameters={**HYPER, "num_cpus": 1})
    t0 = time.monotonic()
    handle = runner.submit(spec, f"bench-{uuid.uuid4().hex[:8]}:{name}")
    submitted = time.monotonic() - t0
    running = started = None
    while True:
        info = runner._info(handle.id)
        now = time.monotonic() - t0
        if running is None and str(info.status) != "PENDING":
            running = now
        if started is None:
            state = runner.poll(handle)
            if state.total_steps is not None:
                started = now
        if info.status.is_terminal():
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    state = runner.poll(handle)
    assert state.status == "succeeded", (state.error, state.log_tail)
    got = {"wall": wall, "submit": submitted, "running": running, "started": started}
    # With an s3 root, what the job's artifact_sync said it spent copying down and up.
    for line in runner.logs(handle).splitlines():
        for word, key in (
            ("copied from the store in", "s3 down"),
            ("uploaded to the store in", "s3 up"),
        ):
            if line.startswith("artifact_sync:") and word in line:
                got[key] = float(line.rsplit(" in ", 1)[1].split()[0])
    return got


def ray_cli(*args: str) -> float:
    ray = str(Path(sys.executable).with_name("ray"))
    t0 = time.monotonic()
    subprocess.run([ray, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per arm")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both arms")
    parser.add_argument("--address", default=os.environ.get("TUNEBOT_RAY_ADDRESS", DEFAULT_ADDRESS))
    parser.add_argument("--start-cluster", action="store_true", help="time ray start / stop too")
    parser.add_argument("--s3", action="store_true", help="a ray-s3 arm: artifacts on S3 (moto)")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    timings: dict[str, float] = {}
    if args.start_cluster:
        timings["ray start --head"] = ray_cli(
            "start", "--head", "--num-cpus", "2", "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
        )  # fmt: skip
    store = None
    try:
        with tempfile.TemporaryDirectory(prefix="tunebot-ray-bench-") as tmp:
            root = Path(tmp)
            model, train = tiny_model(root)
            runners = {"ray": RayRunner(args.address, root / "ray", env=env)}
            names = ["local", "ray"]
            if args.s3:
                from tests.fakes.s3_store import S3Server

                store = S3Server().start()
                os.environ.update(store.env)  # the bench's own reads of the store
                s3_env = {**env, **store.env}
                runners["ray-s3"] = RayRunner(
                    args.address, f"s3://{store.bucket()}/bench", env=s3_env
                )
                names.append("ray-s3")
            arms: dict[str, list[dict]] = {name: [] for name in names}
            order = (names + names[::-1]) * ((args.repeat + 1) // 2)
            counts = dict.fromkeys(names, 0)
            for arm in order:
                if counts[arm] >= args.repeat:
                    continue
                counts[arm] += 1
                name = f"{arm}{counts[arm]}"
                if arm == "local":
                    got = run_local(root, model, train, name, env)
                else:
                    got = run_ray(runners[arm], model, train, name)
                arms[arm].append(got)
                detail = ", ".join(f"{k} {v:.1f}s" for k, v in got.items() if v is not None)
                print(f"{name}: {detail}", flush=True)
    finally:
        if store is not None:
            store.close()
        if args.start_cluster:
            timings["ray stop --force"] = ray_cli("stop", "--force")
    local_wall = statistics.median(r["wall"] for r in arms["local"])
    ray_wall = statistics.median(r["wall"] for r in arms["ray"])
    print(f"median wall: local {local_wall:.1f}s, ray {ray_wall:.1f}s, "
          f"Ray adds {ray_wall - local_wall:+.1f}s ({ray_wall / local_wall:.2f}x)")  # fmt: skip
    if "ray-s3" in arms:
        s3_wall = statistics.median(r["wall"] for r in arms["ray-s3"])
        print(f"median wall: ray with s3 artifacts {s3_wall:.1f}s, "
              f"S3 adds {s3_wall - ray_wall:+.1f}s to ray ({s3_wall / ray_wall:.2f}x)")  # fmt: skip
    for arm in names[1:]:
        for phase in ("submit", "running", "started"):
            values = [r[phase] for r in arms[arm] if r.get(phase) is not None]
            if values:
                print(f"{arm}, median time to {phase}: {statistics.median(values):.1f}s")
    for what, seconds in timings.items():
        print(f"{what}: {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
