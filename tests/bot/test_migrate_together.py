"""`/finetune migrate` from a Together run, through signed HTTP into the real Bolt app:
to another Together base model and to a local LoRA adapter (the tiny test model), with
Together's real SDK and the openai SDK pointed at the local fakes. Counts are exact."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from bot.evaluation import _embedder
from bot.retirement import local_available
from tests.bot.test_migrate import FAST, TOGETHER_PRICES, tick_until
from tests.bot.test_runs import click, request, texts, upload
from tests.fakes.together_api import FakeTogether
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)
from trainers.evaluate import examples_from_file, score
from trainers.tokens import tiktoken_encoding

QWEN = "Qwen/Qwen3-8B"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
CHAT = "/v1/chat/completions"
TRAIN = (
    f"train provider=together model={QWEN} epochs=2 batch_size=8 learning_rate=0.0002 "
    "lora_r=16 lora_alpha=32 lora_dropout=0.05 suffix=support"
)


@pytest.fixture
def together_fake():
    with FakeTogether(api_key="tg-test") as fake:
        yield fake


@pytest.fixture
def together_paid_bot(paid_bot, together_fake, tmp_path):
    """A bot with OpenAI's fake, Together's fake and a Together inference price
    ($0.50 per 1M tokens up to 16B), approvers UA and UB; no LLM judge."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(TOGETHER_PRICES))

    def start(**overrides):
        bot = paid_bot(
            **{
                "judge_model": "",
                "together_api_key": "tg-test",
                "together_base_url": together_fake.base_url,
                "prices_file": prices,
                **overrides,
            }
        )
        bot.together = together_fake
        return bot

    return start


def chats(fake) -> list[dict]:
    """The bodies of the chat completions Together's fake answered, in order."""
    return [json.loads(c.body) for c in fake.calls_to("POST", CHAT, exact=True)]


def together_r1(bot):
    """r1 on Together (Qwen3-8B, LoRA r 16, alpha 32, dropout 0.05, 2 epochs, batch 8,
    lr 2e-4, suffix support), approved by UA, polled to success; its evaluation done."""
    upload(bot)
    body = request(bot, TRAIN)
    assert body["text"].startswith("r1 needs approval"), body
    assert click(bot, "UA", "approve_run", "r1") == 200
    bot.wait_idle()
    old = tick_until(bot, "r1", ("succeeded", "failed"), timeout=120)
    assert old.status == "succeeded", old.error
    bot.wait_idle()
    return bot.store.get_run("r1")


def per_1k(examples) -> float:
    """USD of 1,000 calls like `examples` at $0.50 per 1M tokens (TOGETHER_PRICES)."""
    encoding = tiktoken_encoding("o200k_base")
    n = len(examples)
    tokens_in = round(sum(len(encoding.encode(e.prompt_text)) for e in examples) / n * 1000)
    tokens_out = round(sum(len(encoding.encode(e.reference)) for e in examples) / n * 1000)
    return (tokens_in + tokens_out) * 0.5 / 1e6


def test_a_together_run_migrated_to_another_together_model_is_compared(together_paid_bot):
    bot = together_paid_bot()
    fake = bot.together
    old = together_r1(bot)
    old_tuned = old.result_json["fine_tuned_model"]
    n = old.result_json["data"]["split"]["eval"]
    assert n == 5
    assert len(chats(fake)) == 2 * n  # r1's own evaluation: its base and its tuned model
    (first_upload,) = fake.calls_to("POST", "/v1/files", exact=True)
    (first_create,) = fake.calls_to("POST", "/v1/fine-tunes", exact=True)
    r1_file = json.loads(first_create.body)["training_file"]

    _, body = bot.command(f"migrate r1 provider=together model={LLAMA}", user_id="UR")
    assert body["text"].startswith("Migrating r1 to together: r2 needs approval"), body
    bot.wait_idle()
    new = bot.store.get_run("r2")
    assert (new.status, new.provider, new.model) == ("pending_approval", "together", LLAMA)
    assert new.plan_json["migrated_from"] == "r1"
    assert new.result_json["data"] == old.result_json["data"]  # r1's split and held-out set
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == new.card_ts)["text"]
    assert (
        "Carried over: epochs 2 → epochs=2; batch 8 → batch=8; lr 0.0002 → lr=0.0002; "
        "r 16 → r=16; alpha 32 → alpha=32; dropout 0.05 → lora_dropout=0.05; "
        "suffix support → suffix=support" in card
    )
    assert f"• Differs: base model {QWEN} (together) → {LLAMA} (together)" in card
    # Nothing left for Together before the approval, and nothing was asked of any model.
    assert len(fake.calls_to("POST", "/v1/files", exact=True)) == 1
    assert len(fake.calls_to("POST", "/v1/fine-tunes", exact=True)) == 1
    assert len(chats(fake)) == 2 * n

    assert click(bot, "UR", "approve_run", "r2") == 200  # not on one's own request
    bot.wait_idle()
    assert bot.store.get_run("r2").status == "pending_approval"
    assert click(bot, "UA", "approve_run", "r2") == 200
    bot.wait_idle()
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=120)
    assert new.status == "succeeded", new.error
    bot.wait_idle()

    # Together trained r1's recorded training file, byte for byte, with r1's settings.
    uploads = fake.calls_to("POST", "/v1/files", exact=True)
    creates = fake.calls_to("POST", "/v1/fine-tunes", exact=True)
    assert len(uploads) == 2 and len(creates) == 2 and len(fake.jobs()) == 2
    sent = json.loads(creates[1].body)
    assert (sent["model"], sent["n_epochs"], sent["batch_size"]) == (LLAMA, 2, 8)
    assert sent["learning_rate"] == 2e-4 and sent["suffix"] == "support"
    lora = sent["training_type"]
    assert (lora["type"], lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"]) == (
        "Lora",
        16,
        32,
        0.05,
    )
    recorded = bot.workflow.blobs.path(old.result_json["data"]["train_sha256"]).read_bytes()
    assert fake.contents[sent["training_file"]] == recorded == fake.contents[r1_file]
    assert first_upload.status == uploads[0].status
    assert bot.openai.calls == []  # OpenAI was never asked anything

    # Chat calls: r2's evaluation asked its base and tuned model once each per example;
    # the comparison asked r1's tuned model (it still serves) and reused r2's answers.
    new_tuned = new.result_json["fine_tuned_model"]
    assert new_tuned != old_tuned
    asked = chats(fake)[2 * n :]
    assert len(asked) == 3 * n
    by_model = {m: sum(a["model"] == m for a in asked) for m in {a["model"] for a in asked}}
    assert by_model == {LLAMA: n, new_tuned: n, old_tuned: n}
    examples = examples_from_file(bot.workflow.blobs.path(new.result_json["data"]["eval_sha256"]))
    prompts = sorted(e.prompt[-1]["content"] for e in examples)
    for model in (LLAMA, new_tuned, old_tuned):
        assert sorted(a["messages"][-1]["content"] for a in asked if a["model"] == model) == (
            prompts
        )

    record = bot.store.get_run("r2").result_json["migration"]
    assert record["answers_from"] == {"old": "asked", "new": "its evaluation"}
    old_answers = [f"[{old_tuned}] {e.prompt[-1]['content']}" for e in examples]  # the echo
    new_answers = [f"[{new_tuned}] {e.prompt[-1]['content']}" for e in examples]
    assert [r["old"] for r in record["rows"]] == old_answers
    assert [r["new"] for r in record["rows"]] == new_answers
    result = score(examples, old_answers, new_answers, embedder=_embedder())
    s = result.summary()
    usd = per_1k(examples)  # both 8B models: the same rate
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted == (
        f"r2 vs r1 on the same {n} held-out examples: r2 keeps {s.tuned / s.base:.0%} of r1's "
        f"quality ({result.primary} {s.tuned:.3f} vs {s.base:.3f}); per example it wins "
        f"{result.wins}, ties {result.ties}, loses {result.losses}.\n"
        f"1,000 calls like these: r1 `{old_tuned}` ${usd:,.2f}; r2 `{new_tuned}` ${usd:,.2f}."
    )
    assert result.wins + result.ties + result.losses + result.undecided == n

    # r1's answers alone were reserved and paid, at Together's inference rate.
    (entry,) = [
        e
        for e in bot.workflow.runs.gate.ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        if e.ref == "r2:compare"
    ]
    words = sum(  # the fake's count: 3 a message plus one a word, in and out
        sum(3 + len(m["content"].split()) for m in a["messages"])
        + len(f"[{old_tuned}] {a['messages'][-1]['content']}".split())
        for a in asked
        if a["model"] == old_tuned
    )
    assert record["cost_usd"] == pytest.approx(words * 0.5 / 1e6)
    assert entry.status == "settled" and entry.actual_usd == pytest.approx(record["cost_usd"])
    shown = "\n".join(texts(bot))
    assert "Traceback" not in shown and "/tmp" not in shown


@pytest.mark.skipif(not local_available(), reason="local training needs the [local] extra")
def test_a_together_run_migrated_to_local_trains_on_the_same_split_and_is_compared(
    together_paid_bot,
    tiny,  # noqa: F811 (the session fixture)
):
    bot = together_paid_bot(local_base_model=str(tiny.model), model_dirs=(str(tiny.root),))
    bot.workflow.runs.local_overrides.update(FAST)
    fake = bot.together
    old = together_r1(bot)
    old_tuned = old.result_json["fine_tuned_model"]
    n = old.result_json["data"]["split"]["eval"]
    assert len(chats(fake)) == 2 * n

    _, body = bot.command("migrate r1 provider=local", user_id="UR")
    assert body["text"] == (
        "Migrating r1 to local: r2 accepted: it goes to the local GPU queue (see d1's thread). "
        "The plan lists what carries over and what differs."
    )
    bot.wait_idle()
    new = bot.store.get_run("r2")
    plan = new.plan_json
    assert (new.provider, new.model, plan["migrated_from"]) == ("local", str(tiny.model), "r1")
    assert (plan["epochs"], plan["batch"], plan["r"], plan["alpha"]) == (2, 8, 16, 32)
    assert plan["lr"] == 2e-4  # carried; the test's FAST settings override it at launch
    assert new.result_json["data"] == old.result_json["data"]
    (accepted,) = [t for t in texts(bot) if t.startswith("r2 accepted")]
    assert "r 16 → r=16" in accepted and "alpha 32 → alpha=32" in accepted
    assert "suffix support not carried" in accepted and "dropout 0.05 not carried" in accepted

    new = tick_until(bot, "r2", ("succeeded", "failed"))
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    # The local run trained on r1's recorded training file.
    assert new.result_json["data"]["train_sha256"] == old.result_json["data"]["train_sha256"]
    assert len(fake.calls_to("POST", "/v1/files", exact=True)) == 1
    assert len(fake.calls_to("POST", "/v1/fine-tunes", exact=True)) == 1
    assert bot.openai.calls == []

    # Together was asked r1's tuned model once per held-out example, nothing else; r2's
    # answers are its evaluation's.
    asked = chats(fake)[2 * n :]
    assert len(asked) == n and {a["model"] for a in asked} == {old_tuned}
    record = bot.store.get_run("r2").result_json["migration"]
    assert record["answers_from"] == {"old": "asked", "new": "its evaluation"}
    (evaluated,) = bot.store.evals("r2")
    assert [r["new"] for r in record["rows"]] == [r["tuned"] for r in evaluated.rows_json["rows"]]
    examples = examples_from_file(bot.workflow.blobs.path(new.result_json["data"]["eval_sha256"]))
    old_answers = [f"[{old_tuned}] {e.prompt[-1]['content']}" for e in examples]
    assert [r["old"] for r in record["rows"]] == old_answers
    result = score(examples, old_answers, [r["new"] for r in record["rows"]], embedder=_embedder())
    s = result.summary()
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted == (
        f"r2 vs r1 on the same {n} held-out examples: r2 keeps {s.tuned / s.base:.0%} of r1's "
        f"quality ({result.primary} {s.tuned:.3f} vs {s.base:.3f}); per example it wins "
        f"{result.wins}, ties {result.ties}, loses {result.losses}.\n"
        f"1,000 calls like these: r1 `{old_tuned}` ${per_1k(examples):,.2f}; r2 "
        "`model + LoRA r2` $0 hosted cost (it runs on your own GPUs)."
    )
    assert str(tiny.root) not in posted


# --- a hostile channel ------------------------------------------------------------------


def test_twenty_simultaneous_migrations_make_one_run(together_paid_bot):
    bot = together_paid_bot()
    fake = bot.together
    together_r1(bot)
    calls_before = len(fake.calls)
    ask = f"migrate r1 provider=together model={LLAMA}"
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: bot.command(ask, user_id="UR"), range(20)))
    bot.wait_idle()
    assert [code for code, _ in answers] == [200] * 20
    said = [body["text"] for _, body in answers]
    accepted = [t for t in said if t.startswith("Migrating r1 to together: r2 needs approval")]
    assert len(accepted) == 1, said
    refused = [t for t in said if t not in accepted]
    assert len(refused) == 19
    for text in refused:
        assert text in {
            f"⚠️ r1 is already being migrated to together (`{LLAMA}`) as r2 ({status}); "
            "`/finetune cancel r2` first to ask again."
            for status in ("being recorded", "pending approval")
        }, text
    assert [r.id for r in bot.store.runs(limit=None)] in (["r1", "r2"], ["r2", "r1"])
    assert len([t for t in texts(bot) if t.startswith("*r2* requested by")]) == 1
    assert len(fake.calls) == calls_before  # nothing reached Together before an approval

    # Another member may not migrate UR's run; an approver may, but not approve it.
    _, body = bot.command(f"migrate r1 provider=together model={QWEN}", user_id="UX")
    assert body["text"] == (
        "⚠️ Only <@UR> or an approver can migrate r1: it is paid for from the team's budget."
    )
    # Once r2 is cancelled, r1 may be migrated there again: r3.
    _, body = bot.command("cancel r2", user_id="UR")
    bot.wait_idle()
    assert bot.store.get_run("r2").status == "cancelled"
    _, body = bot.command(ask, user_id="UA")
    assert body["text"].startswith("Migrating r1 to together: r3 needs approval"), body
    bot.wait_idle()
    assert bot.store.get_run("r3").requested_by == "UA"
    assert click(bot, "UA", "approve_run", "r3") == 200  # one's own request: refused
    bot.wait_idle()
    assert bot.store.get_run("r3").status == "pending_approval"
    # Nothing was uploaded or trained for r2 or r3 (r2's cancel may look for its uploads).
    assert [(c.method, c.path) for c in fake.calls if c.method == "POST"] == [
        (c.method, c.path) for c in fake.calls[:calls_before] if c.method == "POST"
    ]


def test_only_a_succeeded_run_of_this_channel_migrates(together_paid_bot):
    bot = together_paid_bot(channels=("C1", "C2"))
    fake = bot.together
    upload(bot)
    request(bot, TRAIN)  # r1: cancelled before its approval
    assert bot.command("cancel r1", user_id="UR")[0] == 200
    request(bot, TRAIN)  # r2: Together fails it
    fake.fail_next_job = "the training data could not be tokenized"
    click(bot, "UA", "approve_run", "r2")
    bot.wait_idle()
    assert tick_until(bot, "r2", ("failed",), timeout=60).status == "failed"
    request(bot, TRAIN)  # r3: running on Together
    click(bot, "UA", "approve_run", "r3")
    bot.wait_idle()
    assert tick_until(bot, "r3", ("running",), timeout=60).status == "running"
    posts = [(c.method, c.path) for c in fake.calls if c.method == "POST"]
    assert posts.count(("POST", "/v1/fine-tunes")) == 2  # r2 and r3; r1 never left
    for run_id, status in (("r1", "cancelled"), ("r2", "failed"), ("r3", "running")):
        _, body = bot.command(f"migrate {run_id} provider=local", user_id="UR")
        assert body["text"] == (
            f"⚠️ {run_id} is {status}: only a succeeded run can be migrated (its model is "
            "what the new one is compared with)."
        )
        _, body = bot.command(f"migrate {run_id} provider=local", user_id="UR", channel_id="C2")
        assert f"No run `{run_id}` in this channel" in body["text"]
    bot.wait_idle()
    assert len(bot.store.runs(limit=None)) == 3  # no migration was recorded
    assert [(c.method, c.path) for c in fake.calls if c.method == "POST"] == posts


@pytest.mark.parametrize(
    ("ask", "recorded"),
    [
        ("migrate r1 provider=together model=<@UBOSS>-8B", True),  # an 8B name: a card
        ("migrate r1 provider=together model=<!channel>", False),
        ("migrate r1 provider=<!here> model=x", False),
        ("migrate r1 provider=together model=<https://evil.example|Qwen3-8B>", True),
        ("migrate r1 provider=local model=<@UBOSS>", False),
    ],
)
def test_markup_in_a_migration_reaches_slack_inert(together_paid_bot, ask, recorded):
    bot = together_paid_bot()
    together_r1(bot)
    posts = len(bot.slack.calls_to("chat.postMessage"))
    updates = len(bot.slack.calls_to("chat.update"))
    calls = len(bot.together.calls)
    _, body = bot.command(ask, user_id="UR")
    bot.wait_idle()
    text = body["text"]
    assert "Traceback" not in text, text
    assert text.startswith("Migrating r1" if recorded else "⚠️ "), text
    assert (bot.store.find_run("r2") is not None) == recorded
    shown = [json.dumps(body)] + [
        json.dumps(c.params)
        for c in bot.slack.calls_to("chat.postMessage")[posts:]
        + bot.slack.calls_to("chat.update")[updates:]
    ]
    assert len(shown) == (4 if recorded else 1)  # the ack; the card and 2 approvers' DMs
    for markup in ("<@UBOSS>", "<!channel>", "<!here>", "<https://evil"):
        assert not [s for s in shown if markup in s], markup
    assert len(bot.together.calls) == calls  # nothing left for Together


def test_without_its_own_evaluation_the_new_model_is_asked_by_the_comparison(
    together_paid_bot,
):
    # Every evaluation above $0 needs an approval: after a run, none starts by itself.
    bot = together_paid_bot(eval_approval_above_usd=0.0)
    fake = bot.together
    old = together_r1(bot)
    assert chats(fake) == [] and bot.store.evals("r1") == []
    (note,) = [t for t in texts(bot) if t.startswith("r1: its evaluation would cost about")]
    _, body = bot.command(f"migrate r1 provider=together model={LLAMA}", user_id="UR")
    assert body["text"].startswith("Migrating r1 to together: r2 needs approval"), body
    bot.wait_idle()
    assert click(bot, "UA", "approve_run", "r2") == 200
    bot.wait_idle()
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=120)
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    assert bot.store.evals("r2") == []
    # The comparison asked both tuned models itself, each held-out prompt once.
    n = new.result_json["data"]["split"]["eval"]
    asked = chats(fake)
    old_tuned, new_tuned = old.result_json["fine_tuned_model"], new.result_json["fine_tuned_model"]
    assert len(asked) == 2 * n
    assert sum(a["model"] == old_tuned for a in asked) == n
    assert sum(a["model"] == new_tuned for a in asked) == n
    record = bot.store.get_run("r2").result_json["migration"]
    assert record["answers_from"] == {"old": "asked", "new": "asked"}
    assert record["notes"] == []  # nothing to explain: r2 was never evaluated
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert f"on the same {n} held-out examples" in posted and "Note:" not in posted
    # Both were reserved (each answer at its token limit) and settled at what they cost.
    (entry,) = [
        e
        for e in bot.workflow.runs.gate.ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        if e.ref == "r2:compare"
    ]
    assert entry.status == "settled" and entry.actual_usd == pytest.approx(record["cost_usd"])
    words = sum(
        sum(3 + len(m["content"].split()) for m in a["messages"])
        + len(f"[{a['model']}] {a['messages'][-1]['content']}".split())
        for a in asked
    )
    assert record["cost_usd"] == pytest.approx(words * 0.5 / 1e6)
    assert note


def test_failed_answers_in_its_evaluation_are_asked_again_and_said(together_paid_bot):
    bot = together_paid_bot()
    fake = bot.together
    old = together_r1(bot)
    n = old.result_json["data"]["split"]["eval"]
    assert len(chats(fake)) == 2 * n
    bot.command(f"migrate r1 provider=together model={LLAMA}", user_id="UR")
    bot.wait_idle()
    # r2's evaluation asks its base model first, then its tuned one: the next n + 1 chat
    # calls are refused (400 is not retried), so one tuned answer of its evaluation fails.
    fake.inject("POST", CHAT, 400, times=n + 1, exact=True)
    assert click(bot, "UA", "approve_run", "r2") == 200
    bot.wait_idle()
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=120)
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    (evaluated,) = bot.store.evals("r2")
    assert sum(1 for r in evaluated.rows_json["rows"] if r["tuned_error"]) == 1
    new_tuned = new.result_json["fine_tuned_model"]
    asked = chats(fake)[2 * n :]
    assert len(asked) == 2 * n + 2 * n  # its evaluation; then r1 and r2 in the comparison
    compared = asked[2 * n :]
    assert sum(a["model"] == new_tuned for a in compared) == n
    assert sum(a["model"] == old.result_json["fine_tuned_model"] for a in compared) == n
    record = bot.store.get_run("r2").result_json["migration"]
    assert record["answers_from"] == {"old": "asked", "new": "asked"}
    assert record["notes"] == [
        "1 of r2's answers in its own evaluation failed, so its model was asked again"
    ]
    examples = examples_from_file(bot.workflow.blobs.path(new.result_json["data"]["eval_sha256"]))
    assert [r["new"] for r in record["rows"]] == [
        f"[{new_tuned}] {e.prompt[-1]['content']}" for e in examples
    ]
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted.endswith(
        "Note: 1 of r2's answers in its own evaluation failed, so its model was asked again."
    )


def test_a_restart_during_the_evaluation_the_comparison_waits_on_still_compares(
    together_paid_bot,
):
    """The bot dies after r2 succeeded, in the evaluation its comparison waits on (its
    reservation open, the comparison not made). The new process on the same home tells
    the thread and makes the comparison, once; a second restart makes nothing more."""
    from tests.bot.test_paid_guarantees import polling, wait_for

    bot = together_paid_bot()
    fake = bot.together
    old = together_r1(bot)
    _, body = bot.command(f"migrate r1 provider=together model={LLAMA}", user_id="UR")
    assert body["text"].startswith("Migrating r1 to together: r2 needs approval"), body
    bot.wait_idle()
    assert click(bot, "UA", "approve_run", "r2") == 200
    bot.wait_idle()
    bot.workflow.runs.on_success.clear()  # the process dies in r2's hooks: none ends
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=120)
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    gate = bot.workflow.runs.gate
    gate.reserve("eval", "r2", 0.01, what="An evaluation of r2", run_id="r2", channel="C1")
    asked_before = len(chats(fake))

    again = together_paid_bot()  # the same home, a new process: recover() at start
    with polling(again, 0.2):
        wait_for(lambda: [t for t in texts(again) if t.startswith("r2 vs r1")], what="compare")
    assert again.store.get_run("r2").result_json["migration"]["from"] == "r1"
    (told,) = [t for t in texts(again) if "interrupted by a restart" in t]
    assert told == (
        "r2: its evaluation was interrupted by a restart of the bot (what it may have spent "
        "counts at its estimate); comparing it with r1 again now."
    ), told
    n = new.result_json["data"]["split"]["eval"]
    asked = chats(fake)[asked_before:]
    assert len(asked) == 2 * n  # each model asked each held-out prompt once
    assert sum(a["model"] == old.result_json["fine_tuned_model"] for a in asked) == n
    assert again.workflow.runs.gate.ledger.open_entries() == []

    third = together_paid_bot()  # nothing left open: nothing said or asked again
    with polling(third, 0.2):
        pass
    assert len([t for t in texts(third) if t.startswith("r2 vs r1")]) == 1
    assert len([t for t in texts(third) if "interrupted by a restart" in t]) == 1
    assert len(chats(fake)) == asked_before + 2 * n
