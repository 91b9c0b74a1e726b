"""A LoRA run over several workers: `trainers.lora` under Ray Train, data-parallel.

``python -m trainers.ray_train --workers N [--gpus-per-worker G] [--spread | --same-node] SPEC.json``
is the entrypoint `trainers.ray_runner.RayRunner` gives a Ray job whose
hyperparameters ask for ``num_workers`` > 1. It runs inside the job (so
``ray.init()`` joins the job's cluster) and starts a Ray Train
``TorchTrainer`` with a ``ScalingConfig`` of N workers, each with G GPUs (CPU
when G is 0) and one CPU. Ray Train sets up the torch.distributed process
group (NCCL on GPUs, gloo on CPU) and ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` on each worker; every worker then runs the same
`trainers.lora.main` as a single-process run: transformers' Trainer sees
the process group, wraps the model in DDP and shards the batches with its
distributed sampler (each of N workers trains on 1/N of each epoch's
batches). Rank 0 alone writes progress.jsonl, checkpoints, the adapter and
result.json, in the same run folder and layout as a one-process run.
``--spread`` spreads the workers over the nodes (``SPREAD``: on as many
nodes as can take them), for ``nodes=M`` runs. ``--same-node`` keeps every
worker on the driver's node (Ray's ``node:<ip>`` resource, ``STRICT_PACK``):
with an object-store root (`trainers.artifact_sync`) the run folder is a
scratch folder on that node alone.

Exit status: 0 when every worker's run ended (succeeded or cancelled: the
result says which), 1 when one failed (rank 0's result.json says why), 2 for
bad arguments.

Cancel: Ray's ``stop_job`` sends SIGTERM to this driver only; the workers
are Ray actors it does not reach. On SIGTERM the driver writes ``STOP_FILE``
in the run folder and keeps waiting; each worker's `trainers.lora.StopFlag`
sees the file at its next optimizer step, the ranks agree on that step (an
all_reduce of the flag every step, so no rank is left in a collective),
rank 0 saves the checkpoint and writes ``cancelled``, and all return; then
the driver exits 0. Ray kills whatever is left after the job's stop wait
(``RAY_JOB_STOP_WAIT_TIME_S``, the runner's ``stop_grace_s``). A stop file
left by an earlier attempt is removed when the driver starts.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STOP_FILE = "stop.request"  # in the run folder: its existence asks the workers to stop


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the one-process worker's main, in the worker's process group."""
    from trainers import lora

    code = lora.main([config["spec"]], stop_file=config["stop_file"])
    if code != 0:
        raise RuntimeError(f"rank {lora._rank()}: the LoRA worker exited with status {code}")


NODE_SHARE = 0.001  # of Ray's per-node `node:<ip>` resource (1.0 a node): pins, takes nothing


def scaling(workers: int, gpus_per_worker: float, spread: bool, node: str | None = None) -> Any:
    """The ScalingConfig for `workers` workers of `gpus_per_worker` GPUs and 1 CPU each:
    spread over the nodes, packed (Ray's default), or all on the node at IP `node`."""
    from ray.train import ScalingConfig

    if spread and node:
        raise ValueError("spread and one node exclude each other")
    resources: dict[str, float] = {"CPU": 1}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    strategy = "SPREAD" if spread else "PACK"
    if node:
        resources[f"node:{node}"] = NODE_SHARE
        strategy = "STRICT_PACK"
    return ScalingConfig(
        num_workers=workers,
        use_gpu=bool(gpus_per_worker),
        resources_per_worker=resources,
        placement_strategy=strategy,
    )


def _stop_on_sigterm(stop_file: Path) -> None:
    """SIGTERM / SIGINT write `stop_file` (the workers stop at their next step) and
    leave this driver waiting for them, instead of ending it."""

    def handle(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):  # nothing to do but wait for Ray's SIGKILL
            stop_file.touch()
        print(f"signal {signum}: asked the workers to save a checkpoint and stop", flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.ray_train", description=__doc__)
    parser.add_argument("--workers", type=int, required=True, help="data-parallel workers (>= 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: train on CPU")
    place = parser.add_mutually_exclusive_group()
    place.add_argument("--spread", action="store_true", help="spread workers over nodes")
    place.add_argument("--same-node", action="store_true", help="every worker on this node")
    parser.add_argument("spec", help="the run's spec.json (trainers.lora.LoraSpec)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 2 if exc.code else 0
    if args.workers < 1 or args.gpus_per_worker < 0:
        print("--workers must be >= 1 and --gpus-per-worker >= 0", file=sys.stderr)
        return 2
    spec = str(Path(args.spec).resolve())

    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(spec).parent
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # an earlier attempt's cancel: this one is wanted
    ray.init(log_to_driver=True)
    _stop_on_sigterm(stop_file)  # after ray.init, which sets its own handler
    node = ray.util.get_node_ip_address() if args.same_node else None
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec, "stop_file": str(stop_file)},
        scaling_config=scaling(args.workers, args.gpus_per_worker, args.spread, node),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # a worker failed: rank 0's result.json has the reason
        print(f"Ray Train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
