"""Attacks on the money guarantees: races, lapsed leases, budget edges, Slack failures.

Each test drives the real bot over signed HTTP against the fake OpenAI and the
fake Slack, counts what reached OpenAI, and checks the spend ledger: at the
end no reservation is open and what is committed is what was actually spent.

Tests with a "Found by attack" comment each name a defect an attack review
found, since fixed: the sequence, what happened and what should. The others
are regression tests for edges not covered elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
import time

import pytest

from tests.bot.test_distill import prompts_file
from tests.bot.test_paid_guarantees import (
    EPOCH,
    creates,
    polling,
    set_settings,
    status,
    succeeded_run,
    uploads,
    wait_for,
)
from tests.bot.test_runs import click, request, submit_reason, texts, upload

JOBS = "/fine_tuning/jobs"


def ledger(bot):
    return bot.workflow.runs.gate.ledger


def open_entries(bot):
    return ledger(bot).open_entries()


def settled_sum(bot) -> float:
    return sum(e.actual_usd or 0.0 for e in ledger(bot).entries(EPOCH) if e.status == "settled")


def assert_ledger_consistent(bot):
    """Nothing left reserved, and committed spend is the sum of what was settled."""
    assert open_entries(bot) == [], f"open reservations left: {open_entries(bot)}"
    assert bot.workflow.runs.committed_usd() == pytest.approx(settled_sum(bot))


# --- a decision racing a cancel, a reject or the expiry ------------------------------------


@pytest.mark.parametrize("rival", ["cancel", "reject", "expire"])
def test_approval_racing_cancel_reject_or_expiry_leaves_no_reservation(paid_bot, rival):
    # Found by attack (now fixed): Runs.decide() -> _budget_changed() re-reserves when it finds no open
    # reservation ("requested before the ledger existed"). If a cancel, a reject or
    # the expiry ends the request (and settles its reservation at $0) after the
    # approver's decision was tallied and before _budget_changed() looks for the
    # reservation, the approval reserves the run's estimate again, then loses the
    # pending_approval -> approved transition, and nothing ever settles the new row:
    # the month's budget stays reduced by the estimate for good (SpendGate.recover()
    # only closes eval/chat rows). Fix: in _budget_changed, re-reserve only when the
    # run has *no* reservation row at all (settled ones included) and only inside
    # the same transaction as the pending_approval -> approved transition; or
    # simply settle/refuse when the transition then fails.
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    estimate = bot.store.get_run("r1").estimate_usd
    store, book = bot.store, ledger(bot)
    original_add, original_open = store.add_approval, book.open
    here = threading.local()
    fired = []

    def add_approval(run_id, user, decision, **kwargs):
        here.deciding = decision == "approve" and user == "UA"
        return original_add(run_id, user, decision, **kwargs)

    def open_then_rival(kind, ref):
        if getattr(here, "deciding", False) and not fired:
            fired.append(rival)  # the rival lands between the tally and the budget check
            if rival == "cancel":
                _, body = bot.command("cancel r1", user_id="UR")
                assert body["text"] == "r1 is cancelled."
            elif rival == "reject":
                assert submit_reason(bot, "UB", "too dear") == 200
                wait_for(lambda: status(bot) == "rejected", what="the rejection")
            else:
                store.update_run("r1", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(1))
                bot.workflow.runs.expire_all()
        return original_open(kind, ref)

    store.add_approval, book.open = add_approval, open_then_rival
    try:
        assert click(bot, "UA", "approve_run") == 200
        bot.wait_idle()
    finally:
        store.add_approval, book.open = original_add, original_open
    assert fired == [rival]
    assert status(bot) in ("cancelled", "rejected", "expired")
    assert not uploads(bot) and not bot.openai.calls_to("POST", JOBS)
    assert estimate > 0
    assert_ledger_consistent(bot)
    assert bot.workflow.runs.committed_usd() == 0.0


# --- cancel while a job may exist but is not recorded ---------------------------------------


@pytest.mark.parametrize("command", ["cancel r1", "forget d1"])
def test_cancel_during_retry_backoff_when_the_lost_create_made_a_job(
    paid_bot, monkeypatch, command
):
    # Found by attack (now fixed): the create reached OpenAI (a 502 after the work: the job exists), the
    # lookup by idempotency key that follows failed too (GET /fine_tuning/jobs 500),
    # so _submit backed off (_retry_later) with the run `submitting` and no
    # external_id. `cancel` then treats it as "waiting" (WAITING and no
    # external_id): the run becomes `cancelled`, its reservation is settled at $0,
    # and nobody ever looks the job up: it trains (and bills) with no run following
    # it. cancel should look the job up by key (tuner.find) and cancel it, or
    # leave the run to the submitter, which finds it after the back-off.
    # `forget d1` does the same (Runs.forget skips only runs with an external_id).
    monkeypatch.setattr("bot.runs.RETRY_BASE_SECONDS", 30.0)  # the cancel lands in the back-off
    bot = paid_bot(judge_model="")
    bot.openai.upload_delay = 1.0
    upload(bot)
    request(bot)
    with polling(bot, 0.1):
        click(bot, "UA", "approve_run")
        wait_for(lambda: uploads(bot), what="the upload")  # the first lookup is done
        bot.openai.inject("POST", JOBS, 502, exact=True, after_handling=True, retry_after=0.01)
        bot.openai.inject("GET", JOBS, 500, times=4, exact=True, retry_after=0.01)
        wait_for(
            lambda: (bot.store.get_run("r1").owner or "").startswith("backoff:"),
            what="the back-off",
        )
        assert len(bot.openai.jobs()) == 1  # the job exists on OpenAI
        _, body = bot.command(command, user_id="UA")
        time.sleep(1.0)  # a few ticks
    job = bot.openai.jobs()[0]
    assert len(uploads(bot)) == 1 and len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    run = bot.store.get_run("r1")
    # Either the job was stopped, or the run still follows it: never a live job with a
    # run that says cancelled and a ledger that says $0.
    assert job["status"] == "cancelled" or run.status not in ("cancelled", "failed"), (
        f"run {run.status}, job {job['id']} {job['status']}, ledger "
        f"${bot.workflow.runs.committed_usd():.4f}; the cancel answered {body['text']!r}"
    )
    assert_ledger_consistent(bot)


@pytest.mark.parametrize("cancel_works", [True, False], ids=["cancel-ok", "cancel-refused"])
def test_cancel_while_the_job_is_being_created(paid_bot, cancel_works):
    # Found by attack (cancel-refused, now fixed): the person's cancel lands while tuner.create is still
    # inside its own retry (the job already exists on OpenAI). cancel() moves the
    # run to `cancelled` and settles its reservation at $0; _submit then fails to
    # release its claim and calls _cancel_orphan_job, which only logs when OpenAI
    # refuses the cancel. The job trains on, billed, with the run `cancelled`, the
    # ledger at $0 and no poller following it (cancelled is not ACTIVE). When the
    # orphan cannot be cancelled the run should stay followed (e.g. `running`
    # with its external_id and its reservation open, cancel retried by the poller).
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    bot.openai.inject("POST", JOBS, 502, exact=True, after_handling=True, retry_after=2)
    if not cancel_works:
        bot.openai.inject("POST", f"{JOBS}/", 500, times=4, retry_after=0.01)
    click(bot, "UA", "approve_run")
    wait_for(lambda: bot.openai.calls_to("POST", JOBS, exact=True), what="the create")
    assert status(bot) == "submitting" and len(bot.openai.jobs()) == 1
    _, body = bot.command("cancel r1", user_id="UR")
    assert body["text"] == "r1 is cancelled."
    bot.wait_idle()
    with polling(bot, 0.1):
        time.sleep(0.5)
    (job,) = bot.openai.jobs()
    assert len(uploads(bot)) == 1 and len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    run = bot.store.get_run("r1")
    assert run.external_id == job["id"]
    assert job["status"] == "cancelled" or run.status not in ("cancelled", "failed"), (
        f"run {run.status}, job {job['status']}, ledger ${bot.workflow.runs.committed_usd():.4f}"
    )
    assert_ledger_consistent(bot)


# --- a lapsed lease: another poller takes the submission over --------------------------------


def hold_db_lock(bot, seconds: float) -> None:
    """Someone else writes to the database for `seconds` (a backup, the sqlite3 shell)."""
    conn = sqlite3.connect(bot.store.path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


@contextlib.contextmanager
def stalled_heartbeat(bot):
    """The bot's lease renewals hang (a stalled process, a long GC pause, a suspended VM)."""
    store, original = bot.store, bot.store.renew_claim
    resume = threading.Event()

    def renew_claim(*args, **kwargs):
        resume.wait(30)
        return original(*args, **kwargs)

    store.renew_claim = renew_claim
    try:
        yield
    finally:
        store.renew_claim = original
        resume.set()


@pytest.mark.parametrize("taker", ["same-bot", "second-bot"])
def test_a_taken_over_submission_is_not_cancelled_by_the_first_submitter(paid_bot, taker):
    # Found by attack (now fixed): the lease lapses while the first submitter is inside tuner.create (its
    # heartbeat stalls longer than TUNEBOT_CLAIM_LEASE_SECONDS: a suspended
    # process, or the database locked, see the next test). A poller (the same
    # bot's own scheduler, or a second bot on the same home after a restart
    # overlap) takes the submission over, finds the job by its key and moves the
    # run to `running` with it. The first submitter's create then returns the
    # same job; its release_claim fails and _submit assumes "cancelled while the
    # job was being created": _cancel_orphan_job cancels the job that the run is
    # following. Nobody asked for a cancel; the run ends `cancelled`.
    # Fix: when release_claim fails, re-read the run and cancel the job only if the
    # run was really cancelled (status in FINISHED and external_id != job.id).
    bot = paid_bot(judge_model="", claim_lease_seconds=0.5)
    poller = bot if taker == "same-bot" else paid_bot(judge_model="", claim_lease_seconds=0.5)
    upload(bot)
    request(bot)
    bot.openai.polls_per_stage = 1000  # the job stays alive for the whole test
    bot.openai.inject("POST", JOBS, 502, exact=True, after_handling=True, retry_after=2.5)
    click(bot, "UA", "approve_run")
    wait_for(lambda: bot.openai.calls_to("POST", JOBS, exact=True), what="the create")
    with polling(poller, 0.1):
        with stalled_heartbeat(bot):
            wait_for(lambda: bot.store.get_run("r1").external_id, what="the job adopted")
        time.sleep(2.5)  # the first submitter's create returns meanwhile
        bot.wait_idle()
    (job,) = bot.openai.jobs()
    assert len(uploads(bot)) == 1 and len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    assert not bot.openai.calls_to("POST", f"{JOBS}/{job['id']}/cancel"), "nobody asked to cancel"
    assert job["status"] != "cancelled" and status(bot) != "cancelled"


def test_the_same_bot_never_runs_two_submissions_of_one_run(paid_bot):
    # Found by attack (now fixed): two jobs for one approval. The lease lapses while the submitter (T1) is
    # uploading (the database was locked longer than the lease, so its heartbeat
    # could not renew). The same bot's scheduler sees the lapsed lease and
    # _take_over() claims the run: claim_run() accepts `owner = self.owner`, and
    # the owner is the *process*, so T1's claim and the new one (T2) are the same
    # claim; every later held.check() of both threads passes. T2 finds T1's file,
    # creates a job (its reply is lost: a 502 after the work) and waits to look it
    # up; T1's upload returns, its check passes, it creates a second job and moves
    # the run to `running` with it. T2's lookup then returns the newest job for the
    # key (T1's), its release fails, and _cancel_orphan_job cancels the job the run
    # follows. End: two jobs created, the one that is left trains untracked, the run
    # says `cancelled` and the ledger $0.
    # Fix: a claim token per attempt (owner + uuid) so a second thread of the same
    # process cannot take a claim over unless the lease really lapsed for *that*
    # token; look the job up by key again right before create; and on a failed
    # release cancel only when the run was really cancelled.
    bot = paid_bot(judge_model="", claim_lease_seconds=0.5)
    bot.openai.polls_per_stage = 1000  # jobs stay alive for the whole test
    bot.openai.upload_delay = 3.0
    upload(bot)
    request(bot)
    with polling(bot, 0.1):
        click(bot, "UA", "approve_run")
        wait_for(lambda: uploads(bot), what="the upload")
        bot.openai.inject("POST", JOBS, 502, exact=True, after_handling=True, retry_after=2.5)
        hold_db_lock(bot, 1.2)  # longer than the lease: the heartbeat cannot renew
        time.sleep(5.0)
        bot.wait_idle()
    jobs = bot.openai.jobs()
    live = [j for j in jobs if j["status"] not in ("cancelled", "failed", "succeeded")]
    run = bot.store.get_run("r1")
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1 and len(jobs) == 1, (
        f"{len(jobs)} jobs for one approval: {[(j['id'], j['status']) for j in jobs]}; "
        f"run {run.status} following {run.external_id}, ledger "
        f"${bot.workflow.runs.committed_usd():.4f}"
    )
    assert all(j["id"] == run.external_id for j in live), "a job trains that no run follows"


# --- the budget at its edges -------------------------------------------------------------------


def shifted_clock(bot, at: dt.datetime):
    """Point the bot's clocks (the store's, the run service's, the gate's) at `at`, ticking."""
    offset = [at - dt.datetime.now(dt.UTC)]

    def clock() -> dt.datetime:
        return dt.datetime.now(dt.UTC) + offset[0]

    runs = bot.workflow.runs
    bot.store._clock = runs.clock = runs.gate.clock = clock

    def move_to(when: dt.datetime) -> None:
        offset[0] = when - dt.datetime.now(dt.UTC)

    return move_to


def test_a_request_approved_after_the_month_turns_counts_in_the_month_it_runs(paid_bot):
    # Found by attack (now fixed): a reservation counts in the month it was *created* (ledger._COMMITTED:
    # created_at >= month start), whether open or settled. r1 is requested on
    # 30 November (reserved there), approved and trained on 1 December; the check at
    # approval (SpendGate.fits) treats it as December's (others + estimate <= budget),
    # but December's committed spend never includes it. r2 is then requested in
    # December against a budget that does not see r1, so December pays for r1 and
    # r2: more than TUNEBOT_MONTHLY_BUDGET_USD. Fix: an open reservation counts in
    # every month until it is settled, and a settled one in the month it was
    # settled (or: move a reservation's month to the approval's when fits() passes).
    bot = paid_bot(judge_model="")
    move_to = shifted_clock(bot, dt.datetime(2026, 11, 30, 23, 50, tzinfo=dt.UTC))
    bot.openai.polls_per_stage = 1000
    upload(bot)
    request(bot)  # r1, reserved on 30 November
    estimate = bot.store.get_run("r1").estimate_usd
    set_settings(bot, monthly_budget_usd=round(1.5 * estimate, 6))  # room for one run
    move_to(dt.datetime(2026, 12, 1, 0, 10, tzinfo=dt.UTC))
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert status(bot) == "running"  # r1 trains in December
    _, body = bot.command("train", user_id="UR")  # r2, in December
    bot.wait_idle()
    if "needs approval" in body["text"]:
        click(bot, "UA", "approve_run", run_id="r2")
        bot.wait_idle()
    december = [r for r in ("r1", "r2") if bot.store.find_run(r) and status(bot, r) == "running"]
    assert len(creates(bot)) == len(december)
    assert len(december) == 1, (
        f"{december} both train in December on a ${1.5 * estimate:.4f} budget "
        f"(${estimate:.4f} each); December's committed spend says "
        f"${bot.workflow.runs.committed_usd():.4f}"
    )


def test_a_run_that_costs_more_than_its_estimate_is_settled_at_its_cost(paid_bot):
    # OpenAI bills what it trained, whatever was estimated (its own "auto" epochs,
    # its own token count). The ledger must say what the job cost, and the overshoot
    # must be seen by the next request.
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    run = bot.store.get_run("r1")
    set_settings(bot, monthly_budget_usd=run.estimate_usd)  # exactly what this run needs
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    job_id = bot.store.get_run("r1").external_id
    with bot.openai._lock:  # OpenAI trains (and bills) five epochs instead of three
        bot.openai._jobs[job_id].obj["hyperparameters"]["n_epochs"] = 5
    bot.openai.run_to_end(job_id)
    bot.workflow.runs.poll_all()
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "succeeded" and run.actual_usd > run.estimate_usd
    assert len(creates(bot)) == 1 and len(uploads(bot)) == 1
    (entry,) = [e for e in ledger(bot).entries(EPOCH) if e.kind == "run"]
    assert entry.status == "settled" and entry.actual_usd == pytest.approx(run.actual_usd)
    assert_ledger_consistent(bot)
    assert bot.workflow.runs.gate.left_usd() == 0.0
    before = len(bot.openai.chat_calls())
    for text in ("train", "eval r1", 'chat r1 "hello"'):
        _, body = bot.command(text, user_id="UR")
        assert "is over what is left of this month's budget" in body["text"], body
    bot.wait_idle()
    assert len(bot.openai.chat_calls()) == before


def test_the_last_dollars_exactly_fit_and_not_a_cent_more(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    estimate = bot.store.get_run("r1").estimate_usd
    set_settings(bot, monthly_budget_usd=2 * estimate)
    assert "r2 needs approval" in request(bot)["text"]  # exactly what is left
    _, body = bot.command("train", user_id="UR")
    assert "cannot be requested" in body["text"] and "$0.00 of $" in body["text"]
    for run_id in ("r1", "r2"):
        click(bot, "UA", "approve_run", run_id=run_id)
    bot.wait_idle()
    assert [status(bot, r) for r in ("r1", "r2")] == ["running", "running"]
    assert len(creates(bot)) == 2 and len(uploads(bot)) == 2
    for run_id in ("r1", "r2"):
        bot.openai.run_to_end(bot.store.get_run(run_id).external_id)
    bot.workflow.runs.poll_all()
    bot.wait_idle()
    assert_ledger_consistent(bot)
    assert bot.workflow.runs.committed_usd() <= 2 * estimate + 1e-9


# --- Slack failing at every step of a paid run ---------------------------------------------------


def test_slack_refusing_every_call_from_approval_to_evaluation(paid_bot):
    """Every Web API call fails (a revoked token) once the card is posted: the run
    still trains once, ends, is evaluated, and every reservation is settled."""
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    token = bot.slack.bot_token
    # chat.postMessage, chat.update, views.publish: all answer invalid_auth
    bot.slack.bot_token = "xoxb-rotated"
    try:
        assert click(bot, "UA", "approve_run") == 200
        bot.wait_idle()
        for _ in range(20):
            bot.workflow.runs.poll_all()
            bot.wait_idle()
            if status(bot) not in ("approved", "submitting", "running"):
                break
    finally:
        bot.slack.bot_token = token
    run = bot.store.get_run("r1")
    assert run.status == "succeeded" and run.actual_usd > 0
    assert len(creates(bot)) == 1 and len(uploads(bot)) == 1
    assert len(bot.store.evals("r1")) == 1
    assert_ledger_consistent(bot)
    run_entry = next(e for e in ledger(bot).entries(EPOCH) if e.kind == "run")
    assert run_entry.actual_usd == pytest.approx(run.actual_usd)


def test_slack_unreachable_when_the_run_ends(paid_bot):
    # Found by attack (now fixed): Runs._finish() moves the run to its final state and settles it, then
    # edits the progress message and posts the result; _edit_progress and
    # Workflow.post catch SlackApiError only, so Slack being unreachable (a
    # connection error, a timeout) escapes _finish before _after_end(): the result
    # is never posted (nothing posts it later: the run is no longer ACTIVE) and the
    # paid evaluation the run was approved with never starts. Fix: treat any
    # exception from a Slack call as "not posted" (log it), and run _after_end
    # whatever the posts did; better, record "result_posted" and let the poller
    # post what is missing once Slack answers.
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    bot.openai.run_to_end(bot.store.get_run("r1").external_id)
    client = bot.workflow.client
    base_url = client.base_url
    client.base_url = "http://127.0.0.1:9/api/"  # nothing listens: connection refused
    try:
        bot.workflow.runs.poll_all()
        bot.wait_idle()
    finally:
        client.base_url = base_url
    for _ in range(3):  # Slack is back
        bot.workflow.runs.poll_all()
        bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "succeeded"
    assert_ledger_consistent(bot)
    told = [t for t in texts(bot) if "r1 🎉 succeeded" in t]
    assert len(told) == 1 and len(bot.store.evals("r1")) == 1, (
        f"result posted {len(told)} time(s), {len(bot.store.evals('r1'))} evaluation(s)"
    )


# --- distillation ----------------------------------------------------------------------------


def answer(request_json):
    return "A careful answer: " + request_json["messages"][-1]["content"]


def teacher_cost(bot, model: str) -> float:
    """What the fake's answered teacher calls cost, from the usage it reported."""
    import json as _json

    from trainers.pricing import inference_cost

    tokens_in = tokens_out = 0
    for call in bot.openai.chat_calls():
        if call.status != 200:
            continue
        params = _json.loads(call.body)
        words = answer(params).split()
        limit = params.get("max_completion_tokens") or len(words)
        tokens_out += min(len(words), limit)
        tokens_in += sum(3 + len(str(m.get("content", "")).split()) for m in params["messages"])
    return inference_cost(model, tokens_in, tokens_out, bot.workflow.prices)


def test_a_distillation_whose_lease_lapses_is_not_failed_while_it_still_spends(paid_bot):
    # Found by attack (now fixed): Distiller.poll() (and Evaluations.poll()) read a lapsed lease as "the bot
    # that held it is dead": the run is moved to `failed` ("interrupted by a restart")
    # and its reservation settled at what was recorded so far. But the lease lapses
    # also while the holder is alive (the database locked for longer than the lease;
    # the same bot's poller does it here). The distillation goes on calling the
    # teacher (its should_stop only looks for `cancelled`), its _end() cannot move the
    # run and finds no open reservation to settle: the teacher calls made after the
    # "failure" are paid and in no ledger, and the thread says the run failed while
    # it still runs. Fix: the worker must stop when its claim is lost (check
    # held.check() / the run's status != running in should_stop), and the ledger
    # must get the final spend even when the reservation was settled by someone
    # else (settle with max(actual, settled) or record an adjustment row).
    bot = paid_bot(claim_lease_seconds=0.5, progress_seconds=0.0)
    bot.openai.chat_script = answer
    bot.openai.latency = 0.25
    upload(bot, prompts_file(48), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    with polling(bot, 0.1):
        click(bot, "UA", "approve_run")
        wait_for(lambda: len(bot.openai.chat_calls()) >= 1, what="the first teacher calls")
        hold_db_lock(bot, 1.2)
        wait_for(lambda: status(bot) != "running", what="the end", timeout=60)
        bot.wait_idle()
    run = bot.store.get_run("r1")
    calls = len(bot.openai.chat_calls())
    spent = teacher_cost(bot, run.model)
    assert_ledger_consistent(bot)
    entry = next(e for e in ledger(bot).entries(EPOCH) if e.kind == "run")
    assert entry.actual_usd == pytest.approx(spent, rel=1e-6), (
        f"run {run.status} ({run.error}); {calls} teacher calls cost ${spent:.6f}, "
        f"the ledger settled ${entry.actual_usd:.6f}, the run says ${run.actual_usd:.6f}"
    )


def test_a_distillation_never_takes_the_month_past_its_budget(paid_bot):
    # Found by attack (now fixed): the distillation is reserved at its estimate, but distill() is allowed
    # max_usd = estimate * (1 + MARGIN) (bot/distillation.py) and judges each chunk's
    # worst case with tiktoken's count, while the bill follows the provider's
    # `usage`. When the provider counts more input tokens than tiktoken (another
    # tokenizer, a system prompt it adds), the run spends past its reservation: here
    # the budget was exactly the reservation and the month ends over it. Fix: reserve
    # estimate * (1 + MARGIN) (or cap max_usd at the reservation plus what the budget
    # still has), and stop on the *reported* spend, not only the predicted one.
    bot = paid_bot(progress_seconds=0.0, distill_max_tokens=8)

    def inflated(request_json):  # the provider counts 4x the prompt tokens we do
        prompt = sum(3 + len(str(m["content"]).split()) for m in request_json["messages"])
        return 200, {
            "id": "chatcmpl-x", "object": "chat.completion", "created": 0,
            "model": request_json["model"],
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "w " * 8}}],
            "usage": {"prompt_tokens": 4 * prompt, "completion_tokens": 8,
                      "total_tokens": 4 * prompt + 8},
        }  # fmt: skip

    bot.openai.chat_script = inflated
    upload(bot, prompts_file(48), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    estimate = bot.store.get_run("r1").estimate_usd
    set_settings(bot, monthly_budget_usd=estimate)  # the month has exactly this run's room
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status in ("succeeded", "failed")
    assert_ledger_consistent(bot)
    committed = bot.workflow.runs.committed_usd()
    assert committed <= estimate + 1e-9, (
        f"{len(bot.openai.chat_calls())} teacher calls: ${committed:.6f} spent on a "
        f"${estimate:.6f} budget ({run.status}: {run.error})"
    )


def test_distillation_cancel_at_the_very_end_settles_once_at_what_was_spent(paid_bot):
    # The money part passes: one settlement at what the teacher calls cost.
    # Found by attack (minor, what the team is told, now fixed): a cancel that lands while the last chunk is
    # answered moves the run to `cancelled`, but Distiller._run() still registers
    # the dataset and posts "r1 done: ... wrote 32 examples -> d2" after _end()
    # posted "r1 cancelled": two contradicting ends in the thread. Fix: in _run(),
    # post render.distilled only when _end() kept the status it was given (or say
    # "cancelled after the last answer; d2 keeps them").
    bot = paid_bot(progress_seconds=0.0)
    bot.openai.chat_script = answer
    bot.openai.latency = 0.2
    upload(bot, prompts_file(32), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    click(bot, "UA", "approve_run")
    wait_for(lambda: len(bot.openai.chat_calls()) >= 32, what="the last teacher call")
    _, body = bot.command("cancel r1", user_id="UR")  # races the end of the distillation
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status in ("cancelled", "succeeded"), body
    assert len(bot.openai.chat_calls()) == 32
    assert_ledger_consistent(bot)
    (entry,) = ledger(bot).entries(EPOCH)
    spent = teacher_cost(bot, run.model)
    assert entry.actual_usd == pytest.approx(spent) and run.actual_usd == pytest.approx(spent)
    ended = [t for t in texts(bot) if t.startswith("<@UR> r1 ")]
    assert len(ended) == 1, ended  # the end is said once


def test_evals_and_chats_race_a_distillation_for_the_last_dollars(paid_bot):
    from concurrent.futures import ThreadPoolExecutor

    bot = paid_bot(judge_model="", progress_seconds=0.0, eval_approval_above_usd=0.0)
    succeeded_run(bot)  # r1, trained; its evaluation only proposed (no embedder to load)
    set_settings(bot, eval_approval_above_usd=1.0)
    bot.openai.chat_script = answer
    upload(bot, prompts_file(32), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")  # r2, reserved at its estimate
    distill_estimate = bot.store.get_run("r2").estimate_usd
    chat = bot.workflow.runs.distiller.chat_estimate(bot.store.get_run("r1"), "Where is my parcel?")
    # Room for what is reserved (r2) and one chat and a half; an eval costs more than that.
    set_settings(bot, monthly_budget_usd=bot.workflow.runs.committed_usd() + 1.5 * chat)
    bot.openai.latency = 0.2
    before = len(bot.openai.chat_calls())
    click(bot, "UA", "approve_run", run_id="r2")
    wait_for(lambda: len(bot.openai.chat_calls()) > before, what="the distillation")
    asks = ['chat r1 "Where is my parcel?"'] * 3 + ["eval r1"] * 2
    with ThreadPoolExecutor(5) as pool:
        acks = list(pool.map(lambda t: bot.command(t, user_id="UR")[1]["text"], asks))
    bot.wait_idle()
    started = [a for a in acks if a.startswith("Asking the base")]
    assert len(started) == 1, acks
    assert not any(a.startswith("Evaluating") for a in acks), acks
    assert status(bot, "r2") == "succeeded"
    assert_ledger_consistent(bot)
    assert bot.workflow.runs.committed_usd() <= bot.workflow.runs.settings.monthly_budget_usd
    assert 0 < bot.store.get_run("r2").actual_usd <= distill_estimate


def test_a_job_cancelled_mid_training_is_not_settled_at_zero(paid_bot):
    # Found by attack (to confirm against OpenAI's billing, now fixed): a job cancelled after it trained
    # part of its steps comes back with trained_tokens null, so Runs._finish()
    # computes actual = None and settles the reservation at $0.00, and the result
    # says "Spent: $0". OpenAI bills the tokens trained before a cancel, so the
    # month's ledger under-counts. The events tell how far it got ("Step k/N").
    # Fix: for a cancelled (or failed after it started) job without trained_tokens,
    # settle at estimate * k/N from the last metrics event, or keep the estimate.
    bot = paid_bot(judge_model="")
    bot.openai.running_polls = 4
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    job_id = bot.store.get_run("r1").external_id
    bot.openai.advance(job_id, 4)  # validated, queued, running, half the steps trained
    bot.workflow.runs.poll_all()
    bot.wait_idle()
    trained = [e for e in bot.openai.events(job_id) if e["type"] == "metrics"]
    assert trained and trained[-1]["data"]["step"] < trained[-1]["data"]["total_steps"]
    _, body = bot.command("cancel r1", user_id="UR")
    assert "Cancelling r1" in body["text"]
    bot.workflow.runs.poll_all()
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "cancelled" and len(creates(bot)) == 1
    assert_ledger_consistent(bot)
    (entry,) = ledger(bot).entries(EPOCH)
    assert entry.actual_usd > 0, (
        f"{trained[-1]['data']['step']}/{trained[-1]['data']['total_steps']} steps trained, "
        f"settled at ${entry.actual_usd:.4f} (estimate ${run.estimate_usd:.4f})"
    )


def test_two_bots_on_one_home_with_short_leases_and_slow_uploads_submit_once(paid_bot):
    """A restart overlap: two schedulers on one database, a 0.5 s lease, a 1.5 s upload."""
    first = paid_bot(judge_model="", claim_lease_seconds=0.5)
    second = paid_bot(judge_model="", claim_lease_seconds=0.5)
    first.openai.upload_delay = 1.5
    first.openai.polls_per_stage = 1000
    upload(first)
    request(first)
    with polling(first, 0.1), polling(second, 0.1):
        click(first, "UA", "approve_run")
        wait_for(lambda: status(first) == "running", what="the job")
        time.sleep(1.0)  # more ticks of both schedulers
    assert len(uploads(first)) == 1
    assert len(first.openai.calls_to("POST", JOBS, exact=True)) == 1
    (job,) = first.openai.jobs()
    assert job["status"] != "cancelled" and first.store.get_run("r1").external_id == job["id"]
    assert first.store.get_run("r1").owner is None
    assert len(open_entries(first)) == 1  # r1's, open while it trains


@pytest.mark.parametrize("end", ["succeeded", "cancelled", "rejected"])
def test_a_crash_between_the_final_state_and_the_settlement_is_recovered(paid_bot, end):
    # Found by attack (now fixed): every end of a run is two transactions: transition_run() to the final
    # state, then gate.settle() (Runs._finish, decide's reject, expire_all, cancel,
    # forget, _fail_submission, Distiller._end). A bot that dies (or whose settle
    # raises "database is locked" after the 5 s busy timeout) in between leaves the
    # run final and its reservation open. Nothing closes it later: the poller only
    # follows ACTIVE runs and SpendGate.recover() closes only eval/chat rows, so the
    # estimate counts against the budget for the rest of the month.
    # Fix: settle in the same transaction as the transition (Store.transaction()
    # nests), and let recover() settle "run" rows whose run is final (at
    # runs.actual_usd, else the recorded actual, else 0 for runs that never started).
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    if end == "succeeded":
        click(bot, "UA", "approve_run")
        bot.wait_idle()
        state = bot.openai.run_to_end(bot.store.get_run("r1").external_id)
        actual = state["trained_tokens"] / 1e6 * 3.0
        # The bot got this far in _finish() and died before gate.settle():
        assert bot.store.transition_run("r1", ["running"], "succeeded", actual_usd=actual)
    else:
        assert bot.store.transition_run("r1", ["pending_approval"], end)  # ... died here
    restarted = paid_bot(judge_model="")  # the same home, a new process
    with polling(restarted, 0.1):  # recover() at start, then a few ticks
        time.sleep(0.5)
    assert status(restarted) == end
    assert_ledger_consistent(restarted)
