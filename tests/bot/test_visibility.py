"""Who sees what (issue 12): App Home and /finetune budget follow channel membership,
and TUNEBOT_CHANNELS holds at every entry point. All through signed HTTP."""

from __future__ import annotations

import json
import re

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.render import money
from tests.bot.test_home_budget_advise import advise_submission
from tests.bot.test_runs import JOBS, click
from tests.conftest import training_file
from tests.fakes.signing import (
    file_share_message_event,
    interaction_body,
    view_submission_payload,
)
from tests.fakes.slack_api import FakeSlack

C2_MODEL = "gpt-4.1-mini"


def drop(bot, channel: str, name: str, user: str) -> None:
    file = bot.slack.add_file(training_file(40), name=name, channel=channel, user=user)
    assert bot.event(file_share_message_event(file), event_id=f"Ev{file['id']}") == 200
    bot.wait_idle()


def ask(bot, text: str, channel: str, user: str) -> dict:
    status, body = bot.command(text, user_id=user, channel_id=channel)
    assert status == 200
    bot.wait_idle()
    return body


def two_channels(paid_bot, **overrides):
    """C1: d1 support.jsonl, r1 on gpt-4o-mini by UR. C2: d2 plans-c2.jsonl, r2 on
    gpt-4.1-mini by UZ. Both runs wait for approval (UA and UB approve)."""
    bot = paid_bot(monthly_budget_usd=100.0, **overrides)
    drop(bot, "C1", "support.jsonl", "UR")
    drop(bot, "C2", "plans-c2.jsonl", "UZ")
    ask(bot, "train", "C1", "UR")
    ask(bot, f"train model={C2_MODEL}", "C2", "UZ")
    r1, r2 = bot.store.get_run("r1"), bot.store.get_run("r2")
    assert (r1.channel, r2.channel) == ("C1", "C2")
    assert r1.status == r2.status == "pending_approval"
    return bot


def c2_secrets(bot) -> list[str]:
    """What must not leave C2: its run and dataset ids, file name, model and requester."""
    r2 = bot.store.get_run("r2")
    return [r"\br2\b", r"\bd2\b", "plans-c2", re.escape(r2.model), r"\bUZ\b"]


def leaked(bot, text: str) -> list[str]:
    return [needle for needle in c2_secrets(bot) if re.search(needle, text)]


def open_home(bot, user: str, event_id: str) -> str:
    event = {"type": "app_home_opened", "user": user, "channel": "D1", "tab": "home"}
    assert bot.event(event, event_id=event_id) == 200
    bot.wait_idle()
    return json.dumps(bot.slack.home_tabs[user], ensure_ascii=False)


def conversations_calls(bot, user: str) -> list:
    return [c for c in bot.slack.calls_to("users.conversations") if c.params.get("user") == user]


# --- App Home follows membership -------------------------------------------------------


def test_home_shows_only_the_viewers_channels(paid_bot, slack):
    # 250 other channels first: C1 is on the second page of users.conversations.
    # Set before anything happens: Home is refreshed (and memberships cached) on each change.
    slack.memberships["UA"] = [f"C9{i:04d}" for i in range(250)] + ["C1"]
    bot = two_channels(paid_bot)
    text = open_home(bot, "UA", "EvHome1")
    assert "r1: openai gpt-4o-mini" in text and "d1 support.jsonl" in text
    assert "Waiting for your approval" in text  # r1, in C1, waits for UA
    assert leaked(bot, text) == []
    assert "of $100.00" in text  # the month's spend stays one shared total
    # One lookup of two pages (the SDK followed the cursor), cached since: the Home
    # refreshes while the runs were requested and both openings asked Slack nothing more.
    open_home(bot, "UA", "EvHome2")
    calls = conversations_calls(bot, "UA")
    assert len(calls) == 2 and not calls[0].params.get("cursor") and calls[1].params["cursor"]
    assert calls[0].params["types"] == "public_channel,private_channel"
    assert calls[0].params["exclude_archived"] in ("1", "true")


def test_home_of_a_member_of_no_channel_or_an_archived_one_is_empty(paid_bot, slack):
    slack.memberships["UB"] = ["C2"]
    slack.channels["C2"] = {"id": "C2", "name": "plans", "is_channel": True,
                            "is_private": False, "is_archived": True}  # fmt: skip
    bot = two_channels(paid_bot)
    for user, event_id in (("UB", "EvHomeB"), ("UNOBODY", "EvHomeN")):
        text = open_home(bot, user, event_id)
        assert leaked(bot, text) == [] and "r1" not in text and "d1 " not in text
        assert "Runs in progress*\\nNone right now." in text


def test_home_when_slack_will_not_list_channels_shows_nothing(paid_bot):
    bot = two_channels(paid_bot)
    bot.slack.memberships["UQ"] = ["C1", "C2"]
    bot.slack.scopes = frozenset({"channels:read"})  # groups:read is missing
    text = open_home(bot, "UQ", "EvHomeS1")
    assert "d1 " not in text and leaked(bot, text) == []
    assert "of $100.00" in text
    bot.slack.scopes = None  # the failure was not cached: the next opening asks again
    text = open_home(bot, "UQ", "EvHomeS2")
    assert "d1 support.jsonl" in text and "d2 plans-c2.jsonl" in text


# --- /finetune budget: this channel in full, the others as one sum ----------------------


def test_budget_shows_this_channels_runs_and_only_a_total_for_the_others(paid_bot):
    bot = two_channels(paid_bot)
    body = ask(bot, "budget", "C1", "UR")
    text = body["text"] + json.dumps(body.get("blocks"), ensure_ascii=False)
    assert body["response_type"] == "in_channel"
    assert "r1 pending_approval openai gpt-4o-mini" in text and "<@UR>" in text
    assert leaked(bot, text) == []
    gate = bot.workflow.runs.gate
    here = bot.store.get_run("r1").estimate_usd
    others = bot.store.get_run("r2").estimate_usd
    assert gate.committed_usd() == pytest.approx(here + others)
    assert f"This channel: {money(here)}. Other channels together: {money(others)}." in text
    month = f"{bot.workflow.runs.clock():%B %Y}"
    assert f"Spend in {month}: {money(gate.committed_usd())} of $100.00" in text
    # And the other way round: C2 sees its own run and C1's as a sum.
    body = ask(bot, "budget", "C2", "UZ")
    assert "r2 pending_approval" in body["text"] and "r1" not in body["text"]
    assert "<@UR>" not in body["text"] and "gpt-4o-mini" not in body["text"]


# --- TUNEBOT_CHANNELS at every entry point -----------------------------------------------


@pytest.fixture
def allowlisted(paid_bot):
    """Runs in C1 and C2 made by a bot that served both; then a restart with
    TUNEBOT_CHANNELS=C1 on the same database."""
    two_channels(paid_bot)
    return paid_bot(monthly_budget_usd=100.0, channels=("C1",))


def unchanged(bot, before) -> None:
    bot.wait_idle()
    run = bot.store.get_run("r2")
    assert (run.status, run.updated_at) == (before.status, before.updated_at)
    assert bot.store.approvals("r2") == []
    assert not bot.openai.calls_to("POST", JOBS) and not bot.openai.calls_to("POST", "/files")


@pytest.mark.parametrize(
    ("action_id", "channel"),
    [
        ("approve_run", "C2"),
        ("reject_run", "C2"),
        ("override_secret", "C2"),
        ("approve_run", "C1"),  # a click claiming C1 on C2's run: the run's channel decides
    ],
)
def test_clicks_on_a_run_in_a_channel_not_served_are_refused(allowlisted, action_id, channel):
    bot = allowlisted
    before = bot.store.get_run("r2")
    opened = len(bot.slack.calls_to("views.open"))
    assert click(bot, "UA", action_id, run_id="r2", channel=channel) == 200
    unchanged(bot, before)
    assert len(bot.slack.calls_to("views.open")) == opened  # no reason modal either
    (told,) = [e for e in bot.slack.ephemerals if e["user"] == "UA"]
    assert "does not serve this channel" in told["text"]
    audit = [e for e in bot.store.audit_log(run_id="r2") if e.action == "refused_unserved"]
    assert audit and audit[0].actor == "UA"


def test_a_reject_reason_for_a_run_in_a_channel_not_served_is_refused(allowlisted):
    bot = allowlisted
    before = bot.store.get_run("r2")
    values = {"reason": {"reason": {"type": "plain_text_input", "value": "no"}}}
    payload = view_submission_payload("reject_reason", "r2", values, user_id="UA")
    status, text, _ = bot.post(interaction_body(payload))
    assert status == 200
    answer = json.loads(text)
    assert answer["response_action"] == "errors" and "does not serve" in answer["errors"]["reason"]
    unchanged(bot, before)
    assert "r2 was rejected" not in json.dumps(bot.slack.messages())


def test_advise_in_a_channel_not_served_is_refused(allowlisted):
    bot = allowlisted
    status, body = bot.command("advise", channel_id="C2", user_id="UZ")
    assert status == 200 and body["response_type"] == "ephemeral"
    assert "does not serve this channel" in body["text"]
    assert not bot.slack.calls_to("views.open")
    status, text, _ = advise_submission_in(bot, "C2")
    assert status == 200
    answer = json.loads(text)
    assert (
        answer["response_action"] == "errors" and "does not serve" in answer["errors"]["problems"]
    )
    bot.wait_idle()
    assert not [m for m in bot.slack.messages(channel="C2") if "here is what I'd do" in m["text"]]
    # The served channel still gets its modal.
    status, _ = bot.command("advise", channel_id="C1", user_id="UR")
    assert status == 200 and len(bot.slack.calls_to("views.open")) == 1


def test_home_with_an_allowlist_shows_only_served_channels(allowlisted):
    bot = allowlisted
    bot.slack.memberships["UA"] = ["C1", "C2"]
    text = open_home(bot, "UA", "EvHomeAllow")
    assert "r1: openai" in text and leaked(bot, text) == []


# --- numbers in the advise modal -----------------------------------------------------------


def advise_submission_in(bot, channel: str):
    def checks(block, keys):
        return {block: {"type": "checkboxes", "selected_options": [{"value": k} for k in keys]}}

    values = {
        "problems": checks("problems", ("style",)),
        "calls_per_day": {"calls_per_day": {"type": "number_input", "value": "5000"}},
        "good_examples": {"good_examples": {"type": "number_input", "value": "400"}},
        "tried": checks("tried", ()),
    }
    payload = view_submission_payload("advise", channel, values, user_id="UZ", view_id="V9")
    return bot.post(interaction_body(payload))


@pytest.mark.parametrize("bad", ["1e309", "nan", "inf", "-5", "2.5", "lots", "", "9" * 5000])
def test_bad_numbers_in_the_advise_modal_are_field_errors(bot, bad):
    status, text, _ = advise_submission(bot, calls=bad)
    assert status == 200
    answer = json.loads(text)
    assert answer["response_action"] == "errors"
    assert set(answer["errors"]) == {"calls_per_day"}
    assert "whole number" in answer["errors"]["calls_per_day"]
    status, text, _ = advise_submission(bot, calls=bad, examples=bad)
    assert set(json.loads(text)["errors"]) == {"calls_per_day", "good_examples"}
    bot.wait_idle()
    assert bot.slack.messages(channel="C1") == []  # no advice, no error message


def test_good_numbers_with_separators_still_give_advice(bot):
    status, text, _ = advise_submission(bot, calls="5,000", examples="400")
    assert status == 200 and text in ("", "null")
    bot.wait_idle()
    (posted,) = bot.slack.messages(channel="C1")
    assert "Recommended: fine tuning" in posted["text"]


# --- the fake's users.conversations -------------------------------------------------------


def test_fake_users_conversations_pages_filters_and_needs_scopes():
    with FakeSlack() as slack:
        client = WebClient(token=slack.bot_token, base_url=slack.base_url)
        slack.memberships["U1"] = ["C1", "G1", "C2", "C3"]
        slack.channels["C3"] = {"id": "C3", "is_channel": True, "is_private": False,
                                "is_archived": True}  # fmt: skip
        pages = client.users_conversations(
            user="U1", types="public_channel,private_channel", exclude_archived=True, limit=2
        )
        seen = [[c["id"] for c in page["channels"]] for page in pages]
        assert seen == [["C1", "G1"], ["C2"]]
        public = client.users_conversations(user="U1")
        assert [c["id"] for c in public["channels"]] == ["C1", "C2", "C3"]
        assert client.users_conversations(user="U9")["channels"] == []
        slack.scopes = frozenset({"channels:read"})
        with pytest.raises(SlackApiError) as err:
            client.users_conversations(user="U1", types="public_channel,private_channel")
        assert err.value.response["error"] == "missing_scope"
        assert err.value.response["needed"] == "groups:read"
