"""A channel member's text in the newest commands (provider=together, download,
migrate) reaches Slack inert: no `<@U…>`, `<!channel>` or link survives into any
message or block. Signed HTTP into the real Bolt app, the Together fake, SQLite on disk."""

from __future__ import annotations

import json

from tests.bot.test_runs import request, upload
from tests.bot.test_together_runs import together_bot, together_fake

__all__ = ["together_bot", "together_fake"]  # the fixtures, used by name

HOSTILE = ("<@UBOSS>", "<!channel>", "<!here>", "<http://evil.example|x>")


def everything_sent(bot) -> str:
    calls = bot.slack.calls_to("chat.postMessage") + bot.slack.calls_to("chat.update")
    calls += bot.slack.calls_to("chat.postEphemeral")
    return json.dumps([c.params for c in calls])


def test_markup_in_a_together_model_a_download_and_a_migrate_pings_nobody(together_bot):
    bot = together_bot()
    upload(bot)
    answers = []
    for bad in HOSTILE:
        answers.append(request(bot, f"train provider=together model={bad}-8B-Instruct"))
        answers.append(bot.command(f"download {bad}", user_id="UR")[1])
        answers.append(bot.command(f"download r1 {bad}", user_id="UR")[1])
        answers.append(bot.command(f"migrate {bad} provider=together", user_id="UR")[1])
        answers.append(bot.command(f"migrate r1 provider={bad}", user_id="UR")[1])
        answers.append(bot.command(f"migrate r1 provider=local model={bad}", user_id="UR")[1])
    bot.wait_idle()
    seen = json.dumps(answers) + everything_sent(bot)
    for bad in HOSTILE:
        where = seen.find(bad)
        assert where < 0, (bad, seen[max(where - 300, 0) : where + 100])
    assert "&lt;@UBOSS&gt;" in seen  # it was shown, made inert
