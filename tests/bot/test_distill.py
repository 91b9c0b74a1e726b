"""Distillation and /finetune chat against the fake OpenAI server, through the bot."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from tests.bot.test_runs import click, request, run_to_end, texts, upload
from trainers.distill import load_prompts

ERROR_BODY = {
    "error": {
        "message": "The teacher is overloaded",
        "type": "invalid_request_error",
        "code": None,
        "param": None,
    }
}


def prompts_file(n: int = 12) -> bytes:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": f"How do I pack fragile item {i}?"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Where is my parcel {i}?"}]})
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def teacher(request_json):
    text = request_json["messages"][-1]["content"]
    if "item 5" in text:
        return (400, ERROR_BODY)  # one prompt the teacher fails on
    return f"Here is a careful answer about: {text}"


def test_load_prompts_reports_lines_it_cannot_use(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        "{oops\n\n"
        '{"messages": [{"role": "user", "content": "q"}]}\n'
    )
    prompts = load_prompts(path, system="Be brief.")
    assert [p.line for p in prompts.items] == [1, 5]
    assert prompts.items[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert [n for n, _ in prompts.problems] == [2, 3]
    assert (
        "ends with a assistant turn" in prompts.problems[0][1]
        or "assistant" in prompts.problems[0][1]
    )


def test_distillation_is_approved_run_and_listed_failures(paid_bot):
    bot = paid_bot()
    bot.openai.chat_script = teacher
    upload(bot, prompts_file(12), name="prompts.jsonl")
    body = request(bot, 'distill teacher=gpt-4.1 system="You are Parcelino support."')
    # The ack only names the run: the prompts are read and priced after it.
    assert body["text"].startswith("r1: pricing 12 prompts of d1"), body
    run = bot.store.get_run("r1")
    assert run.provider == "distill" and run.estimate_usd > 0 and run.plan_json["prompts"] == 12
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == run.card_ts)
    assert "distil d1 with teacher gpt-4.1-2025-04-14 — 12 prompts" in card["text"]
    assert not bot.openai.chat_calls()  # nothing is spent before approval

    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "succeeded" and run.actual_usd > 0
    new = bot.store.get_dataset(run.result_json["dataset_id"])
    assert new.source_dataset_id == "d1" and new.valid_examples == 11 and new.errors == 0
    lines = bot.workflow.blobs.path(new.sha256).read_text().splitlines()
    first = json.loads(lines[0])["messages"]
    assert first[0] == {"role": "system", "content": "You are Parcelino support."}
    assert first[-1]["content"].startswith("Here is a careful answer about: Where is my parcel 0?")
    done = [t for t in texts(bot) if t.startswith("<@UR> r1 done")]
    assert len(done) == 1 and "failed on 1 prompt(s): line 6" in done[0]
    assert f"/finetune train {new.id} provider=openai" in done[0]
    assert any(t.startswith(f"prompts-gpt-4.1-2025-04-14.jsonl ({new.id})") for t in texts(bot))


def test_distill_needs_a_teacher_with_a_price(paid_bot):
    bot = paid_bot()
    upload(bot, prompts_file(), name="prompts.jsonl")
    assert "Name the teacher" in request(bot, "distill")["text"]
    assert "unknown model" in request(bot, "distill teacher=gpt-9")["text"]


def test_chat_puts_base_and_tuned_side_by_side(paid_bot):
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run_to_end(bot)
    bot.wait_idle()
    bot.openai.chat_script = lambda req: f"answer from {req['model']}"
    _, body = bot.command('chat r1 "How do I reset my password?"')
    assert "Only <@UR> or an approver can ask r1's models" in body["text"]
    chats = len(bot.openai.chat_calls())
    _, body = bot.command('chat r1 "How do I reset my password?"', user_id="UR")
    assert "Asking the base and the tuned model of r1" in body["text"]
    bot.wait_idle()
    reply = [t for t in texts(bot) if t.startswith("r1 — prompt: How do I reset my password?")]
    assert len(reply) == 1
    assert (
        "answer from gpt-4o-mini-2024-07-18" in reply[0]
        and "answer from ft:gpt-4o-mini" in reply[0]
    )
    assert len(bot.openai.chat_calls()) == chats + 2
    (entry,) = [
        e
        for e in bot.workflow.runs.gate.ledger.entries(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
        if e.kind == "chat"
    ]
    assert entry.status == "settled" and 0 < entry.actual_usd <= entry.estimate_usd
    _, body = bot.command("chat r1", user_id="UR")
    assert "Give a prompt" in body["text"]


def test_a_student_of_a_distillation_is_compared_with_its_teacher(paid_bot):
    bot = paid_bot(judge_model="")  # offline scorers: the fake has no judge to play

    def models(req):
        question = req["messages"][-1]["content"]
        if req["model"].startswith("gpt-4.1"):
            return f"Here is a careful answer about: {question}"
        if req["model"].startswith("ft:"):
            return f"Here is an answer about: {question}"
        return "I am not sure."

    bot.openai.chat_script = models
    upload(bot, prompts_file(60), name="prompts.jsonl")
    request(bot, "distill teacher=gpt-4.1")
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    distilled = bot.store.get_run("r1").result_json["dataset_id"]

    request(bot, f"train {distilled} provider=openai model=gpt-4o-mini")
    click(bot, "UA", "approve_run", run_id="r2")
    bot.wait_idle()
    for _ in range(30):
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        if bot.store.get_run("r2").status == "succeeded":
            break
    run = bot.store.get_run("r2")
    assert run.status == "succeeded"
    assert bot.workflow.runs.evals.teacher_of(run) == "gpt-4.1-2025-04-14"

    (summary,) = [t for t in texts(bot) if t.startswith("r2 evaluation:")]
    assert summary.startswith("r2 evaluation: teacher `gpt-4.1-2025-04-14` vs base")
    assert "teacher" in summary.splitlines()[1]  # the table's third column
    assert "the tuned student kept" in summary
    assert "per 1,000 calls like these: teacher `gpt-4.1-2025-04-14` $" in summary
    assert "base `gpt-4o-mini-2024-07-18` $" in summary and "tuned `ft:gpt-4o-mini" in summary

    held_out = run.result_json["data"]["split"]["eval"]
    teacher_calls = [
        c for c in bot.openai.chat_calls() if json.loads(c.body)["model"].startswith("gpt-4.1")
    ]
    assert len(teacher_calls) == 60 + held_out  # distillation, then one per held-out prompt
    (stored,) = bot.store.evals("r2")
    teacher = stored.summary_json["teacher"]
    assert teacher["model"] == "gpt-4.1-2025-04-14" and 0 < teacher["kept"] < 1
    prices = stored.summary_json["price_per_1k_calls"]
    assert prices["teacher"]["usd"] > prices["tuned"]["usd"] > prices["base"]["usd"] > 0
    assert stored.rows_json["teacher_model"] == "gpt-4.1-2025-04-14"
    assert any(u.filename == "eval-r2.png" for u in bot.slack.uploads)
    csv_upload = next(u for u in bot.slack.uploads if u.filename == "eval-r2.csv")
    assert b"rouge_l_teacher" in csv_upload.content

    # With a month's budget that covers the students' answers but not the teacher's,
    # evaluating again leaves the teacher out and says why.
    runs = bot.workflow.runs

    def set_budget(usd):
        changed = dataclasses.replace(runs.settings, monthly_budget_usd=usd)
        runs.settings = runs.evals.settings = runs.gate.settings = changed
        runs.ctx.settings = changed

    set_budget(runs.committed_usd() + 0.01)
    calls_before = len(bot.openai.chat_calls())
    request(bot, "eval r2")
    assert any(
        t.startswith("r2: the teacher gpt-4.1-2025-04-14 left out of the evaluation: ")
        and "of this month's" in t
        for t in texts(bot)
    )
    again = [t for t in texts(bot) if t.startswith("r2 evaluation:")]
    assert len(again) == 2 and again[1].startswith("r2 evaluation: base `gpt-4o-mini")
    assert len(bot.openai.chat_calls()) == calls_before + 2 * held_out  # base and tuned only

    # With the budget spent, nothing is generated at all, and the answer says what is left.
    set_budget(runs.committed_usd())
    calls_before = len(bot.openai.chat_calls())
    body = request(bot, "eval r2")
    assert "An evaluation of r2 cannot start: the estimate $" in body["text"]
    assert "is over what is left of this month's budget: $0.00 of $" in body["text"]
    assert len(bot.openai.chat_calls()) == calls_before


def test_a_local_student_has_no_per_call_price_and_a_missing_teacher_score_shows():
    from types import SimpleNamespace

    from bot import render
    from trainers.evaluate import EvalExample, Generation, score

    examples = [
        EvalExample(i, [{"role": "user", "content": f"q{i}"}], f"a{i} b c") for i in range(3)
    ]
    failed = [Generation("", error="overloaded")] * 3
    result = score(
        examples,
        ["x"] * 3,
        ["a0 b", "a1 b", "a2 b"],
        teacher_outputs=failed,
        teacher_model="gpt-4.1",
    )
    run = SimpleNamespace(id="r3", model="smollm2")
    prices = {
        "teacher": {"model": "gpt-4.1", "usd": None},
        "base": {"model": "smollm2", "usd": None, "self_hosted": True},
        "tuned": {"model": "smollm2 + LoRA r3", "usd": None, "self_hosted": True},
    }
    text = render.eval_summary(run, result, cost_usd=0.0, prices_per_1k=prices).text
    assert "teacher `gpt-4.1` vs base `smollm2` vs tuned student" in text
    assert "base `smollm2` self-hosted, no per-call price" in text
    assert "teacher `gpt-4.1` no price in the price table" in text  # a price file dropped it
    assert "generation failed for 0 base, 0 tuned and 3 teacher answer(s)" in text
    assert result.kept() is None  # every teacher answer failed and scores 0: no share to show
    assert "kept" not in text
