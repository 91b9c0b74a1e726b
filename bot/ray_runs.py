"""Local runs on a Ray cluster: the bot's side of ``TUNEBOT_LOCAL_RUNNER=ray``.

A ``provider=local`` run keeps its queue, slots, progress message, cancel and
resume (bot/runs.py); with this setting its worker runs as a Ray job
(`trainers.ray_runner.RayRunner`) on the cluster whose dashboard is at
``TUNEBOT_RAY_ADDRESS``, its files under ``TUNEBOT_ARTIFACTS``. What differs
from a worker process on this machine is here:

- the job's idempotency key: the run's key for its first job,
  ``<key>:attempt-<n>`` for the n-th (`/finetune resume`), because Ray keeps
  a stopped job's submission id for good. Every attempt uses the first key's
  run folder, so the next one continues from the newest complete checkpoint;
- the adapter (and merged model) is copied home, to ``TUNEBOT_HOME/runs/<run>``,
  when the run succeeds, so the evaluation and ``/finetune chat`` load it from
  this machine whatever the artifacts root is;
- a run that needs GPUs says how many the cluster has free while it waits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.runner import Handle, RunnerError, RunState, TrainingSpec

if TYPE_CHECKING:
    from bot.config import Settings
    from trainers.ray_runner import RayRunner

FOLDERS = ("adapter_dir", "merged_dir")  # what a finished run's output names, copied home


def make_runner(settings: Settings) -> RayRunner:
    """The RayRunner of `settings`: its address, and its artifacts root
    (``TUNEBOT_ARTIFACTS``, else ``TUNEBOT_HOME/artifacts``)."""
    from trainers.ray_runner import RayRunner

    root = settings.artifacts or str(settings.home / "artifacts")
    return RayRunner(settings.ray_address, root)


def attempt_key(key: str, attempt: int) -> str:
    """The Ray job's idempotency key for attempt `attempt` (1, 2, …) of the run keyed `key`."""
    if attempt < 1:
        raise ValueError(f"attempt: a whole number >= 1, not {attempt!r}")
    return key if attempt == 1 else f"{key}:attempt-{attempt}"


def handle(runner: RayRunner, key: str, job_id: str) -> Handle:
    """The handle of a run's job: its Ray submission id and the run's folder."""
    return Handle(runner.name, job_id, where=runner.where(key))


def submit(runner: RayRunner, spec: TrainingSpec, key: str, attempt: int) -> tuple[Handle, bool]:
    """(the job, whether it resumes from a checkpoint) for `attempt` of the run keyed `key`:
    the job that key already has, else a new one. Raises `RunnerError`."""
    resume = attempt > 1 and bool(runner.checkpoints(runner.where(key)))
    job = runner.submit(spec, attempt_key(key, attempt), folder_key=key)
    return job, resume


def still_held(runner: RayRunner, key: str, job_id: str) -> bool:
    """Whether the run's last Ray job (`job_id`) is still waiting or running on the cluster.

    A job cancelled while Ray held it back (waiting for GPUs) keeps its place at
    the cluster until Ray can start it, and a stopped worker has up to its grace
    time to save a checkpoint: a resume then would start a second job in the
    same run folder. Raises `RunnerError` when the cluster does not answer.
    """
    return runner.poll(handle(runner, key, job_id)).status in ("queued", "running")


def checkpoints(runner: RayRunner, key: str) -> list[str]:
    """The run's complete checkpoints in its artifacts folder, oldest first."""
    return runner.checkpoints(runner.where(key))


def copy_home(runner: RayRunner, state: RunState, home: Path) -> dict[str, Any]:
    """The adapter (and merged model) of a finished run copied into `home` (the run's
    folder under TUNEBOT_HOME/runs): {"adapter_dir": "<home>/adapter", ...}. Raises
    `RunnerError` when one cannot be copied."""
    copied: dict[str, Any] = {}
    for name in FOLDERS:
        source = state.output.get(name)
        if source:
            copied[name] = str(runner.fetch(str(source), home / Path(str(source)).name))
    return copied


def gpus_needed(hyperparameters: dict[str, Any]) -> float:
    """GPUs a run's Ray job asks for in all: ``num_gpus`` for each of ``num_workers``."""
    per = hyperparameters.get("num_gpus") or 0
    return per * (hyperparameters.get("num_workers") or 1)


def waiting_for(runner: RayRunner, gpus: float) -> str | None:
    """ "waiting for 2 GPUs (the Ray cluster has 0 of 1 free)" when a run needs more GPUs
    than the cluster has free now; None when it has them, or does not answer within 3 s
    (this runs on the scheduler's thread)."""
    if not gpus:
        return None
    try:
        free, total = runner.resources(timeout=3).get("GPU", (0.0, 0.0))
    except RunnerError:
        return None
    if free >= gpus:
        return None
    return f"waiting for {_count(gpus)} GPU{'s' if gpus != 1 else ''} (the Ray cluster has {_count(free)} of {_count(total)} free)"


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
