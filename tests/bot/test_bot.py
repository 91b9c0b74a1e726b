"""The Slack bot over real HTTP: signed requests in, Web API calls out to a fake."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import yaml

from bot import listeners, render
from bot.commands import SPECS
from tests.conftest import ROOT, SECRET, training_file
from tests.fakes.signing import (
    file_share_message_event,
    file_shared_event,
    post_signed,
    slash_command_body,
)
from tests.fakes.slack_api import DOWNLOAD

MANIFEST = ROOT / "manifest.yml"
README = ROOT / "README.md"


def drop(bot, content: bytes, name: str = "support.jsonl", channel: str = "C1", **kwargs):
    """Share a file in Slack and deliver the event a real workspace would."""
    file = bot.slack.add_file(content, name=name, channel=channel, **kwargs)
    assert bot.event(file_share_message_event(file), event_id=f"Ev{file['id']}") == 200
    return file


def thread_messages(bot, file, channel="C1"):
    return bot.slack.messages(channel=channel, thread_ts=file["shares"]["public"][channel][0]["ts"])


# --- requests must be signed ---------------------------------------------------


def test_unsigned_tampered_and_stale_requests_get_401(bot):
    body = slash_command_body("help")
    url = bot.url + "/slack/events"
    assert post_signed(url, body, "wrong-secret")[0] == 401
    status, _, _ = post_signed(url, body, SECRET, headers={"X-Slack-Signature": "v0=" + "0" * 64})
    assert status == 401
    assert post_signed(url, body, SECRET, timestamp=int(time.time()) - 6 * 60)[0] == 401
    assert post_signed(url, body, SECRET)[0] == 200


def test_healthz_and_unknown_paths(bot):
    import urllib.error
    import urllib.request

    assert urllib.request.urlopen(bot.url + "/healthz").read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bot.url + "/admin")
    assert err.value.code == 404


# --- file drops -----------------------------------------------------------------


def test_file_drop_gets_exactly_one_report_in_its_thread(bot):
    file = bot.slack.add_file(training_file(12, bad_lines=1), name="support.jsonl")
    message_event = file_share_message_event(file)
    assert bot.event(message_event, event_id="Ev1") == 200
    assert (
        bot.event(
            message_event,
            event_id="Ev1",
            headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"},
        )
        == 200
    )
    assert bot.event(file_shared_event(file), event_id="Ev2") == 200
    bot.wait_idle()

    replies = thread_messages(bot, file)
    assert len(replies) == 1, [m["text"] for m in replies]
    text = replies[0]["text"]
    assert text.startswith("support.jsonl (d1): 13 examples, 12 valid")
    assert "invalid_json ×1 — line 13" in text
    assert "gpt-4o-mini-2024-07-18" in text and "Local LoRA" in text and "2027-01-06" in text
    assert len(bot.slack.calls_to(DOWNLOAD)) == 1

    (upload,) = bot.slack.uploads
    assert upload.channel_id == "C1" and upload.thread_ts == file["shares"]["public"]["C1"][0]["ts"]
    assert upload.content.startswith(b"\x89PNG") and upload.filename == "tokens-d1.png"

    dataset = bot.store.get_dataset("d1")
    assert (dataset.examples, dataset.valid_examples, dataset.errors) == (13, 12, 1)
    assert bot.workflow.blobs.path(dataset.sha256).read_bytes() == training_file(12, bad_lines=1)


def test_file_shared_alone_is_enough(bot):
    file = bot.slack.add_file(training_file(12), name="alone.jsonl")
    assert bot.event(file_shared_event(file), event_id="EvA") == 200
    bot.wait_idle()
    (reply,) = thread_messages(bot, file)
    assert reply["text"].startswith("alone.jsonl (d1): 12 examples, 12 valid — 0 errors")
    assert bot.slack.calls_to("files.info")


def test_oversize_file_is_refused_before_download(make_bot):
    bot = make_bot(max_file_mb=1)
    file = drop(bot, training_file(12) * 800)  # over 1 MiB
    bot.wait_idle()
    (reply,) = thread_messages(bot, file)
    assert "the limit is 1 MiB, so it was not downloaded" in reply["text"]
    assert not bot.slack.calls_to(DOWNLOAD)
    assert bot.store.datasets() == []


def test_channels_outside_the_allow_list_are_ignored(make_bot):
    bot = make_bot(channels=("C1",))
    drop(bot, training_file(), channel="C2")
    bot.wait_idle()
    assert bot.slack.messages(channel="C2") == []
    assert not bot.slack.calls_to(DOWNLOAD)


def test_other_file_types_are_ignored(bot):
    drop(bot, b"a,b\n1,2\n", name="notes.txt")
    bot.wait_idle()
    assert bot.slack.messages() == [] and not bot.slack.calls_to(DOWNLOAD)


def test_binary_body_gets_a_clear_reply_and_is_kept(bot):
    file = drop(bot, bytes(range(256)) * 20, name="weights.jsonl")
    bot.wait_idle()
    (reply,) = thread_messages(bot, file)
    assert "not_jsonl" in reply["text"] and "binary" in reply["text"]
    assert bot.store.get_dataset("d1").errors >= 1


def test_download_failure_gets_a_clear_reply(bot):
    bot.slack.fail_downloads = 500
    file = drop(bot, training_file())
    bot.wait_idle()
    (reply,) = thread_messages(bot, file)
    assert "Could not download support.jsonl: Slack answered HTTP 500" in reply["text"]
    assert "Traceback" not in reply["text"]


def test_login_page_instead_of_file_is_detected(bot):
    bot.slack.login_page_on_bad_auth = True
    bot.workflow.ctx.settings = bot.workflow.settings.__class__(
        **{**bot.workflow.settings.__dict__, "slack_bot_token": "xoxb-stale"}
    )
    file = drop(bot, training_file())
    bot.wait_idle()
    (reply,) = thread_messages(bot, file)
    assert "sign-in page" in reply["text"]


def test_rate_limited_post_is_retried(bot):
    bot.slack.rate_limit_next("chat.postMessage", retry_after=0)
    file = drop(bot, training_file())
    bot.wait_idle()
    assert len(thread_messages(bot, file)) == 1


# --- /finetune ------------------------------------------------------------------


def test_help_lists_every_subcommand_ephemerally(bot):
    status, body = bot.command("help")
    assert status == 200 and body["response_type"] == "ephemeral"
    for name, spec in SPECS.items():
        assert f"/finetune {spec.usage}" in body["text"], name


def test_unknown_subcommand_gets_help(bot):
    _, body = bot.command("frobnicate now")
    assert (
        body["text"].startswith("I don't know `frobnicate`.")
        and "/finetune datasets" in body["text"]
    )


def test_unknown_option_names_itself_and_the_valid_ones(bot):
    _, body = bot.command("estimate colour=blue")
    assert "`estimate` has no option `colour`" in body["text"] and "model=, epochs=" in body["text"]
    assert body["response_type"] == "ephemeral"


def test_datasets_estimate_and_validate_after_a_drop(bot):
    file = drop(bot, training_file(40))
    bot.wait_idle()
    _, listing = bot.command("datasets")
    assert listing["response_type"] == "in_channel" and "d1 — support.jsonl" in listing["text"]

    _, ack = bot.command('estimate model="gpt-4.1" epochs=2')
    assert ack["response_type"] == "ephemeral" and "d1" in ack["text"]
    _, ack = bot.command("validate d1")
    assert "Posting d1's report" in ack["text"]
    bot.wait_idle()
    report, *answers = (m["text"] for m in thread_messages(bot, file))
    # Two jobs on two threads: either answer may be posted first.
    (estimate,) = (a for a in answers if re.search(r"gpt-4\.1-2025-04-14 +2 ep .*◀", a))
    assert answers == [estimate, report] or answers == [report, estimate]  # the report, again


def test_unknown_dataset_and_bad_model_are_ephemeral(bot):
    _, body = bot.command("validate d9")
    assert (
        body["response_type"] == "ephemeral" and "No dataset `d9` in this channel" in body["text"]
    )
    _, body = bot.command("estimate")
    assert "No dataset in this channel yet" in body["text"]
    drop(bot, training_file())
    bot.wait_idle()
    _, body = bot.command("estimate d7")
    assert "No dataset `d7` in this channel" in body["text"]
    _, body = bot.command("estimate model=gpt-9")
    assert "unknown model 'gpt-9'" in body["text"]
    _, body = bot.command("validate d1", channel_id="C2")
    assert "No dataset" in body["text"]  # datasets stay in their channel


def test_runs_and_status_with_no_runs(bot):
    _, body = bot.command("runs")
    assert body["response_type"] == "in_channel" and "No training runs" in body["text"]
    _, body = bot.command("status r4")
    assert "No run `r4`" in body["text"]


def test_html_escaping_and_quotes_are_undone(bot):
    drop(bot, training_file())
    bot.wait_idle()
    _, body = bot.command("estimate model=&quot;gpt-4o&quot;")
    assert "gpt-4o-2024-08-06" in body["text"]


def test_acks_stay_fast_while_a_file_is_validated(bot):
    drop(bot, training_file(20_000))
    slowest = max(bot.post(slash_command_body("help"))[2] for _ in range(20))
    bot.wait_idle()
    assert slowest < 2.5, slowest  # Slack gives up at 3 s


# --- the manifest and the listeners agree -----------------------------------------


def test_every_manifest_command_and_event_has_a_listener_and_back(bot):
    manifest = yaml.safe_load(MANIFEST.read_text())
    commands = {c["command"] for c in manifest["features"]["slash_commands"]}
    events = {e.split(".")[0] for e in manifest["settings"]["event_subscriptions"]["bot_events"]}
    assert commands == {listeners.COMMAND}
    assert events == set(listeners.EVENTS)
    for i, event_type in enumerate(sorted(events)):
        event = {"type": event_type, "user": "U1", "channel": "C1", "ts": "1.0", "tab": "messages"}
        if event_type == "file_shared":
            event |= {"file_id": "F404", "channel_id": "C1"}
        # Bolt answers 404 to a request no listener matched.
        assert bot.event(event, event_id=f"EvM{i}") == 200, event_type
    assert bot.command("help")[0] == 200
    bot.wait_idle()


def test_buttons_and_modals_are_the_block_kit_json_slack_always_got():
    """Built with slack_sdk's typed blocks, they serialise to the same plain JSON:
    no `emoji` keys added, the ids the listeners match on."""
    assert render.reject_modal("r7") == {
        "type": "modal",
        "callback_id": "reject_reason",
        "private_metadata": "r7",
        "title": {"type": "plain_text", "text": "Reject r7"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": "reason",
                "label": {"type": "plain_text", "text": "Why? The requester sees this."},
                "element": {
                    "type": "plain_text_input",
                    "action_id": "reason",
                    "multiline": True,
                    "max_length": 500,
                },
            }
        ],
    }
    run = SimpleNamespace(
        id="r7", status="pending_approval", requested_by="U1", plan_hash="9f2c", provider="openai",
        model="gpt-4o-mini", dataset_id="d1", estimate_usd=3.0, expires_at=None,
        plan_json={"secret_hold": True, "epochs": 3, "estimate": {"billed_tokens": 10}},
    )  # fmt: skip
    tally = SimpleNamespace(approvals=[], needed=1, overridden_by=None, rejected_by=None)
    card = render.approval_card(run, tally, approvers=["UA"], budget=None, committed_usd=0)
    (actions,) = (b for b in card.blocks if b["type"] == "actions")
    assert actions["block_id"] == "decide_r7"
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [
        (action_id, "r7") for action_id in listeners.ACTIONS
    ]
    assert actions["elements"][0]["text"] == {"type": "plain_text", "text": "Approve"}
    advise = render.advise_modal("C1")
    assert advise["callback_id"] == "advise" and '"emoji"' not in json.dumps([card.blocks, advise])


def test_every_subcommand_has_a_handler(bot):
    """The grammar (SPECS) and the workflow's dispatch table name the same subcommands."""
    # advise opens a modal from the listener itself: its trigger lasts 3 s.
    assert set(bot.workflow._commands()) | {"advise"} == set(SPECS)


def _readme_subcommands() -> set[str]:
    """The subcommands README's command overview shows: the word after `/finetune`
    on each line that starts with it, and the first word of each `| …` alternative."""
    names = set()
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("/finetune "):
            continue
        first, *alternatives = line.split("→")[0].removeprefix("/finetune ").split(" | ")
        names |= {words.split()[0] for words in (first, *alternatives) if words.split()}
    return names


def test_every_subcommand_is_documented_in_the_readme_and_the_help():
    """Every subcommand of the grammar is in README's command overview and in
    `/finetune help`, with its usage and summary; neither names one that is not."""
    assert _readme_subcommands() == set(SPECS)
    text = render.help_text().text
    assert set(re.findall(r"^• /finetune (\w+)", text, re.MULTILINE)) == set(SPECS)
    for spec in SPECS.values():
        assert f"• /finetune {spec.usage} — {spec.summary}" in text, spec.name
