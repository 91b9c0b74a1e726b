"""Paid runs over the real bot: signed clicks in, Slack and OpenAI fakes out."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from bot.approvals import Policy, click_refusal, quorum, refusals, tally
from tests.conftest import APPROVERS, CASES, training_file
from tests.fakes.signing import (
    button_click_payload,
    file_share_message_event,
    interaction_body,
    view_submission_payload,
)

JOBS = "/fine_tuning/jobs"


def upload(bot, content: bytes | None = None, name="support.jsonl"):
    file = bot.slack.add_file(content or training_file(40), name=name)
    bot.event(file_share_message_event(file), event_id=f"Ev{file['id']}")
    bot.wait_idle()
    return file


def click(bot, user: str, action_id: str, run_id: str = "r1", channel: str = "C1") -> int:
    payload = button_click_payload(user, action_id, run_id, channel)
    return bot.post(interaction_body(payload))[0]


def submit_reason(bot, user: str, reason: str, run_id: str = "r1") -> int:
    values = {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}
    payload = view_submission_payload("reject_reason", run_id, values, user_id=user)
    return bot.post(interaction_body(payload))[0]


def request(bot, text="train", user="UR"):
    status, body = bot.command(text, user_id=user)
    assert status == 200
    bot.wait_idle()
    return body


def run_to_end(bot):
    for _ in range(30):
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        if bot.store.get_run("r1").status in ("succeeded", "failed", "cancelled"):
            return bot.store.get_run("r1")
    raise AssertionError("run did not finish")


def texts(bot):
    return [m["text"] for m in bot.slack.messages(channel="C1")]


# --- the pure policy -------------------------------------------------------------


def test_policy_rules():
    policy = Policy(
        frozenset({"UA", "UB"}),
        required=1,
        two_approvals_above_usd=10,
        max_run_usd=100,
        monthly_budget_usd=150,
    )
    assert quorum(policy, 5) == 1 and quorum(policy, 11) == 2
    assert refusals(policy, provider="openai", estimate_usd=101, committed_usd=0, requester="UR")[
        0
    ].startswith("the estimate $101.00 is over the per-run cap")
    assert (
        "budget"
        in refusals(policy, provider="openai", estimate_usd=60, committed_usd=100, requester="UR")[
            0
        ]
    )
    assert (
        "only 1 approver"
        in refusals(policy, provider="openai", estimate_usd=11, committed_usd=0, requester="UA")[0]
    )
    assert refusals(policy, provider="local", estimate_usd=0, committed_usd=0, requester="UZ") == []
    assert click_refusal(
        policy, user="UR", requester="UR", status="pending_approval", expired=False
    ).startswith("you asked")
    assert "not one of the approvers" in click_refusal(
        policy, user="UX", requester="UR", status="pending_approval", expired=False
    )
    assert "expired" in click_refusal(
        policy, user="UA", requester="UR", status="pending_approval", expired=True
    )
    held = tally([("UA", "approve")], 1, secret_hold=True)
    assert not held.approved and held.held
    assert tally([("UA", "approve"), ("UB", "override_secret")], 1, secret_hold=True).approved
    assert not tally([("UA", "approve"), ("UB", "reject")], 1, secret_hold=False).approved
    with pytest.raises(ValueError, match="at least 1"):
        Policy(frozenset(), required=0)


# --- request, approve, run, report --------------------------------------------------


def test_the_whole_loop_submits_once_and_reports_once(paid_bot):
    bot = paid_bot()
    file = upload(bot)
    ack = request(bot, "train model=gpt-4o-mini epochs=2 suffix=support")
    assert ack["response_type"] == "ephemeral" and "r1 needs approval" in ack["text"]

    run = bot.store.get_run("r1")
    assert (
        run.status == "pending_approval"
        and run.thread_ts == file["shares"]["public"]["C1"][0]["ts"]
    )
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "Approvals: 0 of 1" in card["text"] and "gpt-4o-mini-2024-07-18" in card["text"]
    buttons = [e for b in card["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert {(b["action_id"], b["value"]) for b in buttons} == {
        ("approve_run", "r1"),
        ("reject_run", "r1"),
    }
    dms = [c for c in bot.slack.calls_to("conversations.open")]
    assert {c.params["users"] for c in dms} == {"UA", "UB"}

    assert click(bot, "UA", "approve_run") == 200
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "running" and run.external_id.startswith("ftjob-")
    (create,) = bot.openai.calls_to("POST", JOBS, exact=True)
    body = json.loads(create.body)
    key = f"{bot.store.installation_id}:r1"
    assert body["metadata"] == {"tunebot_key": key} and body["suffix"] == "support"
    assert body["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2

    done = run_to_end(bot)
    assert done.status == "succeeded" and done.actual_usd > 0
    finals = [t for t in texts(bot) if "r1 🎉 succeeded" in t]
    assert len(finals) == 1 and finals[0].startswith("<@UR>") and "ft:" in finals[0]
    assert any(u.filename == "loss-r1.png" for u in bot.slack.uploads)
    run_to_end(bot)  # more ticks change nothing
    assert len([t for t in texts(bot) if "r1 🎉 succeeded" in t]) == 1
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1

    # Then the evaluation on the held-out 10%, posted once in the thread with a chart and a CSV.
    bot.wait_idle()
    summaries = [t for t in texts(bot) if t.startswith("r1 evaluation:")]
    assert len(summaries) == 1 and "5 held-out examples" in summaries[0]
    assert {"eval-r1.png", "eval-r1.csv"} <= {u.filename for u in bot.slack.uploads}
    (stored,) = bot.store.evals("r1")
    assert stored.summary_json["examples"] == 5 and stored.cost_usd > 0
    data = bot.store.get_run("r1").result_json["data"]
    trained = bot.openai.contents[body["training_file"]]
    assert trained == bot.workflow.blobs.path(data["train_sha256"]).read_bytes()
    assert len(trained.splitlines()) == 35  # the held-out 5 were never trained on

    actions = [e.action for e in reversed(bot.store.audit_log(run_id="r1"))]
    assert actions[:4] == ["requested", "approve", "approved", "submitted"]
    assert actions[-2:] == ["succeeded", "evaluated"]
    _, audit = bot.command("audit r1")
    assert "approve r1" in audit["text"] and "succeeded r1" in audit["text"]


def test_twenty_simultaneous_clicks_submit_exactly_one_job(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(lambda i: click(bot, APPROVERS[i % 2], "approve_run"), range(20)))
    bot.wait_idle()
    assert set(statuses) == {200}
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1
    assert len([e for e in bot.store.audit_log(run_id="r1") if e.action == "submitted"]) == 1


def test_the_requesters_own_click_and_strangers_are_refused(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot, user="UA")  # an approver asking: the other one must approve
    click(bot, "UA", "approve_run")
    click(bot, "UX", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "pending_approval"
    refused = {e["user"]: e["text"] for e in bot.slack.ephemerals}
    assert "you asked for this run" in refused["UA"] and "not one of the approvers" in refused["UX"]
    assert {e.action for e in bot.store.audit_log(run_id="r1")} >= {"refused_approve"}
    assert not bot.openai.calls_to("POST", JOBS)


def test_two_approvals_above_the_threshold(paid_bot):
    bot = paid_bot(two_approvals_above_usd=0.0001)
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "pending_approval"
    click(bot, "UB", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "running"


def test_not_enough_approvers_is_refused_at_once(paid_bot):
    bot = paid_bot(approvers=("UA",))
    upload(bot)
    body = request(bot, user="UA")
    assert "only 0 approver(s) other than the requester" in body["text"]
    assert bot.store.runs() == []


def test_user_groups_are_resolved(paid_bot, slack):
    slack.usergroups["S1"] = ["UG1", "UG2"]  # in Slack before the bot starts: resolved at start
    bot = paid_bot(approvers=("S1",))
    upload(bot)
    request(bot)
    click(bot, "UG2", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "running"


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"max_run_usd": 0.0001}, "per-run cap"),
        ({"monthly_budget_usd": 0.0001}, "this month's budget"),
    ],
)
def test_plans_over_the_cap_or_budget_are_refused(paid_bot, settings, needle):
    bot = paid_bot(**settings)
    upload(bot)
    body = request(bot)
    assert body["response_type"] == "ephemeral" and needle in body["text"]
    assert bot.store.runs() == [] and bot.store.audit_log()[0].action == "refused"


def test_datasets_with_errors_cannot_be_trained(paid_bot):
    bot = paid_bot()
    upload(bot, training_file(20, bad_lines=2))
    body = request(bot)
    assert "has 2 error(s) and cannot be trained: invalid_json ×2" in body["text"]


def test_reject_asks_for_a_reason_and_ends_the_request(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UB", "reject_run")
    (opened,) = bot.slack.calls_to("views.open")
    assert opened.params["view"]["callback_id"] == "reject_reason"
    assert submit_reason(bot, "UB", "use the smaller set first") == 200
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "rejected"
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "Rejected by <@UB>: use the smaller set first" in card["text"]
    assert not [b for b in card["blocks"] if b["type"] == "actions"]
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "rejected" and not bot.openai.calls_to("POST", JOBS)


def test_secrets_hold_the_run_until_overridden(paid_bot):
    bot = paid_bot()
    rows = training_file(40).decode().splitlines()
    rows[3] = rows[3].replace(
        "How do I reset", "My key is sk-proj-abcdefghijklmnopqrstuvwx; how do I reset"
    )
    upload(bot, ("\n".join(rows) + "\n").encode())
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "pending_approval"
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "may hold secrets" in card["text"]
    assert "override_secret" in json.dumps(card["blocks"])
    click(bot, "UB", "override_secret")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "running"
    assert "override_secret" in {e.action for e in bot.store.audit_log(run_id="r1")}


def test_an_expired_request_cannot_be_approved(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    bot.store.update_run("r1", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert "expired" in bot.slack.ephemerals[-1]["text"]
    bot.workflow.runs.expire_all()
    run = bot.store.get_run("r1")
    assert run.status == "expired"
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "Expired" in card["text"] and not [b for b in card["blocks"] if b["type"] == "actions"]
    assert "expired" in {e.action for e in bot.store.audit_log(run_id="r1")}


def test_a_restart_mid_run_resumes_and_reports_once(paid_bot, make_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    bot.workflow.runs.poll_all()
    # A new bot process on the same home: same database, new workflow, new clients.
    again = make_bot(
        **{
            k: getattr(bot.settings, k)
            for k in ("openai_api_key", "openai_base_url", "approvers", "progress_seconds")
        }
    )
    again.openai = bot.openai
    done = run_to_end(again)
    assert done.status == "succeeded"
    run_to_end(bot)
    assert len([t for t in texts(bot) if "r1 🎉 succeeded" in t]) == 1
    assert len(bot.openai.calls_to("POST", JOBS, exact=True)) == 1


def test_a_crash_between_create_and_save_makes_no_second_job(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    # OpenAI creates the job, then the answer is lost (a 500), again and again.
    bot.openai.inject("POST", JOBS, 500, times=10, exact=True, after_handling=True)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    for _ in range(3):  # whatever the first attempt left, the poller finishes the submission
        bot.workflow.runs.poll_all()
        bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "running"
    # The lost answer is not retried blindly: the job is looked up by its run id first.
    assert len(bot.openai.jobs()) == 1
    assert run.external_id == bot.openai.jobs()[0]["id"]


def test_training_not_available_is_explained(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    body = {
        "error": {
            "code": "training_not_available",
            "message": "Fine-tuning is not available for your organization.",
            "type": "invalid_request_error",
            "param": None,
        }
    }
    bot.openai.inject("POST", JOBS, 403, exact=True, body=body)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert (
        run.status == "failed"
        and "Fine-tuning is not available for your organization." in run.error
    )
    final = [t for t in texts(bot) if "r1 ❌ failed" in t]
    assert len(final) == 1 and "2027-01-06" in final[0]


def test_cancel_by_the_requester_and_not_by_others(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    _, body = bot.command("cancel r1", user_id="UX")
    assert "Only <@UR> or an approver can cancel r1" in body["text"]
    _, body = bot.command("cancel r1", user_id="UR")
    assert "Cancelling r1" in body["text"]
    done = run_to_end(bot)
    assert done.status == "cancelled"


def test_cancel_withdraws_a_pending_request(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    _, body = bot.command("cancel r1", user_id="UR")
    bot.wait_idle()
    assert body["text"] == "r1 is cancelled." and bot.store.get_run("r1").status == "cancelled"
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert not bot.openai.calls_to("POST", JOBS)


def test_forget_deletes_the_file_here_and_on_openai(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    sha = bot.store.get_dataset("d1").sha256
    _, body = bot.command("forget d1", user_id="UX")
    assert "Only <@U1> or an approver" in body["text"]
    _, body = bot.command("forget d1", user_id="U1")
    assert body["text"] == "d1 is forgotten."
    bot.wait_idle()
    assert "its stored file(s) and 1 upload(s) to OpenAI deleted" in texts(bot)[-1]
    assert not bot.workflow.blobs.exists(sha)
    assert len(bot.openai.calls_to("DELETE", "/files/")) == 1
    assert bot.store.audit_log(dataset_id="d1")[0].action == "forgot"
    _, body = bot.command("train d1", user_id="U1")
    assert "d1 was forgotten on" in body["text"] and "by <@U1>" in body["text"]


def test_local_runs_can_require_approval_and_show_gpu_time(paid_bot):
    bot = paid_bot(local_needs_approval=True)
    upload(bot)
    body = request(
        bot, "train provider=local model=Qwen2.5-0.5B-Instruct epochs=2 r=8 targets=q,k,v,o"
    )
    assert "r1 needs approval" in body["text"]
    run = bot.store.get_run("r1")
    assert run.provider == "local" and run.estimate_usd == 0.0
    assert run.plan_json["r"] == 8 and run.plan_json["targets"] == "q,k,v,o"
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "no API cost" in card["text"] and "~0.5B model" in card["text"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train provider=local suffix=x", "`suffix=` is for provider=openai"),
        ("train provider=local qlora=maybe", "qlora= takes true or false"),
        ("train provider=local r=-2", "r= must be a whole number above 0"),
        ("train lr_mult=nan", "lr_mult= must be a number above 0, not `nan`"),
        ("train lr_mult=inf", "lr_mult= must be a number above 0"),
        ("train batch=0", "batch= must be a whole number above 0"),
        ("train batch=2.5", "batch= must be a whole number above 0"),
        ("train provider=local lr=-1e-4", "lr= must be a number above 0"),
        ("train provider=gpu", "provider must be one of openai, local, together, not `gpu`"),
        ("train provider=openai model=gpt-3.5-turbo", "retired"),
        ("train split=0.9", "split= takes a fraction between 0 and 0.5"),
    ],
)
def test_bad_train_options_are_explained(paid_bot, text, needle):
    bot = paid_bot()
    upload(bot)
    body = request(bot, text)
    assert body["response_type"] == "ephemeral" and needle in body["text"], body["text"]


def test_a_preference_file_is_not_trained_as_supervised(paid_bot):

    bot = paid_bot()
    rows = (CASES / "02-dpo-preference.jsonl").read_bytes()
    upload(bot, rows * 4, name="prefs.jsonl")  # enough rows to be trainable
    body = request(bot, "train provider=openai")
    assert (
        "d1 is a preference (DPO) file; tunebot trains supervised chat files today"
        in (body["text"])
    ), body["text"]
    assert not bot.store.runs(limit=None) and not bot.openai.calls_to("POST", "/files")
