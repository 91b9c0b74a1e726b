"""What leaves the machine: data that may hold secrets goes to a hosted model only once released."""

from __future__ import annotations

from tests.bot.test_paid_guarantees import succeeded_run
from tests.bot.test_runs import click, request, texts, upload
from tests.conftest import SECRET_KEY, secret_training_file, training_file

KEY = SECRET_KEY


def test_an_eval_set_with_secrets_is_not_sent_until_an_approver_releases_it(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    upload(bot, secret_training_file(10), name="leaky-eval.jsonl")  # d2
    assert bot.store.get_dataset("d2").report_json["codes"]["possible_secret"] == 10
    before = len(bot.openai.chat_calls())

    _, body = bot.command("eval r1 eval=d2", user_id="UR")
    assert "would send d2's examples to OpenAI" in body["text"]
    assert "`/finetune release d2`" in body["text"]
    _, body = bot.command("release d2", user_id="UR")  # the requester is no approver
    assert "Only an approver can release d2" in body["text"]
    bot.wait_idle()
    assert len(bot.openai.chat_calls()) == before

    _, body = bot.command("release d2", user_id="UA")
    assert body["response_type"] == "in_channel" and "<@UA> released d2" in body["text"]
    (entry,) = [e for e in bot.store.audit_log(dataset_id="d2") if e.action == "release_secrets"]
    assert entry.actor == "UA" and entry.detail_json == {"possible_secrets": 10}
    _, body = bot.command("eval r1 eval=d2", user_id="UR")
    assert "Evaluating r1" in body["text"]
    bot.wait_idle()
    assert len(bot.openai.chat_calls()) == before + 2 * 10


def test_a_training_run_with_a_leaky_eval_set_is_held_and_the_override_names_both(paid_bot):
    bot = paid_bot(judge_model="")
    upload(bot, training_file(40))  # d1, clean
    upload(bot, secret_training_file(10), name="leaky-eval.jsonl")  # d2
    request(bot, "train d1 eval=d2")
    assert bot.store.get_run("r1").plan_json["secret_hold"] is True
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert bot.store.get_run("r1").status == "pending_approval"  # held
    assert not bot.openai.calls_to("POST", "/files")
    click(bot, "UB", "override_secret")
    bot.wait_idle()
    assert bot.store.get_run("r1").status in ("submitting", "running")
    released = [e for e in bot.store.audit_log(limit=None) if e.action == "release_secrets"]
    assert {(e.dataset_id, e.actor, e.run_id) for e in released} == {("d2", "UB", "r1")}


def test_a_chat_prompt_with_a_secret_is_never_sent(paid_bot):
    bot = paid_bot(judge_model="")
    succeeded_run(bot)
    before = len(bot.openai.chat_calls())
    _, body = bot.command(f'chat r1 "my key {KEY} does not work"', user_id="UR")
    assert "looks like it holds a secret (OpenAI API key)" in body["text"]
    assert KEY not in body["text"]
    bot.wait_idle()
    assert len(bot.openai.chat_calls()) == before
    assert not any(KEY in t for t in texts(bot))
