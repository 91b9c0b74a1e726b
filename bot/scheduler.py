"""Background ticks: follow running jobs and expire stale approval requests.

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


def start_scheduler(runs: Runs, settings: Settings) -> BackgroundScheduler:
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        timezone=dt.UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    now = dt.datetime.now(dt.UTC)
    scheduler.add_job(
        runs.poll_all, "interval", seconds=settings.poll_seconds, id="poll_runs", next_run_time=now
    )
    scheduler.add_job(
        runs.expire_all, "interval", seconds=EXPIRY_SECONDS, id="expire_requests", next_run_time=now
    )
    scheduler.start()
    return scheduler
