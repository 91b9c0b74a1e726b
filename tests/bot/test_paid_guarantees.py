"""Paid work: approved, within budget, done exactly once, always ending visibly.

Each test breaks the promise the way it breaks in real life (a scheduler
polling every 0.2 s while an upload is held, twenty simultaneous clicks,
concurrent requests racing for the last dollars, two installations on one
OpenAI project) and counts what reached the fake OpenAI exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from slack_sdk import WebClient

from bot.scheduler import start_scheduler
from tests.bot.test_distill import prompts_file, teacher
from tests.bot.test_runs import click, request, texts, upload
from tests.conftest import training_file
from tests.fakes.signing import file_share_message_event

JOBS = "/fine_tuning/jobs"
EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@contextlib.contextmanager
def polling(bot, seconds: float = 0.2):
    """The real scheduler, ticking every `seconds`."""
    scheduler = start_scheduler(
        bot.workflow.runs, dataclasses.replace(bot.settings, poll_seconds=seconds)
    )
    try:
        yield scheduler
    finally:
        scheduler.shutdown(wait=True)
        bot.wait_idle()


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(bot, run_id: str = "r1") -> str:
    return bot.store.get_run(run_id).status


def creates(bot) -> list:
    """Job creations OpenAI accepted."""
    return [c for c in bot.openai.calls_to("POST", JOBS, exact=True) if c.status == 200]


def uploads(bot) -> list:
    return bot.openai.calls_to("POST", "/files", exact=True)


def set_settings(bot, **changes) -> None:
    runs = bot.workflow.runs
    changed = dataclasses.replace(runs.settings, **changes)
    runs.settings = runs.evals.settings = runs.gate.settings = changed
    runs.distiller.settings = runs.ctx.settings = changed


def finish_jobs(bot) -> None:
    for job in bot.openai.jobs():
        bot.openai.run_to_end(job["id"])


# --- exactly once ---------------------------------------------------------------


def test_one_approval_is_one_upload_and_one_job_while_the_scheduler_polls(paid_bot):
    bot = paid_bot(judge_model="")
    bot.openai.upload_delay = 1.5  # every poll during the upload sees a run being submitted
    upload(bot)
    request(bot)
    with polling(bot):
        assert click(bot, "UA", "approve_run") == 200
        wait_for(lambda: status(bot) == "running", what="the job")
        assert bot.store.get_run("r1").owner is None  # the claim is given back
        finish_jobs(bot)
        wait_for(lambda: status(bot) == "succeeded", what="success")
        wait_for(lambda: bot.store.evals("r1"), what="the evaluation")
    assert len(uploads(bot)) == 1
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    assert len([t for t in texts(bot) if "r1 🎉 succeeded" in t]) == 1
    entry = bot.workflow.runs.gate.ledger.entries(EPOCH)[0]
    assert entry.ref == "r1" and entry.status == "settled" and entry.actual_usd > 0


def test_twenty_simultaneous_approvals_with_the_scheduler_polling(paid_bot):
    bot = paid_bot(judge_model="", approvers=tuple(f"UA{i}" for i in range(20)))
    bot.openai.upload_delay = 1.0
    upload(bot)
    request(bot)
    with polling(bot), ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda i: click(bot, f"UA{i}", "approve_run"), range(20)))
        assert codes == [200] * 20
        wait_for(lambda: status(bot) == "running", what="the job")
        time.sleep(1.0)  # a few more ticks: none of them may submit again
    assert len(uploads(bot)) == 1
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    # Each click counted once: recorded while the request was open, refused once it was not.
    counted = len(bot.store.approvals("r1"))
    late = [e for e in bot.store.audit_log(run_id="r1") if e.action == "refused_approve"]
    assert counted >= 1 and counted + len(late) == 20


def test_a_retryable_error_at_creation_reuses_the_one_upload(paid_bot, monkeypatch):
    monkeypatch.setattr("bot.runs.RETRY_BASE_SECONDS", 0.2)
    bot = paid_bot(judge_model="")
    bot.openai.inject("POST", JOBS, 500, times=8, exact=True)  # two whole submissions fail
    upload(bot)
    request(bot)
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(lambda: status(bot) == "running", what="the job", timeout=90)
    assert len(uploads(bot)) == 1
    attempts = bot.openai.calls_to("POST", JOBS, exact=True)
    assert len(attempts) == 9 and len(creates(bot)) == 1  # 4 + 4 refused, then one created
    assert list(bot.openai.files) == [bot.store.get_run("r1").result_json["training_file"]]


def test_a_definite_refusal_fails_once_deletes_the_upload_and_releases_the_money(paid_bot):
    bot = paid_bot(judge_model="", monthly_budget_usd=50.0)
    bot.openai.inject("POST", JOBS, 400, exact=True)
    upload(bot)
    request(bot)
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(lambda: status(bot) == "failed", what="the failure")
        time.sleep(0.6)
    assert len(uploads(bot)) == 1 and bot.openai.files == {}
    assert len([t for t in texts(bot) if "r1 ❌ failed" in t]) == 1
    assert bot.workflow.runs.committed_usd() == 0.0


def test_an_unexpected_error_between_claim_and_job_ends_the_run_visibly(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    # The training split disappears from disk (a full disk, a careless cleanup).
    data = bot.store.get_run("r1").result_json["data"]
    bot.workflow.blobs.delete(data["train_sha256"])
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(lambda: status(bot) == "failed", what="the failure")
    run = bot.store.get_run("r1")
    assert "tunebot could not submit it (BlobNotFound" in run.error
    (told,) = [t for t in texts(bot) if "r1 ❌ failed" in t]
    assert "BlobNotFound" in told and "/tmp" not in told  # no server path in Slack
    assert not bot.openai.calls_to("POST", JOBS) and bot.workflow.runs.committed_usd() == 0.0


def test_cancel_during_the_upload_makes_no_job_and_leaves_no_file(paid_bot):
    bot = paid_bot(judge_model="")
    bot.openai.upload_delay = 1.5
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")  # runs the submission on the bot's job thread
    wait_for(lambda: uploads(bot), what="the upload to start")
    assert status(bot) == "submitting"
    _, body = bot.command("cancel r1", user_id="UR")
    assert body["text"] == "r1 is cancelled."
    bot.wait_idle()
    assert status(bot) == "cancelled"
    assert not creates(bot) and bot.openai.files == {}
    assert bot.workflow.runs.committed_usd() == 0.0


# --- the budget -------------------------------------------------------------------


def test_ten_concurrent_requests_against_a_budget_for_seven(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)  # r1 tells the estimate; withdrawn at once
    estimate = bot.store.get_run("r1").estimate_usd
    bot.command("cancel r1", user_id="UR")
    bot.wait_idle()
    assert bot.workflow.runs.committed_usd() == 0.0
    set_settings(bot, monthly_budget_usd=round(7.5 * estimate, 6))

    with ThreadPoolExecutor(10) as pool:
        acks = list(
            pool.map(lambda i: bot.command("train", user_id=f"UR{i}")[1]["text"], range(10))
        )
    bot.wait_idle()
    # An ack refuses what the committed spend already rules out; requests that
    # pass it together are settled by the job's transaction, told in the thread.
    refused_in_ack = [a for a in acks if a.startswith("⚠️ This run cannot be requested")]
    refused_later = [t for t in texts(bot) if t.startswith("⚠️ r") and "cannot be requested" in t]
    assert len(refused_in_ack) + len(refused_later) == 3
    assert len([a for a in acks if "needs approval" in a]) == 10 - len(refused_in_ack)
    # One sentence for a budget refusal, whichever check caught it.
    assert all("is over what is left of this month's budget" in r for r in refused_in_ack)
    assert all("is over what is left of this month's budget" in r for r in refused_later)
    waiting = bot.store.runs(status="pending_approval", limit=None)
    assert len(waiting) == 7

    with polling(bot), ThreadPoolExecutor(7) as pool:
        list(pool.map(lambda r: click(bot, "UA", "approve_run", run_id=r.id), waiting))
        wait_for(lambda: len(bot.openai.jobs()) == 7, what="seven jobs")
        finish_jobs(bot)
        wait_for(
            lambda: all(status(bot, r.id) == "succeeded" for r in waiting), what="seven successes"
        )
        time.sleep(1.0)
    assert len(uploads(bot)) == 7 and len(creates(bot)) == 7
    assert bot.workflow.runs.committed_usd() <= 7.5 * estimate + 1e-9


def test_approval_checks_the_budget_again(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot)
    set_settings(bot, monthly_budget_usd=bot.store.get_run("r1").estimate_usd / 2)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "rejected" and "the budget changed since the request" in run.error
    assert not bot.openai.calls_to("POST", "/files")
    assert any("r1 cannot start: the budget changed" in t for t in texts(bot))


# --- evaluations and chats --------------------------------------------------------------


def succeeded_run(bot, content: bytes | None = None):
    """An OpenAI run trained to the end (on `content`, else the default training file),
    its automatic evaluation done."""
    upload(bot, content)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    for _ in range(30):
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        if status(bot) == "succeeded":
            break
    bot.wait_idle()
    return bot.store.get_run("r1")


def test_three_simultaneous_evals_make_one_and_strangers_make_none(paid_bot):
    bot = paid_bot(judge_model="")
    run = succeeded_run(bot)
    held_out = run.result_json["data"]["split"]["eval"]
    before = len(bot.openai.chat_calls())

    _, body = bot.command("eval r1", user_id="UX")  # a channel member, not the requester
    assert "Only <@UR> or an approver can evaluate r1" in body["text"]
    assert len(bot.openai.chat_calls()) == before

    bot.openai.latency = 0.2  # keep the first evaluation going while the others ask
    with ThreadPoolExecutor(3) as pool:
        users = ["UR", "UA", "UB"]
        acks = list(pool.map(lambda u: bot.command("eval r1", user_id=u)[1]["text"], users))
    bot.wait_idle()
    assert sum("Evaluating r1" in a for a in acks) == 1
    assert sum("An evaluation of r1 is already going" in a for a in acks) == 2
    assert len(bot.openai.chat_calls()) == before + 2 * held_out
    assert len(bot.store.evals("r1")) == 2  # the automatic one and this one
    evals = [e for e in bot.workflow.runs.gate.ledger.entries(EPOCH) if e.kind == "eval"]
    assert all(e.status == "settled" and e.actual_usd <= e.estimate_usd for e in evals)


def test_a_spent_budget_stops_evals_and_chats_before_any_call(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    set_settings(bot, monthly_budget_usd=bot.workflow.runs.committed_usd())
    before = len(bot.openai.chat_calls())
    for user in ("UR", "UA", "UB"):
        for text in ("eval r1", 'chat r1 "Where is my parcel?"'):
            _, body = bot.command(text, user_id=user)
            assert "is over what is left of this month's budget: $0.00 of $" in body["text"], body
    bot.wait_idle()
    assert len(bot.openai.chat_calls()) == before


def test_an_expensive_evaluation_goes_to_the_approvers(paid_bot):
    bot = paid_bot(judge_model="", eval_approval_above_usd=0.0)
    run = succeeded_run(bot)
    held_out = run.result_json["data"]["split"]["eval"]
    assert any("needs an approval (TUNEBOT_EVAL_APPROVAL_ABOVE_USD)" in t for t in texts(bot))
    before = len(bot.openai.chat_calls())
    body = request(bot, "eval r1")
    assert "r2 needs approval" in body["text"]
    card = next(m for m in bot.slack.messages(channel="C1") if "evaluate r1 on" in m["text"])
    assert f"{held_out:,} held-out examples" in card["text"]
    assert "needs approval" not in request(bot, "eval r1", user="UA")["text"]  # one at a time
    assert len(bot.openai.chat_calls()) == before
    click(bot, "UA", "approve_run", run_id="r2")
    bot.wait_idle()
    assert status(bot, "r2") == "succeeded"
    assert len(bot.openai.chat_calls()) == before + 2 * held_out
    assert len(bot.store.evals("r1")) == 1
    assert 0 < bot.store.get_run("r2").actual_usd <= bot.store.get_run("r2").estimate_usd


# --- two installations on one OpenAI project ---------------------------------------------


def test_two_installations_never_adopt_or_cancel_each_others_jobs(paid_bot, tmp_path):
    staging = paid_bot(home=tmp_path / "staging", judge_model="")
    production = paid_bot(home=tmp_path / "production", judge_model="")
    for bot in (staging, production):
        upload(bot)
        request(bot)
        click(bot, "UA", "approve_run")
        bot.wait_idle()
    assert staging.store.installation_id != production.store.installation_id
    jobs = staging.openai.jobs()
    assert len(jobs) == 2 and len(creates(staging)) == 2
    assert {j["metadata"]["tunebot_key"] for j in jobs} == {
        f"{staging.store.installation_id}:r1",
        f"{production.store.installation_id}:r1",
    }
    staging_job = staging.store.get_run("r1").external_id
    production_job = production.store.get_run("r1").external_id
    assert staging_job != production_job

    _, body = staging.command("cancel r1", user_id="UR")
    assert "Cancelling r1" in body["text"]
    cancels = staging.openai.calls_to("POST", f"{JOBS}/")
    assert [c.path for c in cancels] == [f"/v1{JOBS}/{staging_job}/cancel"]
    assert staging.openai.job(production_job)["status"] != "cancelled"


# --- distillation ---------------------------------------------------------------------------


def test_distillation_cancel_keeps_what_was_written_and_records_the_spend(paid_bot):
    bot = paid_bot(progress_seconds=0.0)
    bot.openai.chat_script = teacher
    bot.openai.latency = 0.25
    upload(bot, prompts_file(64), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    plan = bot.store.get_run("r1").plan_json
    click(bot, "UA", "approve_run")
    wait_for(lambda: len(bot.openai.chat_calls()) >= 16, what="the first chunk")
    # Someone deletes the progress message: edits fail, the work goes on.
    progress = next(m for m in bot.slack.messages(channel="C1") if "distilling" in m["text"])
    WebClient(token=bot.slack.bot_token, base_url=bot.slack.base_url).chat_delete(
        channel="C1", ts=progress["ts"]
    )
    wait_for(lambda: len(bot.openai.chat_calls()) >= 32, what="the second chunk")
    _, body = bot.command("cancel r1", user_id="UR")
    assert body["text"].startswith("Stopping r1")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    calls = bot.openai.chat_calls()
    assert run.status == "cancelled" and len(calls) < 64 and len(calls) % 16 == 0
    assert run.result_json["answered"] == len(calls)
    assert all(json.loads(c.body)["max_completion_tokens"] == plan["max_tokens"] for c in calls)
    kept = bot.store.get_dataset(run.result_json["dataset_id"])
    assert kept.examples == len(calls) - sum(1 for c in calls if "item 5" in c.body.decode())
    (entry,) = bot.workflow.runs.gate.ledger.entries(EPOCH)
    assert entry.status == "settled" and entry.actual_usd == pytest.approx(run.actual_usd)
    assert 0 < run.actual_usd <= run.estimate_usd


def test_a_distillation_cut_off_by_a_restart_records_what_it_spent(paid_bot, make_bot):
    bot = paid_bot(claim_lease_seconds=0.5)
    bot.openai.chat_script = teacher
    upload(bot, prompts_file(12), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    # The bot died after claiming the run and paying for some answers.
    runs = bot.workflow.runs
    assert bot.store.claim_run(
        "r1",
        ["pending_approval"],
        "running",
        owner="dead-host:1:x",
        lease=dt.timedelta(seconds=0.5),
    )
    runs.gate.ledger.record(runs.gate.ledger.open("run", "r1").id, 0.0123)
    time.sleep(0.6)
    runs.poll_all()
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "failed" and "interrupted by a restart" in run.error
    assert run.actual_usd == pytest.approx(0.0123)
    assert runs.gate.ledger.entries(EPOCH)[0].status == "settled"
    assert any("Spent: $0.01" in t for t in texts(bot))


def test_distill_stops_at_the_approved_amount(openai_fake):
    import openai

    from trainers.distill import Prompt, distill, estimate
    from trainers.pricing import PriceTable, inference_cost

    openai_fake.chat_script = lambda req: "word " * 400  # long answers
    prompts = [Prompt(i, [{"role": "user", "content": f"question {i}"}]) for i in range(40)]
    prices = PriceTable()
    one = estimate(prompts[:1], "gpt-4.1", prices, max_tokens=300).cost_usd
    client = openai.OpenAI(api_key="sk-test", base_url=openai_fake.base_url, max_retries=0)
    result = distill(client, "gpt-4.1", prompts, max_tokens=300, max_usd=one * 5.5, prices=prices)
    calls = openai_fake.chat_calls()
    assert len(calls) == 5 and result.stopped == "budget" and result.answered == 5
    spent = inference_cost("gpt-4.1", result.input_tokens, result.output_tokens, prices)
    assert spent <= one * 5.5


# --- stuck runs ---------------------------------------------------------------------------


def test_a_local_model_that_cannot_be_resolved_fails_and_frees_the_slot(paid_bot, tmp_path):
    models = tmp_path / "models"
    (models / "gone").mkdir(parents=True)
    bot = paid_bot(default_provider="local", local_needs_approval=True, model_dirs=(str(models),))
    upload(bot)
    request(bot, f"train provider=local model={models / 'gone'}")
    request(bot, f"train provider=local model={models / 'gone'}")
    (models / "gone").rmdir()  # removed between the request and the launch
    with polling(bot):
        click(bot, "UA", "approve_run", run_id="r1")
        click(bot, "UA", "approve_run", run_id="r2")
        wait_for(
            lambda: status(bot, "r1") == "failed" and status(bot, "r2") == "failed",
            what="both runs to fail, one after the other in the only slot",
        )
    for run_id in ("r1", "r2"):
        assert bot.store.get_run(run_id).error.startswith("cannot get model")
        assert len([t for t in texts(bot) if t.startswith(f"<@UR> {run_id} ")]) == 1


def test_polling_goes_on_while_a_launch_is_slow(paid_bot, monkeypatch):
    """Fetching or converting a model happens on a job thread, never on the scheduler's."""
    release = threading.Event()

    def slow_resolve(name, home):
        release.wait(120)
        raise ValueError("no such model")

    monkeypatch.setattr("trainers.models.resolve", slow_resolve)
    bot = paid_bot(default_provider="local", judge_model="")
    upload(bot)
    request(bot, "train provider=openai")  # r1, waiting for approval
    bot.command("train provider=local", user_id="UR")  # r2 starts launching at once
    wait_for(
        lambda: bot.store.find_run("r2") and status(bot, "r2") == "running",
        what="the launch to start",
    )
    with polling(bot):
        click(bot, "UA", "approve_run", run_id="r1")
        wait_for(lambda: bot.store.get_run("r1").external_id, what="the paid job")
        ticks = len(bot.openai.calls_to("GET", f"{JOBS}/"))
        wait_for(lambda: len(bot.openai.calls_to("GET", f"{JOBS}/")) > ticks + 3, what="polls")
        assert status(bot, "r2") == "running"  # still launching, on its own thread
        release.set()
        wait_for(lambda: status(bot, "r2") == "failed", what="the slow launch to end")


# --- forget ---------------------------------------------------------------------------------


def test_forget_keeps_another_channels_copy_and_cancels_waiting_runs(paid_bot):
    bot = paid_bot(judge_model="")
    content = training_file(40)
    upload(bot, content)
    other = bot.slack.add_file(content, name="same.jsonl", channel="C2")
    bot.event(file_share_message_event(other), event_id="EvOther")
    bot.wait_idle()
    assert bot.store.get_dataset("d2").sha256 == bot.store.get_dataset("d1").sha256
    request(bot)  # r1 waits for approval on d1
    _, body = bot.command("forget d1", user_id="U1")
    assert body["text"] == "d1 is forgotten; r1 cancelled."
    bot.wait_idle()
    assert status(bot) == "cancelled"
    assert any("r1 is cancelled: its dataset d1 was forgotten by <@U1>" in t for t in texts(bot))
    assert bot.workflow.blobs.exists(bot.store.get_dataset("d2").sha256)
    assert click(bot, "UA", "approve_run") == 200
    bot.wait_idle()
    assert not bot.openai.calls_to("POST", "/files") and status(bot) == "cancelled"
    for text in ("train d1", "eval r1 eval=d1", "distill d1 teacher=gpt-4.1"):
        _, body = bot.command(text, user_id="UR")
        assert "d1 was forgotten on" in body["text"] or "r1 is cancelled" in body["text"], body
    _, body = bot.command("train", user_id="UR", channel_id="C2")
    assert "needs approval" in body["text"]  # C2's identical file still trains
    bot.wait_idle()
    assert bot.workflow.runs.committed_usd() == bot.store.get_run("r2").estimate_usd
