"""provider=<name> for a host of OpenAI's fine-tuning API named in the providers file
(TUNEBOT_PROVIDERS): the existing OpenAI runner at that host's URL, with the key from
the variable the file names, priced from the file. A second OpenAI fake plays the
host; the default one must see nothing."""

from __future__ import annotations

import json

import pytest

from tests.bot.test_paid_guarantees import polling, status, wait_for
from tests.bot.test_runs import click, request, upload
from tests.fakes.openai_api import FakeOpenAI

JOBS = "/v1/fine_tuning/jobs"
FILES = "/v1/files"


@pytest.fixture
def acme():
    with FakeOpenAI(api_key="sk-acme") as fake:
        yield fake


@pytest.fixture
def acme_bot(paid_bot, acme, tmp_path, monkeypatch):
    providers = tmp_path / "providers.toml"
    providers.write_text(
        f"""
[providers.acme]
kind = "openai-compatible"
base_url = "{acme.base_url}"
api_key_env = "ACME_API_KEY"
prices_read = 2026-11-30
prices_source = "https://acme.example/pricing"

[providers.acme.models."acme-8b"]
training_per_1m = 2.0
input_per_1m = 0.1
output_per_1m = 0.2
context = 32768
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("ACME_API_KEY", "sk-acme")
    bot = paid_bot(providers_file=providers, judge_model="")
    bot.acme = acme
    return bot


def posted(bot, needle: str) -> list[str]:
    return [
        c.params.get("text", "")
        for c in bot.slack.calls_to("chat.postMessage")
        if needle in c.params.get("text", "")
    ]


def test_a_run_on_a_providers_file_host_lands_there_and_nowhere_else(acme_bot):
    bot = acme_bot
    upload(bot)
    body = request(bot, "train provider=acme model=acme-8b epochs=2 suffix=support")
    assert body["text"].startswith("r1 needs approval"), body
    plan = bot.store.get_run("r1").plan_json
    assert (plan["provider"], plan["kind"], plan["epochs"]) == ("acme", "openai-compatible", 2)
    assert plan["estimate"]["price_per_1m"] == 2.0
    (card,) = posted(bot, "r1* requested by")
    assert "(prices from https://acme.example/pricing, read 2026-11-30)" in card

    with polling(bot):
        assert click(bot, "UA", "approve_run") == 200
        wait_for(lambda: status(bot) == "running", what="the job on acme")
        (job,) = bot.acme.jobs()
        bot.acme.run_to_end(job["id"])
        wait_for(lambda: status(bot) == "succeeded", what="r1 to succeed")
        wait_for(lambda: posted(bot, "r1 evaluation:"), what="the evaluation on acme")
    bot.wait_idle()

    assert len(bot.acme.calls_to("POST", FILES, exact=True)) == 1
    creates = bot.acme.calls_to("POST", JOBS, exact=True)
    assert [c.status for c in creates] == [200]
    sent = json.loads(creates[0].body)
    assert (sent["model"], sent["suffix"]) == ("acme-8b", "support")
    assert sent["metadata"]["tunebot_key"] == f"{bot.store.installation_id}:r1"
    held_out = bot.store.get_run("r1").result_json["data"]["split"]["eval"]
    chats = bot.acme.calls_to("POST", "/v1/chat/completions", exact=True)
    assert len(chats) == 2 * held_out  # base and tuned, on acme
    assert bot.openai.calls == []  # the default OpenAI saw nothing at all
    run = bot.store.get_run("r1")
    assert run.result_json["fine_tuned_model"] == bot.acme.job(job["id"])["fine_tuned_model"]
    assert run.actual_usd == pytest.approx(run.result_json["trained_tokens"] / 1e6 * 2.0)
    assert len(posted(bot, "r1 🎉 succeeded")) == 1


def test_a_model_the_providers_file_does_not_list_is_refused(acme_bot):
    bot = acme_bot
    upload(bot)
    _, body = bot.command("train provider=acme model=gpt-4o-mini", user_id="UR")
    assert body["text"] == (
        "⚠️ provider=acme does not list model `gpt-4o-mini` in the providers file; "
        "it lists: acme-8b."
    )
    _, body = bot.command("train provider=acme model=acme-8b lr=0.1", user_id="UR")
    assert "`lr=` is not a provider=acme option" in body["text"]
    bot.wait_idle()
    assert bot.store.find_run("r1") is None
    assert bot.acme.calls == [] and bot.openai.calls == []


def test_without_the_key_the_file_names_the_request_is_refused(acme_bot, monkeypatch):
    bot = acme_bot
    monkeypatch.delenv("ACME_API_KEY")
    upload(bot)
    _, body = bot.command("train provider=acme model=acme-8b", user_id="UR")
    assert body["text"] == "⚠️ ACME_API_KEY is not set, so tunebot cannot reach acme."
    bot.wait_idle()
    assert bot.store.find_run("r1") is None and bot.acme.calls == []
