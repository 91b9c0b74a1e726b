"""Distillation and /finetune chat against the fake OpenAI server, through the bot."""

from __future__ import annotations

import json

from tests.test_runs import click, openai_fake, paid_bot, request, run_to_end, texts, upload  # noqa: F401
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


def test_distillation_is_approved_run_and_listed_failures(paid_bot):  # noqa: F811
    bot = paid_bot()
    bot.openai.chat_script = teacher
    upload(bot, prompts_file(12), name="prompts.jsonl")
    body = request(bot, 'distill teacher=gpt-4.1 system="You are Parcelino support."')
    assert "r1 needs approval" in body["text"], body
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


def test_distill_needs_a_teacher_with_a_price(paid_bot):  # noqa: F811
    bot = paid_bot()
    upload(bot, prompts_file(), name="prompts.jsonl")
    assert "Name the teacher" in request(bot, "distill")["text"]
    assert "unknown model" in request(bot, "distill teacher=gpt-9")["text"]


def test_chat_puts_base_and_tuned_side_by_side(paid_bot):  # noqa: F811
    bot = paid_bot()
    upload(bot)
    request(bot)
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    run_to_end(bot)
    bot.wait_idle()
    bot.openai.chat_script = lambda req: f"answer from {req['model']}"
    _, body = bot.command('chat r1 "How do I reset my password?"')
    assert "Asking the base and the tuned model of r1" in body["text"]
    bot.wait_idle()
    reply = [t for t in texts(bot) if t.startswith("r1 — prompt: How do I reset my password?")]
    assert len(reply) == 1
    assert (
        "answer from gpt-4o-mini-2024-07-18" in reply[0]
        and "answer from ft:gpt-4o-mini" in reply[0]
    )
    _, body = bot.command("chat r1")
    assert "Give a prompt" in body["text"]
