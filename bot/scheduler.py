"""Background ticks: follow running jobs, expire stale approval requests, prune seen
keys, resume acked work, and warn of models that stop serving.

apscheduler 3.x's BackgroundScheduler, with coalescing and one instance per
job: a slow OpenAI poll delays the next tick instead of piling ticks up. The
database is the source of truth, so a restarted bot resumes on its first tick.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from bot.config import Settings
    from bot.runs import Runs

EXPIRY_SECONDS = 60
PRUNE_SECONDS = 3600  # how often seen delivery ids and file keys are pruned
SEEN_KEPT = dt.timedelta(days=1)  # Slack stops redelivering an event within hours
RESUME_SECONDS = 60  # how often acked work nobody holds (a full queue at start) is taken up
RETIREMENT_SECONDS = 24 * 3600  # the retirement watch (bot.retirement): daily, and at start


def prune_seen(runs: Runs) -> int:
    """Forget seen keys older than a day: the table would otherwise grow without end."""
    pruned = runs.store.prune_seen(SEEN_KEPT)
    if pruned:
        import logging

        logging.getLogger("tunebot").info("%d seen key(s) older than a day pruned", pruned)
    return pruned


def start_scheduler(runs: Runs, settings: Settings) -> BackgroundScheduler:
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        timezone=dt.UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    recovered = runs.gate.recover()  # spend a dead process left open
    if recovered:
        import logging

        logging.getLogger("tunebot").info(
            "%d open evaluation/chat reservation(s) closed", len(recovered)
        )
    runs.migrations.after_restart(recovered)  # the threads told; lost comparisons made
    now = dt.datetime.now(dt.UTC)
    scheduler.add_job(
        runs.poll_all, "interval", seconds=settings.poll_seconds, id="poll_runs", next_run_time=now
    )
    scheduler.add_job(
        runs.expire_all, "interval", seconds=EXPIRY_SECONDS, id="expire_requests", next_run_time=now
    )
    scheduler.add_job(
        prune_seen, "interval", args=[runs], seconds=PRUNE_SECONDS, id="prune_seen",
        next_run_time=now,
    )  # fmt: skip
    scheduler.add_job(
        runs.ctx.resume, "interval", kwargs={"at_start": False}, seconds=RESUME_SECONDS,
        id="resume_work",
    )  # fmt: skip
    from bot.retirement import RetirementWatch

    watch = RetirementWatch(runs.store, runs.ctx.post, runs.clock)
    scheduler.add_job(
        watch.check, "interval", seconds=RETIREMENT_SECONDS, id="retirement_watch",
        next_run_time=now,
    )  # fmt: skip
    scheduler.start()
    return scheduler
