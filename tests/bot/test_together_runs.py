"""provider=together through Slack: signed HTTP into the real Bolt app, Together's real SDK
pointed at the local Together fake, SQLite on disk. Counts on the fake are exact."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.bot.test_paid_guarantees import EPOCH, polling, set_settings, status, wait_for
from tests.bot.test_runs import click, request, texts, upload
from tests.conftest import APPROVERS, chat_jsonl
from tests.fakes.together_api import FAKE_RATES, FakeTogether

MODEL = "Qwen/Qwen3-8B"
FILES = "/v1/files"
JOBS = "/v1/fine-tunes"
TRAIN = f"train provider=together model={MODEL}"


@pytest.fixture
def together_fake():
    with FakeTogether(api_key="tg-test") as fake:
        yield fake


@pytest.fixture
def together_bot(make_bot, together_fake):
    """A bot whose provider=together is the local fake; approvers UA and UB; no OpenAI."""

    def start(**overrides):
        bot = make_bot(
            **{
                "together_api_key": "tg-test",
                "together_base_url": together_fake.base_url,
                "approvers": APPROVERS,
                "progress_seconds": 0.0,
                "judge_model": "",
                **overrides,
            }
        )
        bot.together = together_fake
        return bot

    return start


def uploads(fake) -> list:
    return fake.calls_to("POST", FILES, exact=True)


def creates(fake) -> list:
    return fake.calls_to("POST", JOBS, exact=True)


def posted(bot, needle: str) -> list[str]:
    """Every chat.postMessage text containing `needle` (each post, not the last edit)."""
    return [
        c.params.get("text", "")
        for c in bot.slack.calls_to("chat.postMessage")
        if needle in c.params.get("text", "")
    ]


def edits(bot, needle: str) -> list[str]:
    return [
        c.params.get("text", "")
        for c in bot.slack.calls_to("chat.update")
        if needle in c.params.get("text", "")
    ]


def succeed(bot) -> dict:
    """Approve r1, follow it with the real scheduler until it has succeeded; its job."""
    with polling(bot):
        assert click(bot, "UA", "approve_run") == 200
        wait_for(lambda: status(bot) == "succeeded", what="r1 to succeed")
    (job,) = bot.together.jobs()
    return job


# --- a run, end to end ------------------------------------------------------------


def test_a_together_run_end_to_end(together_bot):
    bot = together_bot()
    upload(bot)
    body = request(bot, TRAIN + " lora_r=16 lora_alpha=32 lora_dropout=0.05 suffix=support")
    assert body["text"].startswith("r1 needs approval"), body
    assert bot.together.calls == []  # nothing leaves before the approval
    run = bot.store.get_run("r1")
    plan = run.plan_json
    assert (plan["provider"], plan["kind"], plan["lora"], plan["r"]) == (
        "together",
        "together",
        True,
        16,
    )
    assert plan["estimate"]["price_per_1m"] == 0.48  # the up-to-16B LoRA rate of the table
    assert plan["prices_source"] == "https://www.together.ai/pricing"
    (card,) = posted(bot, "r1* requested by")
    assert "LoRA" in card and "prices from https://www.together.ai/pricing, read 2025" in card

    job = succeed(bot)
    assert len(uploads(bot.together)) == 1 and len(creates(bot.together)) == 1
    sent = json.loads(creates(bot.together)[0].body)
    assert (sent["model"], sent["n_epochs"], sent["suffix"]) == (MODEL, 3, "support")
    assert sent["training_type"]["lora_r"] == 16 and sent["training_type"]["lora_alpha"] == 32
    run = bot.store.get_run("r1")
    assert run.external_id == job["id"]
    assert run.result_json["fine_tuned_model"] == job["model_output_name"]
    assert run.actual_usd == pytest.approx(job["total_price"] / 1e9)
    # The progress message was edited with Together's own words from its events.
    assert edits(bot, "r1 running") and any("“" in t for t in edits(bot, "r1 running"))
    (done,) = posted(bot, "r1 🎉 succeeded")
    assert f"Model: `{job['model_output_name']}`" in done
    assert "/finetune eval r1" in done and "/finetune download r1" in done
    assert "/tmp" not in done and "Traceback" not in "".join(texts(bot))
    # The built-in table has no inference price: the evaluation says so, and calls nothing.
    bot.wait_idle()
    (note,) = posted(bot, "r1: not evaluated")
    assert "has no inference price on Together AI" in note and "inference_per_1m" in note
    assert not bot.together.calls_to("POST", "/v1/chat/completions")


def test_the_evaluation_goes_through_togethers_chat_completions(together_bot, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "together": {
                    "read": "2026-11-30",
                    "source": "a test's own table",
                    "sizes": [
                        {
                            "up_to_billions": 16,
                            "lora_per_1m": 1.0,
                            "full_per_1m": 2.0,
                            "inference_per_1m": 0.5,
                        }
                    ],
                }
            }
        )
    )
    bot = together_bot(prices_file=prices)
    upload(bot)
    request(bot, TRAIN)
    assert "(prices from a test's own table, read 2026-11-30)" in posted(bot, "r1* requested")[0]
    assert bot.store.get_run("r1").plan_json["estimate"]["price_per_1m"] == 1.0
    job = succeed(bot)
    wait_for(lambda: posted(bot, "r1 evaluation:"), what="the evaluation summary")
    bot.wait_idle()
    chats = bot.together.calls_to("POST", "/v1/chat/completions", exact=True)
    held_out = bot.store.get_run("r1").result_json["data"]["split"]["eval"]
    asked = sorted(json.loads(c.body)["model"] for c in chats)
    assert asked == sorted([MODEL] * held_out + [job["model_output_name"]] * held_out)
    assert all(c.status == 200 for c in chats)

    # /finetune chat asks the same two models, on Together too.
    _, body = bot.command('chat r1 "Do you take Apple Pay?"', user_id="UR")
    assert body["text"].startswith("Asking the base and the tuned model of r1"), body
    bot.wait_idle()
    chats = bot.together.calls_to("POST", "/v1/chat/completions", exact=True)
    assert len(chats) == 2 * held_out + 2
    answers = "\n".join(texts(bot))
    assert f"[{MODEL}] Do you take Apple Pay?" in answers
    assert f"[{job['model_output_name']}] Do you take Apple Pay?" in answers


def test_together_data_rules_refuse_a_file_together_would_refuse(together_bot):
    bot = together_bot()
    rows = [json.loads(line) for line in chat_jsonl(20).decode().splitlines()]
    rows[2]["messages"].insert(1, {"role": "user", "content": "Hello?"})  # two user turns
    upload(bot, "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    _, body = bot.command(TRAIN, user_id="UR")
    assert body["text"] == (
        "r1 needs approval: d1 is checked against Together's data rules first, then the card "
        "follows in its thread."
    )
    bot.wait_idle()
    (told,) = posted(bot, "r1 cannot be requested")
    assert told == (
        "<@UR> ⚠️ r1 cannot be requested: d1 cannot be trained on provider=together: Together "
        "would refuse line 3: message 3 is a second user message in a row; user and assistant "
        "alternate (together_alternation)."
    )
    assert bot.store.find_run("r1") is None and bot.together.calls == []
    assert not posted(bot, "requested by")  # no card
    assert bot.workflow.runs.committed_usd() == 0.0


def test_bad_together_options_are_one_sentence_naming_the_option(together_bot):
    bot = together_bot()
    upload(bot)
    for text, said in (
        ("train provider=together", "provider=together needs model="),
        (TRAIN + " lora=false lora_r=8", "`lora_r=` is for LoRA; lora=false trains every weight."),
        (TRAIN + " lora_dropout=1", "lora_dropout= takes a number from 0 up to"),
        (TRAIN + " learning_rate=-1", "learning_rate= must be a number above 0"),
        (TRAIN + " lr_mult=2", "`lr_mult=` is not a provider=together option"),
        ("train provider=together model=mystery-model", "cannot tell mystery-model's size"),
        ("train provider=nowhere", "provider must be one of openai, local, together"),
    ):
        _, body = bot.command(text, user_id="UR")
        assert said in body["text"], (text, body["text"])
        assert "\n" not in body["text"] and "Traceback" not in body["text"]
    bot.wait_idle()
    assert bot.store.find_run("r1") is None and bot.together.calls == []


def test_without_a_together_key_the_request_is_refused(together_bot):
    bot = together_bot(together_api_key="")
    upload(bot)
    _, body = bot.command(TRAIN, user_id="UR")
    assert body["text"] == "⚠️ TOGETHER_API_KEY is not set, so tunebot cannot reach Together AI."
    assert bot.store.find_run("r1") is None


# --- exactly once -----------------------------------------------------------------


def test_twenty_simultaneous_approvals_make_one_upload_and_one_job(together_bot):
    bot = together_bot(approvers=tuple(f"UA{i}" for i in range(20)))
    bot.together.upload_delay = 1.0  # every poll during the upload sees a run being submitted
    upload(bot)
    request(bot, TRAIN)
    with polling(bot), ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda i: click(bot, f"UA{i}", "approve_run"), range(20)))
        assert codes == [200] * 20
        wait_for(lambda: status(bot) == "running", what="the job")
        time.sleep(1.0)  # a few more ticks: none of them may submit again
    assert len(uploads(bot.together)) == 1
    assert len(creates(bot.together)) == 1 and len(bot.together.jobs()) == 1
    counted = len(bot.store.approvals("r1"))
    late = [e for e in bot.store.audit_log(run_id="r1") if e.action == "refused_approve"]
    assert counted >= 1 and counted + len(late) == 20


# --- money ------------------------------------------------------------------------


def test_requests_beyond_the_budget_are_refused_and_nothing_reaches_together(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    estimate = bot.store.get_run("r1").estimate_usd
    assert estimate > 0
    set_settings(bot, monthly_budget_usd=round(1.5 * estimate, 6))
    _, second = bot.command(TRAIN, user_id="UR")
    bot.wait_idle()
    assert second["text"].startswith("⚠️ This run cannot be requested:"), second
    assert "budget" in second["text"]
    assert bot.store.find_run("r2") is None
    assert bot.together.calls == []  # neither the first (unapproved) nor the refused one
    assert bot.workflow.runs.committed_usd() == pytest.approx(estimate)


def test_togethers_own_estimate_above_the_approved_one_stops_the_run_before_the_job(
    together_bot, monkeypatch
):
    """The table says $0.48 per 1M tokens; Together's estimate endpoint (the fake's rate
    raised to $500) says far more: the run fails before any job, its upload is deleted,
    and nothing is spent."""
    monkeypatch.setitem(FAKE_RATES, MODEL, (500.0, 500.0))
    bot = together_bot(monthly_budget_usd=50.0)
    upload(bot)
    request(bot, TRAIN)
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(lambda: status(bot) == "failed", what="the refusal")
    run = bot.store.get_run("r1")
    quote = run.result_json["together_quote"]
    assert quote["available"] and quote["usd"] > run.estimate_usd * 1.1
    assert run.error.startswith(f"Together estimates ${quote['usd']:,.2f} for this job, more than")
    (told,) = posted(bot, "r1 ❌ failed")
    assert "nothing was trained" in told
    assert len(uploads(bot.together)) == 1 and bot.together.files == {}
    assert len(bot.together.calls_to("POST", "/v1/fine-tunes/estimate-price")) == 1
    assert creates(bot.together) == [] and bot.together.jobs() == []
    assert bot.workflow.runs.committed_usd() == 0.0


def test_a_failure_surfaces_togethers_message_and_settles_what_it_billed(together_bot):
    bot = together_bot(monthly_budget_usd=50.0)
    bot.together.fail_next_job = "Training data has examples longer than the model's context"
    upload(bot)
    request(bot, TRAIN)
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(lambda: status(bot) == "failed", what="the failure")
    run = bot.store.get_run("r1")
    assert run.error == "Training data has examples longer than the model's context"
    (told,) = posted(bot, "r1 ❌ failed")
    assert "Together AI said: Training data has examples longer than the model's context" in told
    assert len(creates(bot.together)) == 1
    entry = bot.workflow.runs.gate.ledger.entries(EPOCH)[0]
    assert entry.ref == "r1" and entry.status == "settled"


def test_cancel_mid_run_cancels_the_job_once(together_bot):
    bot = together_bot()
    bot.together.running_polls = 1000  # it keeps running until cancelled
    upload(bot)
    request(bot, TRAIN)
    with polling(bot):
        click(bot, "UA", "approve_run")
        wait_for(
            lambda: bot.together.jobs() and bot.together.jobs()[0]["status"] == "running",
            what="the job to run",
        )
        _, body = bot.command("cancel r1", user_id="UR")
        assert body["text"] == "Cancelling r1; the thread says when Together AI has stopped it."
        wait_for(lambda: status(bot) == "cancelled", what="the cancellation")
    (job,) = bot.together.jobs()
    assert len(bot.together.calls_to("POST", f"{JOBS}/{job['id']}/cancel", exact=True)) == 1
    assert job["status"] == "cancelled"
    assert len(posted(bot, "r1 ✋ cancelled")) == 1


def test_only_the_requester_or_an_approver_cancels(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    _, body = bot.command("cancel r1", user_id="UX")
    assert body["text"] == "⚠️ Only <@UR> or an approver can cancel r1."
    assert status(bot) == "pending_approval"


# --- after the run ----------------------------------------------------------------


def test_download_puts_the_adapter_archive_in_tunebots_home(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    job = succeed(bot)
    bot.wait_idle()

    _, body = bot.command("download r1", user_id="UX")  # neither requester nor approver
    assert body["text"] == "⚠️ Only <@UR> or an approver can download r1."
    _, body = bot.command("download r1 everything", user_id="UR")
    assert "`everything` is not something to download" in body["text"]
    _, body = bot.command("download r1", channel_id="C2", user_id="UR")
    assert "No run `r1` in this channel" in body["text"]
    assert not bot.together.calls_to("GET", "/v1/finetune/download")

    _, body = bot.command("download r1", user_id="UR")
    assert body["text"] == "Fetching r1's adapter from Together; its thread says when."
    bot.wait_idle()
    folder = bot.settings.home / "runs" / "r1" / "together"
    archives = list(folder.glob("*-adapter.tar.gz"))
    assert len(archives) == 1 and archives[0].read_bytes() == bot.together.adapter_archive(
        job["id"]
    )
    unpacked = folder / "adapter"
    assert (unpacked / "adapter_config.json").is_file() or any(unpacked.rglob("*"))
    run = bot.store.get_run("r1")
    assert run.result_json["downloads"] == {"adapter": "runs/r1/together/adapter"}
    (told,) = posted(bot, "r1's adapter is in tunebot's home")
    assert "`runs/r1/together/adapter`" in told and str(bot.settings.home) not in told

    _, body = bot.command("download r1", user_id="UA")  # already there: not fetched again
    assert body["text"] == "r1's adapter is already in tunebot's home: `runs/r1/together/adapter`."
    bot.wait_idle()
    assert len(bot.together.calls_to("GET", "/v1/finetune/download")) == 1


# --- a kill during the upload -------------------------------------------------------


def test_sigkill_during_the_together_upload_then_restart_makes_one_upload_and_one_job(tmp_path):
    """`tunebot serve --http` is SIGKILLed while Together holds its training-file upload;
    a new process on the same home takes the lapsed claim over, finishes the upload the
    dead one left (by its name) and creates exactly one job."""
    import os
    import signal

    from storage import Store
    from tests.bot.test_restart import Bot, _env, _has_approve_button, _posted, _wait
    from tests.fakes.openai_api import FakeOpenAI
    from tests.fakes.signing import (
        button_click_payload,
        event_body,
        file_share_message_event,
        interaction_body,
        slash_command_body,
    )
    from tests.fakes.slack_api import FakeSlack

    with (
        FakeSlack() as slack,
        FakeOpenAI(api_key="sk-test") as openai,
        FakeTogether(api_key="tg-test") as together,
    ):
        home = tmp_path / "home"
        env = {
            **_env(slack, openai, home),
            "TOGETHER_API_KEY": together.api_key,
            "TUNEBOT_TOGETHER_BASE_URL": together.base_url,
            "TUNEBOT_JUDGE_MODEL": "",
        }
        bots: list[Bot] = []
        try:
            first = Bot(env, tmp_path / "bot-1.log")
            bots.append(first)
            first.wait_healthy()
            file = slack.add_file(chat_jsonl(40), name="support.jsonl")
            assert first.post(event_body(file_share_message_event(file), event_id="EvT1"))[0] == 200
            _wait("the report", lambda: _posted(slack, "support.jsonl (d"), timeout=60)
            status_code, ack = first.post(slash_command_body(TRAIN, user_id="UR"))
            assert status_code == 200 and "r1 needs approval" in json.loads(ack)["text"], ack
            _wait("the approval card of r1", lambda: _has_approve_button(slack), timeout=30)
            together.upload_delay = 3.0
            payload = button_click_payload("UA", "approve_run")
            assert first.post(interaction_body(payload))[0] == 200
            # Together has the bytes (stored before the delay); the bot never hears back.
            _wait(
                "the upload's bytes to reach Together",
                lambda: together.calls_to("PUT", "/upload/"),
                timeout=60,
                interval=0.02,
            )
            assert not creates(together), "a job before the upload returned"
            os.kill(first.pid, signal.SIGKILL)
            assert first.proc.wait(timeout=30) == -signal.SIGKILL
            together.upload_delay = 0.0

            second = Bot(env, tmp_path / "bot-2.log")
            bots.append(second)
            second.wait_healthy()
            jobs = _wait("the restarted bot to create a job", together.jobs, timeout=60)
            together.run_to_end(jobs[0]["id"])
            _wait("r1's success", lambda: _posted(slack, "r1 🎉 succeeded"), timeout=60)
            time.sleep(1.0)  # a few more ticks: nothing may be created or posted twice
            second.stop()

            assert len(uploads(together)) == 1, [c.path for c in uploads(together)]
            assert len(creates(together)) == 1 and len(together.jobs()) == 1
            assert len(together.calls_to("POST", "/v1/files/", exact=False)) == 1  # preprocess
            assert together.jobs()[0]["training_file"] == next(iter(together.files))
            with Store.in_home(home) as store:
                run = store.get_run("r1")
                assert (run.status, run.external_id) == ("succeeded", jobs[0]["id"])
            assert len(_posted(slack, "r1 🎉 succeeded")) == 1
            for bot in bots:
                assert "Traceback" not in bot.log(), bot.log()[-4000:]
            assert "taking over its submission" in second.log()
            print(
                f"uploads: {len(uploads(together))}, jobs created: {len(creates(together))}, "
                f"file look-ups: {len(together.calls_to('GET', FILES, exact=True))}"
            )
        finally:
            for bot in bots:
                bot.kill_group()


def test_a_download_together_refuses_is_one_sentence_and_can_be_asked_again(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    succeed(bot)
    bot.wait_idle()
    bot.together.inject("GET", "/v1/finetune/download", 404, body={"error": {"message": "gone"}})
    _, body = bot.command("download r1 merged", user_id="UR")
    assert body["text"] == "Fetching r1's merged from Together; its thread says when."
    bot.wait_idle()
    (told,) = posted(bot, "r1: the merged could not be downloaded")
    assert "gone" in told and str(bot.settings.home) not in told and "Traceback" not in told
    assert "downloads" not in bot.store.get_run("r1").result_json
    _, body = bot.command("download r1 merged", user_id="UR")  # asked again: fetched now
    bot.wait_idle()
    assert posted(bot, "r1's merged is in tunebot's home: `runs/r1/together/merged`")
    assert len(bot.together.calls_to("GET", "/v1/finetune/download")) == 2
