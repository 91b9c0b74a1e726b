"""The retirement watch: 30, 7 and 1 days before a fine-tuned model stops serving, its
channel is told once each, whatever the restarts."""

from __future__ import annotations

import datetime as dt

from bot.retirement import NOTICE, RetirementWatch
from tests.bot.test_paid_guarantees import succeeded_run
from tests.bot.test_runs import texts


class Clock:
    def __init__(self, day: dt.date) -> None:
        self.now = dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def notices(bot) -> list[str]:
    return [t for t in texts(bot) if "stops serving on 2027-01-14" in t]


def test_each_notice_once_at_30_7_and_1_days_and_never_twice_after_a_restart(paid_bot):
    bot = paid_bot(judge_model="")
    run = succeeded_run(bot)
    model = run.result_json["fine_tuned_model"]
    assert model.startswith("ft:gpt-4o-mini")
    clock = Clock(dt.date(2026, 12, 1))
    watch = RetirementWatch(bot.store, bot.workflow.post, clock)
    posted = []
    for _ in range(46):  # 2026-12-01 .. 2027-01-15, twice a day, a new watch each noon
        for restart in (False, True):
            if restart:
                watch = RetirementWatch(bot.store, bot.workflow.post, clock)
            posted.append((clock.now.date(), watch.check()))
        clock.now += dt.timedelta(days=1)
    days_told = [day for day, count in posted if count]
    assert days_told == [dt.date(2026, 12, 15), dt.date(2027, 1, 7), dt.date(2027, 1, 13)]
    assert sum(count for _, count in posted) == 3
    told = notices(bot)
    assert len(told) == 3
    assert "(in 30 days)" in told[0] and "(in 7 days)" in told[1] and "(tomorrow)" in told[2]
    assert all(f"`{model}`" in t and "provider=local" in t for t in told)
    audit = [e for e in bot.store.audit_log(run_id="r1", limit=None) if e.action == NOTICE]
    assert sorted(e.detail_json["days"] for e in audit) == [1, 7, 30]


def test_runs_list_and_app_home_show_the_date(paid_bot):
    bot = paid_bot(judge_model="")
    bot.slack.memberships["UR"] = ["C1"]
    succeeded_run(bot)
    _, body = bot.command("runs", user_id="UR")
    assert "r1 — openai" in body["text"] and "its model stops serving on 2027-01-14" in body["text"]
    home = bot.workflow.home_tab.home("UR")
    text = str(home["blocks"])
    assert "*Models that stop serving*" in text and "stops serving on 2027-01-14" in text


def test_a_model_with_no_known_end_is_never_noticed(paid_bot):
    bot = paid_bot(judge_model="")
    run = succeeded_run(bot)
    bot.store.update_run(run.id, result_json={**run.result_json, "fine_tuned_model": "ft:x:y::z"})
    clock = Clock(dt.date(2027, 1, 13))
    assert RetirementWatch(bot.store, bot.workflow.post, clock).check() == 0 and not notices(bot)


def test_the_scheduler_runs_the_watch_daily_and_at_start(bot):
    from bot.scheduler import start_scheduler

    scheduler = start_scheduler(bot.workflow.runs, bot.settings)
    try:
        job = scheduler.get_job("retirement_watch")
        assert job.trigger.interval == dt.timedelta(days=1)
    finally:
        scheduler.shutdown(wait=True)
