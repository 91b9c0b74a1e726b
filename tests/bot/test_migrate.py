"""After OpenAI's fine-tuning cutoff: new OpenAI runs refused with the alternatives named,
and `/finetune migrate` moving a finished run to another provider, compared on the
same held-out set."""

from __future__ import annotations

import datetime as dt
import html

import pytest

from bot.retirement import alternatives, cutoff_refusal, local_available
from tests.bot.test_runs import request, texts, upload
from tests.trainers.test_providers import GOOD
from trainers.providers import load


class Clock:
    def __init__(self, day: dt.date) -> None:
        self.now = dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


# --- the refusal after the cutoff ------------------------------------------------------


def test_the_refusal_names_each_alternative_and_whether_its_key_is_set(tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(GOOD)
    providers = load(path)
    env = {"ACME_API_KEY": "k"}
    assert cutoff_refusal(dt.date(2027, 1, 5), providers, local=True, environ=env) is None
    assert cutoff_refusal(dt.date(2027, 1, 6), providers, local=True, environ=env) == (
        "OpenAI creates no new fine-tuning jobs since 2027-01-06; this installation can train "
        "on local (LoRA on this machine's GPUs), acme (openai-compatible, ACME_API_KEY set) or "
        "tog (together, TOGETHER_API_KEY not set): ask again with provider=<name>, or move a "
        "finished OpenAI run with `/finetune migrate <run> provider=<name>`."
    )
    assert alternatives(providers, local=False, environ={"TOGETHER_API_KEY": "t"}) == [
        "acme (openai-compatible, ACME_API_KEY not set)",
        "tog (together, TOGETHER_API_KEY set)",
    ]
    nowhere = cutoff_refusal(dt.date(2027, 2, 1), {}, local=False, environ={})
    assert nowhere.startswith(
        "OpenAI creates no new fine-tuning jobs since 2027-01-06, and this installation has "
        "nowhere else to train: install the [local] extra or add a provider to TUNEBOT_PROVIDERS"
    )


@pytest.mark.skipif(not local_available(), reason="the [local] extra names local")
def test_a_train_after_the_cutoff_is_refused_with_the_alternatives(paid_bot, tmp_path):
    path = tmp_path / "providers.toml"
    path.write_text(GOOD)
    bot = paid_bot(providers_file=path)
    upload(bot)
    planner = bot.workflow.runs.planner
    planner.clock = Clock(dt.date(2027, 1, 5))
    assert "r1 needs approval" in request(bot, "train provider=openai")["text"]
    planner.clock = Clock(dt.date(2027, 1, 6))
    body = request(bot, "train provider=openai model=gpt-4o-mini")
    assert body["response_type"] == "ephemeral"
    text = html.unescape(body["text"])  # Slack shows &lt; as <
    assert text.startswith("⚠️ OpenAI creates no new fine-tuning jobs since 2027-01-06;")
    assert "on local (LoRA on this machine's GPUs), acme (openai-compatible, ACME_API_KEY " in text
    assert "tog (together, TOGETHER_API_KEY " in text
    assert "`/finetune migrate <run> provider=<name>`" in text
    assert bot.store.find_run("r2") is None and len(bot.store.runs(limit=None)) == 1
    assert not [t for t in texts(bot) if "r2" in t]
    assert len(bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True)) == 0
