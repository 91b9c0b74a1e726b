"""What an ack does and does not do, and acked work that survives a stop or a crash.

Signed HTTP in, the Slack and OpenAI fakes out. To see what happens *in* an
ack, every job thread is held first: then nothing but the ack itself can call
Slack between sending the request and receiving the 200.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from bot.context import INTERACTIVE_THREADS
from bot.scheduler import start_scheduler
from storage import Store
from tests.bot.test_distill import prompts_file
from tests.bot.test_runs import click, request, texts, upload
from tests.conftest import training_file
from tests.fakes.signing import file_share_message_event, file_shared_event
from tests.fakes.slack_api import DOWNLOAD


@contextmanager
def holding(bot, interactive: bool = True, long: int | None = None):
    """Occupy the bot's job threads (all of them by default) until the block ends."""
    wf = bot.workflow
    long = wf.settings.job_threads if long is None else long
    threads = (INTERACTIVE_THREADS if interactive else 0) + long
    started = threading.Barrier(threads + 1)
    release = threading.Event()

    def hold() -> None:
        started.wait(30)
        release.wait(60)

    for _ in range(INTERACTIVE_THREADS if interactive else 0):
        wf.submit("holding a thread", hold, "", None)
    for _ in range(long):
        wf.submit("holding a thread", hold, "", None, long=True)
    started.wait(30)  # every held thread is inside hold(): no job can run now
    try:
        yield release
    finally:
        release.set()


def calls_during(bot, send) -> tuple[object, list[str]]:
    """Send one request with the job threads held; the Slack calls made before its 200."""
    with holding(bot):
        before = len(bot.slack.calls)
        result = send()
        during = [c.method for c in bot.slack.calls[before:]]
    return result, during


def thread_texts(bot, file, channel="C1"):
    ts = file["shares"]["public"][channel][0]["ts"]
    return [m["text"] for m in bot.slack.messages(channel=channel, thread_ts=ts)]


def reports(bot, file) -> list[str]:
    return [t for t in thread_texts(bot, file) if f"{file['name']} (d" in t and "examples" in t]


# --- what an ack does ----------------------------------------------------------------


def test_a_train_ack_calls_no_slack_api_even_with_a_user_group_to_resolve(paid_bot, slack):
    slack.usergroups["S1"] = ["UA", "UB"]
    bot = paid_bot(approvers=("S1",))
    upload(bot)
    resolved = len(slack.calls_to("usergroups.users.list"))
    assert resolved == 1  # at start, on a job thread

    (status, body), during = calls_during(bot, lambda: bot.command("train", user_id="UR"))
    assert status == 200 and "r1 needs approval" in body["text"], body
    assert during == []
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.card_ts and bot.store.pending_work() == []

    # A stale list is answered as it is and refreshed after the ack, off the ack path.
    runs = bot.workflow.runs
    runs.approvers._cached = (time.monotonic() - 10_000, runs.approvers._cached[1])
    (status, body), during = calls_during(bot, lambda: bot.command("train", user_id="UR"))
    assert status == 200 and "r2 needs approval" in body["text"] and during == []
    bot.wait_idle()
    assert len(slack.calls_to("usergroups.users.list")) == resolved + 1


def test_clicks_ack_without_slack_calls_and_are_recorded_before_the_200(paid_bot):
    bot = paid_bot()
    upload(bot)
    bot.command("train", user_id="UR")
    bot.command("train", user_id="UR")
    bot.wait_idle()

    # Approve: nothing but a pending_work row before the 200; counted once the threads free up.
    with holding(bot):
        before = len(bot.slack.calls)
        assert click(bot, "UA", "approve_run", run_id="r1") == 200
        assert click(bot, "UA", "approve_run", run_id="r1") == 200  # a double click
        assert bot.slack.calls[before:] == []
        (work,) = bot.store.pending_work()
        assert work.kind == "decide" and work.payload_json["args"]["run_id"] == "r1"
        assert bot.store.get_run("r1").status == "pending_approval"
    bot.wait_idle()
    assert bot.store.get_run("r1").status in ("submitting", "running")
    assert len(bot.store.approvals("r1")) == 1 and bot.store.pending_work() == []

    # Reject opens a modal (its trigger lasts 3 s): that is the one call before the 200.
    status, during = calls_during(bot, lambda: click(bot, "UA", "reject_run", run_id="r2"))
    assert status == 200 and during == ["views.open"]


def test_distill_acks_before_reading_the_prompts_and_prices_on_a_job(paid_bot):
    bot = paid_bot()
    upload(bot, prompts_file(12), name="prompts.jsonl")
    with holding(bot):
        status, body = bot.command("distill teacher=gpt-4.1", user_id="UR")
        assert status == 200
        assert body["text"] == (
            "r1: pricing 12 prompts of d1 for gpt-4.1-2025-04-14…, the card follows in d1's thread."
        )
        # Nothing read or tokenised yet: no run, no reservation; the work is recorded.
        assert bot.store.find_run("r1") is None
        assert bot.workflow.runs.gate.ledger.open("run", "r1") is None
        (work,) = bot.store.pending_work("price")
        assert work.payload_json["args"]["run_id"] == "r1"
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.provider == "distill" and run.plan_json["prompts"] == 12 and run.estimate_usd > 0
    reservation = bot.workflow.runs.gate.ledger.open("run", "r1")
    assert reservation is not None and reservation.estimate_usd == run.estimate_usd
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert card["thread_ts"] == bot.store.get_dataset("d1").thread_ts
    assert bot.store.pending_work() == []
    # The next run takes the next id.
    assert "r2: pricing" in bot.command("distill teacher=gpt-4.1", user_id="UR")[1]["text"]


def test_a_distillation_refused_by_the_budget_is_told_in_the_thread(paid_bot):
    bot = paid_bot(monthly_budget_usd=0.0001)
    file = upload(bot, prompts_file(12), name="prompts.jsonl")
    _, body = bot.command("distill teacher=gpt-4.1", user_id="UR")
    assert body["text"].startswith("r1: pricing 12 prompts")
    bot.wait_idle()
    (refusal,) = [t for t in thread_texts(bot, file) if "cannot be requested" in t]
    assert refusal.startswith("⚠️ r1 cannot be requested") and "budget" in refusal
    assert bot.store.find_run("r1") is None
    assert bot.workflow.runs.gate.ledger.open("run", "r1") is None
    assert bot.store.pending_work() == []


def test_a_full_long_queue_answers_busy_instead_of_queueing(paid_bot):
    bot = paid_bot(job_threads=1, job_queue=1)
    upload(bot, prompts_file(12), name="prompts.jsonl")
    big = bot.slack.add_file(training_file(30), name="later.jsonl")
    with holding(bot, interactive=False) as release:
        # One long job runs (held), one waits: the queue is full.
        bot.workflow.submit("waiting", lambda: release.wait(60), "", None, long=True)
        status, body = bot.command("distill teacher=gpt-4.1", user_id="UR")
        assert status == 200
        assert body["text"] == "⚠️ busy: 2 jobs ahead, try again in a few minutes.", body
        assert bot.event(file_share_message_event(big), event_id="EvBusy1") == 200
        assert bot.event(file_shared_event(big), event_id="EvBusy2") == 200
        assert bot.store.pending_work() == []  # nothing queued, nothing half-recorded
    bot.wait_idle()
    busy = [t for t in thread_texts(bot, big) if "busy" in t]
    assert busy == [
        "⚠️ later.jsonl was not checked: busy: 2 jobs ahead, try again in a few minutes."
    ]
    assert bot.store.find_run("r1") is None and len(bot.store.datasets()) == 1
    # Once there is room, the same file shared again is checked, and the run asked for.
    assert bot.event(file_shared_event(big), event_id="EvAgain") == 200
    assert "r1: pricing" in bot.command("distill d1 teacher=gpt-4.1", user_id="UR")[1]["text"]
    bot.wait_idle()
    assert len(reports(bot, big)) == 1 and bot.store.get_run("r1").card_ts


def wait_until(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_an_approval_while_the_long_pool_is_full_starts_once_there_is_room(paid_bot):
    bot = paid_bot(job_threads=1, job_queue=0)
    upload(bot)
    request(bot)
    with holding(bot, interactive=False):  # the one long thread is taken, and no queue
        assert click(bot, "UA", "approve_run") == 200
        note = wait_until(
            lambda: [t for t in texts(bot) if t.startswith("r1 is approved; it starts as soon")],
            "the note in the thread",
        )
        assert note == ["r1 is approved; it starts as soon as a job thread is free (1 jobs ahead)."]
        run = bot.store.get_run("r1")
        assert run.status == "submitting" and run.owner is None  # released, nothing submitted
    bot.wait_idle()
    assert not bot.openai.jobs()
    bot.workflow.runs.poll_all()  # the next tick takes it up
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "running" and len(bot.openai.jobs()) == 1


# --- acked work is not lost ------------------------------------------------------------


def test_shutdown_keeps_queued_ingests_and_the_next_start_does_each_once(make_bot):
    first = make_bot(job_threads=1)
    files = [first.slack.add_file(training_file(10 + i), name=f"f{i}.jsonl") for i in range(2)]
    with holding(first, interactive=False) as release:
        for i, file in enumerate(files):
            assert first.event(file_share_message_event(file), event_id=f"EvQ{i}") == 200
        assert first.event(file_shared_event(files[0]), event_id="EvQdup") == 200
        assert len(first.store.pending_work("ingest")) == 2
        assert first.workflow.close(timeout=0.1) is False  # the held job outlives the drain
        release.set()
        first.workflow.ctx.long_jobs.shutdown(wait=True)
    assert first.store.datasets() == [] and not first.slack.calls_to(DOWNLOAD)
    assert len(first.store.pending_work("ingest")) == 2  # kept for the next start

    second = make_bot()  # the same TUNEBOT_HOME
    assert second.workflow.resume() == 2
    second.wait_idle()
    assert len(second.store.datasets()) == 2 and len(second.slack.calls_to(DOWNLOAD)) == 2
    for file in files:
        assert len(reports(second, file)) == 1, thread_texts(second, file)
    assert second.store.pending_work() == []
    # Seen now: a late redelivery does nothing, and there is nothing left to resume.
    assert second.event(file_shared_event(files[1]), event_id="EvLate") == 200
    second.wait_idle()
    assert second.workflow.resume() == 0 and len(second.store.datasets()) == 2


def test_an_ingest_that_dies_before_recording_is_done_when_the_file_comes_again(bot, monkeypatch):
    real = bot.workflow.datasets.register
    died = []

    def dies_once(*args, **kwargs):
        if not died:
            died.append(True)
            raise RuntimeError("the process died here")
        return real(*args, **kwargs)

    monkeypatch.setattr(bot.workflow.datasets, "register", dies_once)
    file = bot.slack.add_file(training_file(12), name="support.jsonl")
    assert bot.event(file_share_message_event(file), event_id="Ev1") == 200
    bot.wait_idle()
    assert died and bot.store.datasets() == [] and bot.store.pending_work() == []
    assert any("Something went wrong while checking file" in t for t in thread_texts(bot, file))

    assert bot.event(file_shared_event(file), event_id="Ev2") == 200  # another delivery
    bot.wait_idle()
    assert len(bot.store.datasets()) == 1 and len(reports(bot, file)) == 1
    assert bot.event(file_shared_event(file), event_id="Ev3") == 200  # done: ignored now
    bot.wait_idle()
    assert len(bot.store.datasets()) == 1 and len(reports(bot, file)) == 1


def test_concurrent_deliveries_of_one_file_ingest_it_once(bot):
    file = bot.slack.add_file(training_file(12), name="support.jsonl")
    events = [file_share_message_event(file), file_shared_event(file)] * 4

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(
            pool.map(lambda ie: bot.event(ie[1], event_id=f"EvC{ie[0]}"), enumerate(events))
        )
    assert statuses == [200] * 8
    bot.wait_idle()
    assert len(bot.slack.calls_to(DOWNLOAD)) == 1 and len(bot.store.datasets()) == 1
    assert len(reports(bot, file)) == 1


def test_seen_keys_older_than_a_day_are_pruned_by_the_scheduler(bot):
    old = Store(bot.store.path, clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(hours=25))
    try:
        assert old.mark_seen("event:EvOld") and old.mark_seen("file:F1:C1")
    finally:
        old.close()
    assert bot.store.mark_seen("event:EvNew")
    scheduler = start_scheduler(bot.workflow.runs, bot.settings)
    try:
        job = scheduler.get_job("prune_seen")
        assert job.trigger.interval == dt.timedelta(hours=1)
        deadline = time.monotonic() + 30
        while bot.store.seen("event:EvOld") and time.monotonic() < deadline:
            time.sleep(0.05)  # its first run is at start
    finally:
        scheduler.shutdown(wait=True)
    assert not bot.store.seen("event:EvOld") and not bot.store.seen("file:F1:C1")
    assert bot.store.seen("event:EvNew")


def test_a_train_ack_records_the_request_and_the_job_checks_the_budget_again(paid_bot):
    """Two requests that each fit the budget but not together: both acks pass the
    read-only check, and the job's transaction refuses the second in the thread."""
    bot = paid_bot()
    file = upload(bot, training_file(40))
    one = bot.workflow.runs.planner.openai(
        bot.store.get_dataset("d1"),
        bot.workflow.datasets.stored_report(bot.store.get_dataset("d1")),
        {},
        "C1",
    ).estimate.cost_usd
    bot2 = paid_bot(monthly_budget_usd=one * 1.5)
    with holding(bot2):
        acks = [bot2.command("train d1", user_id=f"U{i}")[1]["text"] for i in range(2)]
        assert bot2.store.runs() == [] and len(bot2.store.pending_work("request")) == 2
    bot2.wait_idle()
    assert acks == [
        "r1 needs approval: the card is in d1's thread.",
        "r2 needs approval: the card is in d1's thread.",
    ]
    (run,) = bot2.store.runs()
    refused = "r2" if run.id == "r1" else "r1"
    refusals = [t for t in thread_texts(bot2, file) if "cannot be requested" in t]
    assert len(refusals) == 1 and refusals[0].startswith(f"⚠️ {refused} cannot be requested")
    # Refused by the job's policy check or, when both jobs pass it at once, by the
    # reservation in its transaction: either way the same budget sentence.
    assert "is over what is left of this month's budget" in refusals[0]
    assert "TUNEBOT_MONTHLY_BUDGET_USD" in refusals[0]
    assert bot2.workflow.runs.gate.ledger.open("run", run.id) is not None
    assert bot2.workflow.runs.gate.ledger.open("run", refused) is None
    assert bot2.store.pending_work() == []


def test_a_train_request_acked_before_a_stop_is_recorded_once_at_the_next_start(
    make_bot, openai_fake
):
    settings = dict(
        openai_api_key="sk-test", openai_base_url=openai_fake.base_url, approvers=("UA",),
        default_provider="openai",
    )  # fmt: skip
    first = make_bot(**settings)
    upload(first, training_file(40))
    with holding(first) as release:
        _, body = first.command("train d1", user_id="UR")
        assert body["text"] == "r1 needs approval: the card is in d1's thread."
        assert first.workflow.close(timeout=0.1) is False
        release.set()
        first.workflow.ctx.jobs.shutdown(wait=True)
    assert first.store.runs() == [] and len(first.store.pending_work("request")) == 1

    second = make_bot(**settings)
    assert second.workflow.resume() == 1
    second.wait_idle()
    (run,) = second.store.runs()
    assert run.id == "r1" and run.status == "pending_approval" and run.card_ts
    cards = [
        m for m in second.slack.messages(channel="C1") if "r1" in m["text"] and m.get("blocks")
    ]
    assert len(cards) == 1
    assert second.workflow.runs.gate.ledger.open("run", "r1") is not None
    assert second.workflow.resume() == 0 and second.store.pending_work() == []


def test_a_dataset_forgotten_between_the_train_ack_and_its_job_gets_no_run(paid_bot):
    bot = paid_bot()
    file = upload(bot, training_file(40))
    with holding(bot):
        assert bot.command("train d1", user_id="UR")[1]["text"].startswith("r1 needs approval")
        assert bot.command("forget d1", user_id="U1")[1]["text"] == "d1 is forgotten."
    bot.wait_idle()
    assert bot.store.find_run("r1") is None
    assert "⚠️ r1 cannot be requested: its dataset d1 was forgotten meanwhile." in thread_texts(
        bot, file
    )
    assert bot.workflow.runs.gate.ledger.open("run", "r1") is None
    assert bot.store.pending_work() == []
