"""`/finetune download` raced: many people asking at once, and both kinds at once.
Signed HTTP into the real Bolt app, Together's SDK at the local fake (which holds
each archive a while), SQLite on disk; the counts on the fake are exact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.bot.test_runs import request, upload
from tests.bot.test_together_runs import TRAIN, posted, succeed, together_bot, together_fake

__all__ = ["together_bot", "together_fake"]  # the fixtures, used by name

DOWNLOAD = "/v1/finetune/download"


def test_twenty_simultaneous_downloads_fetch_the_archive_once(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    succeed(bot)
    bot.wait_idle()
    bot.together.download_delay = 1.0  # the archive is held: every request meets the fetch
    users = ["UR", "UA", "UB"]
    with ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(lambda i: bot.command("download r1", user_id=users[i % 3])[1], range(20))
        )
    bot.wait_idle()
    texts = [a["text"] for a in answers]
    assert texts.count("Fetching r1's adapter from Together; its thread says when.") == 1
    assert all(
        t.startswith(
            ("Fetching r1's adapter", "r1's adapter is being fetched", "r1's adapter is already")
        )
        for t in texts
    ), texts
    assert len(bot.together.calls_to("GET", DOWNLOAD)) == 1
    assert len(posted(bot, "r1's adapter is in tunebot's home")) == 1
    assert bot.store.get_run("r1").result_json["downloads"] == {
        "adapter": "runs/r1/together/adapter"
    }


def test_the_adapter_and_the_merged_model_fetched_at_once_are_both_recorded(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN)
    succeed(bot)
    bot.wait_idle()
    bot.together.download_delay = 0.5
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(lambda a: bot.command(a, user_id="UR"), ["download r1", "download r1 merged"])
        )
    bot.wait_idle()
    assert len(bot.together.calls_to("GET", DOWNLOAD)) == 2
    assert bot.store.get_run("r1").result_json["downloads"] == {
        "adapter": "runs/r1/together/adapter",
        "merged": "runs/r1/together/merged",
    }
    for kind in ("adapter", "merged"):
        assert (bot.settings.home / "runs" / "r1" / "together" / kind).is_dir()
