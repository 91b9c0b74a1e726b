"""The Runner interface: one shape for every training backend.

A runner trains a model somewhere (a hosted fine-tuning API, a worker
process on this machine, a cluster) and knows nothing of Slack or of
tunebot's database. The bot's run service drives every runner the same way,
so the rules that keep a paid job from starting twice (a claim with a lease,
an idempotency key, "every run ends somewhere a person can see") are
written once, in the bot, not once per backend:

    handle = runner.find(key) or runner.submit(spec, key)   # under the claim
    state = runner.poll(handle, cursor=cursor)              # every tick
    runner.cancel(handle)                                   # on /finetune cancel

`key` is the idempotency key, unique to the installation and the run
(``"<installation id>:<run id>"``): a runner records it with the job (job
metadata, a file name, a submission id) so that `find` can tell after a
crash, a retry or a restart whether the job already exists. `submit` looks
first, and creates nothing when it does.

Adding a backend is one module with a class that has these four methods
and a line in `trainers.runners.RUNNERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from trainers.errors import RunnerError

__all__ = [
    "STATUSES", "TERMINAL", "Handle", "RunEvent", "RunState", "Runner", "RunnerError",
    "Step", "TrainingSpec",
]  # fmt: skip

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class TrainingSpec:
    """What to train, the same for every backend.

    `train_file` and `eval_file` are chat JSONL that tunebot validated.
    `hyperparameters` uses the field's names (``epochs``, ``batch``, ``lr``,
    ``lr_mult``, ``r``, ``alpha``, ``max_length``, …); a runner takes those it
    knows and raises `RunnerError` for a value it cannot honour. A value of
    None means "the backend's default". `output_dir` is where a runner that
    writes files keeps them (checkpoints, logs, the adapter).
    """

    run_id: str
    model: str
    train_file: Path
    eval_file: Path | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    suffix: str | None = None
    output_dir: Path | None = None


@dataclass(frozen=True)
class Handle:
    """A submitted job.

    `id`: the backend's name for it (a job id, ``pid:1234``, a Ray submission
    id). `reused`: `submit` found it for the key instead of creating it.
    `files`: what was uploaded to the backend for it (to delete later).
    `where`: where its files live, for runners that write them. `status`: one
    of `STATUSES` as `submit` or `find` saw it (None: not asked).
    """

    runner: str
    id: str
    reused: bool = False
    files: tuple[str, ...] = ()
    where: str | None = None
    status: str | None = None


@dataclass(frozen=True)
class RunEvent:
    """One line of a job's log as the backend tells it (oldest first in a `RunState`)."""

    id: str
    created_at: int  # Unix seconds
    message: str
    level: str = "info"


@dataclass(frozen=True)
class RunState:
    """One poll of a job.

    `status` is one of `STATUSES`. `events` are those after the `cursor`
    given to `poll`; pass `cursor` back on the next poll. `step`,
    `total_steps` and `train_loss` come from the newest progress seen (None:
    not known yet). `metrics` is (step, training loss) for every step known.
    `output` names what a finished job made (``fine_tuned_model`` for a
    hosted one, ``adapter_dir`` / ``merged_dir`` for a local one). Cost:
    `trained_tokens` as the backend bills them, and `cost_usd` when the
    backend states a price itself (None: price the tokens).
    """

    status: str
    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    events: tuple[RunEvent, ...] = ()
    cursor: str | None = None
    metrics: tuple[tuple[int, float], ...] = ()
    error: str | None = None
    output: Mapping[str, Any] = field(default_factory=dict)
    trained_tokens: int | None = None
    cost_usd: float | None = None
    log_tail: str | None = None
    estimated_finish: int | None = None  # Unix seconds, when the backend says
    eta_seconds: float | None = None  # from the backend's own progress lines
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def progress(self) -> float | None:
        """Fraction of steps done, 0..1, when known."""
        if self.status == "succeeded":
            return 1.0
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


# Called by `submit` after each step that leaves something behind at the
# backend (("uploaded", file id), ("created", job id)); it may raise to stop
# the submission there (the bot does when its claim on the run was lost).
Step = Callable[[str, str], None]


class Runner(Protocol):
    """What every training backend offers; see the module's docstring."""

    name: ClassVar[str]

    def submit(self, spec: TrainingSpec, key: str, *, step: Step | None = None) -> Handle:
        """Start training `spec` once for `key`: the existing job when there is one."""
        ...

    def find(self, key: str) -> Handle | None:
        """The job made for `key`, or None."""
        ...

    def poll(self, handle: Handle, *, cursor: str | None = None) -> RunState:
        """Where the job stands now, with the events after `cursor`."""
        ...

    def cancel(self, handle: Handle) -> None:
        """Stop the job (a finished one is left as it is)."""
        ...

    def delete_file(self, file_id: str) -> bool:
        """Delete a file `submit` left at the backend (one of `Handle.files`); False
        when it was already gone. Runners that upload nothing return False."""
        ...
