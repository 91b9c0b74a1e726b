"""What the run service (bot/runs.py) offers the use-cases it builds.

Evaluations, distillation, migration, downloads and the local queue are built
by `Runs` and call back into it (find a run, claim it, put a plan to the
approvers, end a run). They are typed against this Protocol instead of
importing bot/runs.py, so imports go one way: runs.py imports them, they
import this leaf.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bot import render
    from bot.approvers import Approvers
    from bot.backends import Backends
    from bot.config import Settings
    from bot.plans import Planner
    from bot.results import RunResult
    from bot.spend import SpendGate
    from storage import Dataset, Run
    from trainers.runner import RunState


class RunService(Protocol):
    """The part of `bot.runs.Runs` its use-cases reach."""

    settings: Settings
    clock: Callable[[], dt.datetime]
    lease: dt.timedelta  # how long a claim holds without a heartbeat
    gate: SpendGate
    backends: Backends
    approvers: Approvers
    planner: Planner
    local_overrides: dict[str, Any]

    def find_run(self, ref: str | None, channel: str) -> Run: ...

    def claim_token(self) -> str: ...

    def request_plan(
        self,
        plan: dict,
        dataset: Dataset,
        channel: str,
        user: str,
        *,
        unique: Callable[[], None] | None = None,
    ) -> render.Message: ...

    def _put_to_approvers(
        self, plan: dict, channel: str, user: str, *, run_id: str | None = None
    ) -> render.Message: ...

    def _finish(
        self,
        run: Run,
        from_status: str,
        status: str,
        *,
        state: RunState | None = None,
        error: str | None = None,
        data: RunResult | None = None,
    ) -> None: ...

    def _after_end(self, done: Run, metrics: Any, log_tail: str | None = None) -> None: ...

    def _refresh_homes(self, run: Run) -> None: ...
