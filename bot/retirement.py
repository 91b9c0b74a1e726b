"""The retirement watch: each channel that owns a fine-tuned model hears, 30, 7 and
1 days before, that its model stops serving.

A daily scheduler job (`RetirementWatch.check`). Each notice is claimed in the
audit log (action `retirement_notice`, with the days and the date) in the
same transaction that checks none was sent, so a restart, a second process
or a second tick never posts it twice. The facts come from
trainers.retirement, with their source.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from bot import render
from bot.results import RunResult
from trainers import retirement

if TYPE_CHECKING:
    from storage import Run, Store

log = logging.getLogger("tunebot")

NOTICE = "retirement_notice"  # the audit action that records a notice


class RetirementWatch:
    """`check()` posts what is due today; `post(channel, thread_ts, message)` is the
    bot's post, and `clock` gives the current aware datetime."""

    def __init__(
        self,
        store: Store,
        post: Callable[[str, str | None, render.Message], object],
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.store = store
        self.post = post
        self.clock = clock

    def check(self) -> int:
        """Post every notice due today; returns how many were posted."""
        today = self.clock().date()
        posted = 0
        for run in self.store.runs(status="succeeded", limit=None):
            model = RunResult.of(run).fine_tuned_model
            ends = retirement.serving_ends(model) if model else None
            days_left = (ends - today).days if ends else -1
            if retirement.notice_due(days_left, set()) is None:
                continue  # too early, or over: nothing to claim
            days = self._claim(run, days_left, ends)
            if days is None:
                continue
            self.post(run.channel, None, render.retirement_notice(run, model, ends, days))
            log.info("run %s: %d-day notice that %s stops serving on %s", run.id, days, model, ends)
            posted += 1
        return posted

    def _claim(self, run: Run, days_left: int, ends: dt.date) -> int | None:
        """The notice due for `run` now, recorded as sent; None when none is due."""
        with self.store.transaction():
            sent = {
                int((entry.detail_json or {}).get("days", -1))
                for entry in self.store.audit_log(run_id=run.id, limit=None)
                if entry.action == NOTICE
            }
            days = retirement.notice_due(days_left, sent)
            if days is not None:
                self.store.audit(
                    "tunebot", NOTICE, run_id=run.id,
                    detail={"days": days, "ends": ends.isoformat()},
                )  # fmt: skip
            return days
