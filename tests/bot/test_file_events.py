"""Slack's file events as they really arrive: out of order, early, as stubs, in a
second channel. Every case goes through signed HTTP into the real Bolt app and
against the Slack fake, which answers `files.info` as Slack does right after an
upload; each counts the reports posted per file and channel.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.conftest import training_file
from tests.fakes.signing import file_share_message_event, file_shared_event

REPORT = re.compile(r"\(d\d+\): [\d,]+ examples?, ")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


@pytest.fixture
def fast_bot(make_bot):
    """A bot that waits at most 6 s for a file Slack cannot serve yet."""
    return make_bot(file_wait_seconds=6.0)


def reports(bot, channel: str = "C1", name: str = "support.jsonl") -> list[dict]:
    return [
        m
        for m in bot.slack.messages(channel)
        if REPORT.search(m.get("text") or "") and name in m["text"]
    ]


def share_ts(file: dict, channel: str = "C1") -> str:
    for kind in ("public", "private"):
        for share in file["shares"].get(kind, {}).get(channel, []):
            return share["ts"]
    raise AssertionError(f"{file['id']} is not shared in {channel}")


def downloads(bot, file_id: str | None = None) -> int:
    return len(
        [
            c
            for c in bot.slack.calls
            if "/files-pri/" in (c.path or "") and (file_id is None or file_id in c.path)
        ]
    )


def stored_blobs(bot) -> list:
    return [p for p in (bot.settings.home / "blobs").rglob("*") if p.is_file()]


def later(seconds: float, fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    thread.start()
    return thread


def info_calls(bot, file_id: str) -> int:
    return len([c for c in bot.slack.calls_to("files.info") if c.params.get("file") == file_id])


# --- 1. the first delivery no longer wins when it fails -----------------------------------


def test_file_shared_before_files_info_can_see_it_is_checked_once(fast_bot):
    bot = fast_bot
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.slack.lag_file(file["id"], not_found=3)
    assert bot.event(file_shared_event(file), event_id="Ev1") == 200
    sent = later(0.3, lambda: bot.event(file_share_message_event(file), event_id="Ev2"))
    sent.join()
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report["thread_ts"] == share_ts(file)
    assert bot.store.dataset_for_file(file["id"], "C1").report_json
    assert not [m for m in bot.slack.messages("C1") if "would not" in m["text"]]


def test_a_file_without_a_download_link_yet_is_asked_about_again(fast_bot):
    bot = fast_bot
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.slack.lag_file(file["id"], no_link=2)
    event = file_share_message_event(file)
    for key in ("url_private", "url_private_download"):
        event["files"][0].pop(key)
    bot.event(event, event_id="Ev1")
    bot.wait_idle(60)
    assert len(reports(bot)) == 1
    assert info_calls(bot, file["id"]) == 3  # two without a link, then the one with it


# --- 2. stubs are never trusted -------------------------------------------------------------


def test_a_slack_connect_stub_is_described_by_files_info(bot):
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    event = file_share_message_event(file)
    event["files"] = [{"id": file["id"], "mode": "file_access", "file_access": "check_file_info"}]
    bot.event(event, event_id="Ev1")
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report["thread_ts"] == share_ts(file)
    assert info_calls(bot, file["id"]) == 1


def test_an_unnamed_file_is_decided_by_its_first_bytes(bot):
    jsonl = bot.slack.add_file(training_file(20), name="export", filetype="text")
    notes = bot.slack.add_file(
        b"meeting notes\nnothing to train on\n", name="notes", filetype="text"
    )
    for i, file in enumerate((jsonl, notes)):
        bot.event(file_shared_event(file), event_id=f"Ev{i}")
    bot.wait_idle(60)
    assert len(reports(bot, name="export")) == 1
    assert bot.store.dataset_for_file(notes["id"], "C1") is None
    assert len(bot.slack.messages("C1")) == 1  # export's report; nothing about the notes


# --- 3. the right thread ---------------------------------------------------------------------


def test_file_shared_winning_the_race_still_answers_in_the_thread(fast_bot):
    bot = fast_bot
    parent = "1700000000.000100"
    file = bot.slack.add_file(training_file(20), name="support.jsonl", thread_ts=parent)
    bot.slack.lag_file(file["id"], no_shares=1000)  # Slack never lists the share in time
    bot.event(file_shared_event(file), event_id="Ev1")
    later(0.5, lambda: bot.event(file_share_message_event(file), event_id="Ev2")).join()
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report["thread_ts"] == parent


def test_a_share_slack_never_lists_is_answered_at_the_top_after_the_wait(make_bot):
    bot = make_bot(file_wait_seconds=1.0)
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.slack.lag_file(file["id"], no_shares=1000)
    bot.event(file_shared_event(file), event_id="Ev1")
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report.get("thread_ts") is None


# --- 4. a second channel ---------------------------------------------------------------------


def test_a_file_shared_into_a_second_channel_gets_its_own_dataset_and_report(bot):
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.event(file_share_message_event(file), event_id="Ev1")
    bot.event(file_shared_event(file), event_id="Ev2")
    bot.wait_idle(60)
    again = bot.slack.share_file(file["id"], "C2")
    event = file_share_message_event(again)
    event["channel"], event["ts"] = "C2", share_ts(again, "C2")
    bot.event(event, event_id="Ev3")
    shared = file_shared_event(again)
    shared["channel_id"] = "C2"
    bot.event(shared, event_id="Ev4")
    bot.wait_idle(60)

    assert len(reports(bot, "C1")) == 1
    [report] = reports(bot, "C2")
    assert report["thread_ts"] == share_ts(again, "C2")
    first, second = (bot.store.dataset_for_file(file["id"], c) for c in ("C1", "C2"))
    assert first.id != second.id and first.sha256 == second.sha256  # the bytes, stored once
    _, body = bot.command("estimate", channel_id="C2")
    assert second.id in body["text"] and "No dataset" not in body["text"]


def test_a_reshared_file_can_point_to_its_report_instead(make_bot):
    bot = make_bot(reshared_files="pointer")
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.event(file_share_message_event(file), event_id="Ev1")
    bot.wait_idle(60)
    downloads = len([c for c in bot.slack.calls if "/files-pri/" in (c.path or "")])
    again = bot.slack.share_file(file["id"], "C2")
    event = file_share_message_event(again)
    event["channel"], event["ts"] = "C2", share_ts(again, "C2")
    bot.event(event, event_id="Ev2")
    bot.wait_idle(60)

    [pointer] = bot.slack.messages("C2")
    assert "was checked before: 20 examples, 20 valid" in pointer["text"]
    assert "C1" not in pointer["text"]  # names no other channel
    assert pointer["thread_ts"] == share_ts(again, "C2")
    assert len([c for c in bot.slack.calls if "/files-pri/" in (c.path or "")]) == downloads
    _, body = bot.command("estimate", channel_id="C2")
    assert "d2" in body["text"]


# --- the window runs out ---------------------------------------------------------------------


def test_a_file_that_never_becomes_readable_is_told_once_after_the_wait(make_bot):
    bot = make_bot(file_wait_seconds=1.5)
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.slack.lag_file(file["id"], not_found=10_000)
    stub = file_share_message_event(file)
    stub["files"] = [{"id": file["id"], "mode": "file_access", "file_access": "check_file_info"}]
    bot.event(file_shared_event(file), event_id="Ev1")
    bot.event(stub, event_id="Ev2")
    bot.wait_idle(60)
    [told] = bot.slack.messages("C1")
    assert "Slack still could not find it 1.5 s after it was shared" in told["text"]
    assert told["thread_ts"] == share_ts(file)
    assert 2 <= info_calls(bot, file["id"]) <= 2 * 8  # backed off, not hammered
    assert bot.store.dataset_for_file(file["id"], "C1") is None

    # A normal drop afterwards works.
    other = bot.slack.add_file(training_file(12), name="other.jsonl")
    bot.event(file_share_message_event(other), event_id="Ev3")
    bot.wait_idle(60)
    assert len(reports(bot, name="other.jsonl")) == 1


# --- 5. silence for what is not ours ---------------------------------------------------------


def test_nothing_is_said_about_deleted_hidden_or_non_training_files(bot):
    deleted = bot.slack.add_file(training_file(5), name="old.jsonl")
    bot.slack.delete_file(deleted["id"])
    bot.event(file_shared_event(deleted), event_id="Ev1")

    image = bot.slack.add_file(PNG, name="chart.png")
    bot.event(file_share_message_event(image), event_id="Ev2")
    bot.event(file_shared_event(image), event_id="Ev3")

    for i, mode in enumerate(("tombstone", "hidden_by_limit")):
        gone = bot.slack.add_file(training_file(5), name=f"{mode}.jsonl")
        event = file_share_message_event(gone)
        event["files"] = [{"id": gone["id"], "mode": mode}]
        bot.event(event, event_id=f"Ev{4 + i}")

    doc = bot.slack.add_file(b"%PDF-1.7\n", name="plan.pdf")
    bot.event(file_shared_event(doc), event_id="Ev6")
    bot.wait_idle(60)

    assert bot.slack.messages() == []
    assert bot.store.datasets(channel="C1") == []
    assert not [c for c in bot.slack.calls if "/files-pri/" in (c.path or "")]  # none downloaded

    good = bot.slack.add_file(training_file(12), name="support.jsonl")
    bot.event(file_share_message_event(good), event_id="Ev7")
    bot.wait_idle(60)
    assert len(reports(bot)) == 1


# --- found by an attack review (each was a bug, now fixed) ---------------------------------


def test_an_image_the_message_event_names_is_not_told_about_after_the_wait(make_bot):
    """file_shared wins the race while files.info cannot see the file; the message
    event then says it is a PNG. That verdict reaches the waiting ingest, which stops
    asking and says nothing (it used to wait out the window and then ask the channel
    to share a picture again)."""
    bot = make_bot(file_wait_seconds=1.5)
    image = bot.slack.add_file(PNG, name="chart.png")
    bot.slack.lag_file(image["id"], not_found=10_000)
    bot.event(file_shared_event(image), event_id="Ev1")
    time.sleep(0.2)
    bot.event(file_share_message_event(image), event_id="Ev2")
    bot.wait_idle(60)
    assert [m["text"] for m in bot.slack.messages("C1")] == []
    assert info_calls(bot, image["id"]) <= 1  # the message event said what it is


def test_a_file_deleted_before_the_bot_downloads_it_is_silent(bot):
    """The message event arrives (late, retried, or resumed after a restart) after the
    file was deleted: the download's 404 is checked with files.info, which says
    file_deleted, and nothing is said (it used to post "Slack answered HTTP 404")."""
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    event = file_share_message_event(file)  # as Slack sent it, before the deletion
    bot.slack.delete_file(file["id"])
    bot.event(event, event_id="Ev1")
    bot.wait_idle(60)
    assert [m["text"] for m in bot.slack.messages("C1")] == []


def test_a_rate_limited_files_info_does_not_lose_the_file_for_good(bot):
    """files.info rate limited past the SDK's retries is asked again within the wait;
    a file Slack never describes is not marked seen, so the message event can still
    complete it (it used to be marked seen as if it were not training data, and lost)."""
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    for _ in range(4):  # the SDK retries three times, then raises `ratelimited`
        bot.slack.rate_limit_next("files.info", retry_after=0)
    bot.event(file_shared_event(file), event_id="Ev1")
    bot.wait_idle(60)
    bot.event(file_share_message_event(file), event_id="Ev2")
    bot.wait_idle(60)
    assert len(reports(bot)) == 1, (
        f"seen={bot.store.seen('file:' + file['id'] + ':C1')}, "
        f"datasets={bot.store.datasets(channel='C1')}, messages={bot.slack.messages('C1')}"
    )
    assert reports(bot)[0]["thread_ts"] == share_ts(file)


def _fill_the_long_pool(bot) -> dict:
    """One ingest that waits (files.info never finds the file) holds the only slot."""
    blocker = bot.slack.add_file(training_file(5), name="blocker.jsonl")
    bot.slack.lag_file(blocker["id"], not_found=10_000)
    bot.event(file_shared_event(blocker), event_id="EvBlock")
    deadline = time.monotonic() + 10
    while not info_calls(bot, blocker["id"]):
        assert time.monotonic() < deadline, "the blocking ingest never asked files.info"
        time.sleep(0.02)
    return blocker


def test_the_busy_notice_does_not_ping_from_a_file_name(make_bot):
    """The "busy" notice escapes the file name like every other message: a member who
    names a file `<@U0VICTIM>.jsonl` and floods the bot cannot make it ping anyone."""
    bot = make_bot(job_threads=1, job_queue=0, file_wait_seconds=2.0)
    _fill_the_long_pool(bot)
    named = bot.slack.add_file(training_file(5), name="<@U0VICTIM> <#C0SECRET>.jsonl")
    bot.event(file_share_message_event(named), event_id="Ev1")
    bot.wait_idle(60)
    [busy] = [m for m in bot.slack.messages("C1") if "busy" in m["text"]]
    assert "<@U0VICTIM>" not in busy["text"]
    assert "<#C0SECRET>" not in busy["text"]
    for block in busy.get("blocks") or []:
        assert "<@U0VICTIM>" not in str(block)


def test_the_busy_notice_for_a_stub_does_not_say_none(make_bot):
    """A Slack Connect stub has no name: the busy notice says "A file shared here",
    not "None"."""
    bot = make_bot(job_threads=1, job_queue=0, file_wait_seconds=2.0)
    _fill_the_long_pool(bot)
    file = bot.slack.add_file(training_file(5), name="support.jsonl")
    event = file_share_message_event(file)
    event["files"] = [{"id": file["id"], "mode": "file_access", "file_access": "check_file_info"}]
    bot.event(event, event_id="Ev1")
    bot.wait_idle(60)
    [busy] = [m for m in bot.slack.messages("C1") if "busy" in m["text"]]
    assert "None" not in busy["text"]


# --- guarantees the attack review pinned ------------------------------------------------------


def test_guarantee_many_concurrent_deliveries_give_one_report_and_one_download(bot):
    """both events, many deliveries each (distinct event ids), all at once on
    many threads: one dataset, one report, one download, at most one files.info."""
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    start = threading.Barrier(16)

    def send(i: int) -> None:
        event = file_share_message_event(file) if i % 2 else file_shared_event(file)
        start.wait()
        bot.event(event, event_id=f"Ev{i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report["thread_ts"] == share_ts(file)
    assert len(bot.store.datasets(channel="C1")) == 1
    assert downloads(bot, file["id"]) == 1
    assert info_calls(bot, file["id"]) <= 1
    assert bot.store.pending_work() == []


def test_guarantee_a_file_in_a_channel_not_served_is_not_touched(make_bot):
    """TUNEBOT_CHANNELS=C1; a file shared (or re-shared from C1) into C9:
    no files.info, no download, no message, no dataset, in either mode."""
    bot = make_bot(channels=("C1",), reshared_files="pointer")
    file = bot.slack.add_file(training_file(20), name="support.jsonl")
    bot.event(file_share_message_event(file), event_id="Ev1")
    bot.wait_idle(60)
    before = (info_calls(bot, file["id"]), downloads(bot))
    again = bot.slack.share_file(file["id"], "C9")
    event = file_share_message_event(again)
    event["channel"], event["ts"] = "C9", share_ts(again, "C9")
    shared = file_shared_event(again)
    shared["channel_id"] = "C9"
    bot.event(event, event_id="Ev2")
    bot.event(shared, event_id="Ev3")
    bot.wait_idle(60)
    assert bot.slack.messages("C9") == []
    assert bot.store.datasets(channel="C9") == []
    assert (info_calls(bot, file["id"]), downloads(bot)) == before


def test_guarantee_a_file_object_pointing_elsewhere_gets_no_token_and_no_path(bot):
    """an event's file object whose link is not a Slack file host is refused
    before any byte is sent; the words name no server path and nothing is stored."""
    file = bot.slack.add_file(training_file(5), name="<!channel>.jsonl")
    event = file_share_message_event(file)
    event["files"][0]["url_private"] = "https://evil.example/steal"
    event["files"][0]["url_private_download"] = "https://evil.example/steal"
    bot.event(event, event_id="Ev1")
    bot.wait_idle(60)
    [told] = bot.slack.messages("C1")
    assert "not a Slack file link" in told["text"]
    assert "<!channel>" not in told["text"] and "&lt;!channel&gt;" in told["text"]
    assert str(bot.settings.home) not in told["text"] and "Traceback" not in told["text"]
    assert downloads(bot) == 0 and stored_blobs(bot) == []


def test_guarantee_nothing_is_stored_for_a_sniffed_file_that_is_not_json(bot):
    """an unnamed text file whose first bytes are not JSON: no blob, no
    dataset, no message (the rest of it is never read)."""
    notes = bot.slack.add_file(b"meeting notes\n" * 1000, name="notes", filetype="text")
    bot.event(file_shared_event(notes), event_id="Ev1")
    bot.event(file_share_message_event(notes), event_id="Ev2")
    bot.wait_idle(60)
    assert bot.slack.messages("C1") == []
    assert bot.store.datasets(channel="C1") == []
    assert stored_blobs(bot) == []


def test_guarantee_no_wait_tells_once_without_hammering(make_bot):
    """file_wait_seconds=0: a file files.info never finds is asked about
    once and told once (no busy loop), and a normal drop still gets its report."""
    bot = make_bot(file_wait_seconds=0.0)
    lost = bot.slack.add_file(training_file(5), name="lost.jsonl")
    bot.slack.lag_file(lost["id"], not_found=10_000)
    bot.event(file_shared_event(lost), event_id="Ev1")
    bot.wait_idle(60)
    assert info_calls(bot, lost["id"]) == 1
    assert len(bot.slack.messages("C1")) == 1
    good = bot.slack.add_file(training_file(12), name="support.jsonl")
    bot.event(file_share_message_event(good), event_id="Ev2")
    bot.event(file_shared_event(good), event_id="Ev3")
    bot.wait_idle(60)
    [report] = reports(bot)
    assert report["thread_ts"] == share_ts(good)


def test_an_unexpected_error_is_answered_in_the_thread_learned_while_waiting(fast_bot, monkeypatch):
    """file_shared (no thread) starts the ingest; the message event names the thread
    while it waits; a failure after that is answered there, once, in words."""
    bot = fast_bot
    parent = "1700000000.000200"
    file = bot.slack.add_file(training_file(20), name="support.jsonl", thread_ts=parent)
    bot.slack.lag_file(file["id"], not_found=3, no_shares=1000)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire at /srv/secret/path")

    monkeypatch.setattr(bot.workflow.datasets, "register", broken)
    bot.event(file_shared_event(file), event_id="Ev1")
    later(0.3, lambda: bot.event(file_share_message_event(file), event_id="Ev2")).join()
    bot.wait_idle(60)
    [told] = bot.slack.messages("C1")
    assert told["thread_ts"] == parent
    assert "Something went wrong while checking file" in told["text"]
    assert "/srv" not in told["text"] and "Traceback" not in told["text"]
