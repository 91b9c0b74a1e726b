"""App Home, /finetune budget and /finetune advise over the real bot."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.bot.test_runs import click, request, upload
from tests.fakes.signing import interaction_body, view_submission_payload


def advise_submission(
    bot,
    user="U1",
    problems=("style",),
    calls="5000",
    examples="400",
    tried=("prompting", "few_shot"),
):
    def checks(block, keys):
        return {block: {"type": "checkboxes", "selected_options": [{"value": k} for k in keys]}}

    values = {
        "problems": checks("problems", problems),
        "calls_per_day": {"calls_per_day": {"type": "number_input", "value": calls}},
        "good_examples": {"good_examples": {"type": "number_input", "value": examples}},
        "tried": checks("tried", tried),
    }
    payload = view_submission_payload("advise", "C1", values, user_id=user, view_id="V2")
    return bot.post(interaction_body(payload))


def test_advise_opens_a_modal_and_posts_the_advice(bot):
    status, _ = bot.command("advise")
    assert status == 200
    (opened,) = bot.slack.calls_to("views.open")
    view = opened.params["view"]
    assert view["callback_id"] == "advise" and view["private_metadata"] == "C1"
    assert {b["block_id"] for b in view["blocks"]} == {
        "problems",
        "calls_per_day",
        "good_examples",
        "tried",
    }
    status, _, _ = advise_submission(bot)
    bot.wait_idle()
    assert status == 200
    (posted,) = bot.slack.messages(channel="C1")
    assert posted["text"].startswith("<@U1> here is what I'd do:\nRecommended: fine tuning")
    assert "a few hundred excellent examples" in posted["text"]


def test_advise_without_a_problem_is_refused_in_the_modal(bot):
    status, text, _ = advise_submission(bot, problems=())
    assert status == 200
    answer = json.loads(text)
    assert answer["response_action"] == "errors" and "at least one" in answer["errors"]["problems"]


def test_budget_by_run_and_person(paid_bot):
    bot = paid_bot(monthly_budget_usd=100.0)
    upload(bot)
    request(bot, user="UR")
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    _, body = bot.command("budget")
    assert body["response_type"] == "in_channel"
    assert (
        "of $100.00" in body["text"]
        and "r1 running openai gpt-4o-mini-2024-07-18: estimate $" in body["text"]
    )
    assert "actual —" in body["text"] and "By person: <@UR> $" in body["text"]


def test_home_tab_shows_runs_approvals_spend_and_datasets(paid_bot):
    bot = paid_bot(monthly_budget_usd=50.0)
    bot.slack.memberships.update(UA=["C1"], UR=["C1"])  # Home shows only the viewer's channels
    upload(bot)
    request(bot, user="UR")
    view = bot.workflow.home_tab.home("UA")
    text = json.dumps(view, ensure_ascii=False)
    assert view["type"] == "home"
    assert "Waiting for your approval" in text and "r1: openai gpt-4o-mini-2024-07-18" in text
    assert "of $50.00" in text and "d1 support.jsonl: 40/40 valid" in text
    assert "Waiting for your approval" not in json.dumps(
        bot.workflow.home_tab.home("UR"), ensure_ascii=False
    )  # not their own
    click(bot, "UA", "approve_run")
    bot.wait_idle()
    assert "Runs in progress" in json.dumps(
        bot.workflow.home_tab.home("UA")
    ) and "r1: 🏃 Running" in json.dumps(bot.workflow.home_tab.home("UA"), ensure_ascii=False)
    assert "UA" in bot.slack.home_tabs and "UR" in bot.slack.home_tabs  # refreshed on the change


def test_home_opened_publishes(bot):
    bot.event(
        {"type": "app_home_opened", "user": "U7", "channel": "D1", "tab": "home"}, event_id="EvH"
    )
    bot.wait_idle()
    assert bot.slack.home_tabs["U7"]["type"] == "home"


def test_cli_advise_with_flags_and_bad_input():
    run = [sys.executable, "-m", "bot.cli", "advise", "--problem", "knowledge"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("Recommended: rag")
    bad = subprocess.run([*run, "--tried", "magic"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown approach 'magic'" in bad.stderr
