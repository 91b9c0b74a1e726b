"""After OpenAI's fine-tuning cutoff: new OpenAI runs refused with the alternatives named,
and `/finetune migrate` moving a finished run to another provider, compared on the
same held-out set."""

from __future__ import annotations

import datetime as dt
import html
import json
import time

import pytest

from bot.errors import UserError
from bot.evaluation import _embedder
from bot.migrate import differences, map_hyperparameters
from bot.retirement import alternatives, cutoff_refusal, local_available
from tests.bot.test_runs import click, request, texts, upload
from tests.fakes.openai_api import MESSAGE_OVERHEAD
from tests.fakes.together_api import FakeTogether, limits_for
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)
from tests.trainers.test_providers import GOOD
from trainers.evaluate import ANSWER_MAX_TOKENS, examples_from_file, score, split_file
from trainers.pricing import PriceTable
from trainers.providers import load
from trainers.tokens import tiktoken_encoding

FAST = {"lr": 1e-2, "grad_accum": 1, "max_length": 128}  # as the local-run tests train


def tick_until(bot, run_id: str, statuses, timeout: float = 420.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        if bot.store.get_run(run_id).status in statuses:
            return bot.store.get_run(run_id)
        time.sleep(0.5)
    raise AssertionError(f"{run_id} stayed {bot.store.get_run(run_id).status}")


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
    built_in = alternatives({}, local=False, together_key=False, environ={})
    assert built_in == ["together (Together AI, TOGETHER_API_KEY not set)"]
    assert alternatives({}, local=True, together_key=True, environ={}) == [
        "local (LoRA on this machine's GPUs)",
        "together (Together AI, TOGETHER_API_KEY set)",
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
    assert (
        "on local (LoRA on this machine's GPUs), together (Together AI, TOGETHER_API_KEY " in text
    )
    assert "acme (openai-compatible, ACME_API_KEY " in text
    assert "tog (together, TOGETHER_API_KEY " in text
    assert "`/finetune migrate <run> provider=<name>`" in text
    assert bot.store.find_run("r2") is None and len(bot.store.runs(limit=None)) == 1
    assert not [t for t in texts(bot) if "r2" in t]
    assert len(bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True)) == 0


# --- the hyperparameter mapping ---------------------------------------------------------


def test_openai_hyperparameters_map_to_local_and_together_and_list_what_cannot():
    openai_plan = {
        "provider": "openai", "model": "gpt-4o-mini-2024-07-18", "epochs": 3,
        "epochs_auto": True, "lr_mult": 2.0, "batch": 8, "suffix": "support",
    }  # fmt: skip
    local = map_hyperparameters(openai_plan, "local")
    assert local.options == {"epochs": "3", "batch": "8"}
    assert local.carried == ("epochs 3 (its auto choice) → epochs=3", "batch 8 → batch=8")
    assert [name for name, _, _ in local.dropped] == ["lr_mult", "suffix"]
    together = map_hyperparameters(openai_plan, "together")  # Together names its model by it
    assert together.options == {"epochs": "3", "batch": "8", "suffix": "support"}
    assert [name for name, _, _ in together.dropped] == ["lr_mult"]
    on_together = differences(openai_plan, {"provider": "together", "kind": "together"}, together)
    assert on_together[1].endswith("; Together AI uses its default learning rate")
    again = map_hyperparameters(openai_plan, "openai")
    assert again.options == {"epochs": "3", "batch": "8", "lr_mult": "2.0", "suffix": "support"}
    assert again.dropped == ()

    new_local = {
        "provider": "local",
        "model": "smollm2",
        "lr": 2e-4,
        "batch": 8,
        "r": 16,
        "alpha": 32,
    }
    lines = differences(openai_plan, new_local, local)
    assert lines[0].startswith("base model gpt-4o-mini-2024-07-18 (openai) → smollm2 (local)")
    assert lines[1] == (
        "lr_mult 2.0 not carried: OpenAI's learning-rate multiplier scales a base rate OpenAI "
        "does not publish, so it has no absolute learning rate to carry; the new run trains "
        "at lr=0.0002"
    )
    assert lines[2].startswith("suffix support not carried: a suffix names a hosted fine-tuned")
    assert lines[3] == "trains a LoRA adapter (rank 16, alpha 32) on this machine's GPUs"

    local_plan = {
        "provider": "local", "model": "m", "epochs": 2, "lr": 1e-3, "batch": 4, "r": 8,
        "alpha": 16, "targets": "all-linear", "max_length": 2048, "qlora": True, "merge": False,
    }  # fmt: skip
    to_openai = map_hyperparameters(local_plan, "openai")
    assert to_openai.options == {"epochs": "2", "batch": "4"}
    assert [n for n, _, _ in to_openai.dropped] == [
        "lr", "r", "alpha", "targets", "max_length", "qlora",
    ]  # fmt: skip
    to_together = map_hyperparameters(local_plan, "together")
    assert to_together.options == {
        "epochs": "2",
        "batch": "4",
        "lr": "0.001",
        "r": "8",
        "alpha": "16",
    }
    # From Together: a full fine-tune stays one there, and says why it cannot elsewhere;
    # Together's float alpha is a count locally.
    full = {
        "provider": "together", "kind": "together", "model": "Qwen/Qwen3-8B", "epochs": 2,
        "lora": False, "lr": 1e-5, "batch": 8, "r": None, "alpha": None, "dropout": None,
        "suffix": "support",
    }  # fmt: skip
    assert map_hyperparameters(full, "together").options == {
        "epochs": "2", "batch": "8", "lr": "1e-05", "lora": "false", "suffix": "support",
    }  # fmt: skip
    full_local = map_hyperparameters(full, "local")
    assert [n for n, _, _ in full_local.dropped] == ["suffix", "lora"]
    assert full_local.dropped[1][2] == (
        "only Together chooses between a LoRA adapter and training every weight"
    )
    adapter = {**full, "lora": True, "r": 16, "alpha": 32.0, "dropout": 0.05}
    from_together = map_hyperparameters(adapter, "local")
    assert from_together.options == {
        "epochs": "2", "batch": "8", "lr": "1e-05", "r": "16", "alpha": "32",
    }  # fmt: skip
    assert [n for n, _, _ in from_together.dropped] == ["suffix", "dropout"]  # lora: the default
    assert map_hyperparameters(adapter, "together").options["lora_dropout"] == "0.05"
    with pytest.raises(ValueError, match="no hyperparameter mapping to 'ray'"):
        map_hyperparameters(local_plan, "ray")


# --- /finetune migrate --------------------------------------------------------------------


def test_migrate_refuses_unfinished_runs_other_channels_unknown_providers_forgotten_data(
    paid_bot,
):
    bot = paid_bot(judge_model="", channels=("C1", "C2"))
    upload(bot)
    request(bot, "train provider=openai")  # r1, waiting for approval
    _, body = bot.command("migrate r1 provider=local", user_id="UR")
    assert body["text"] == (
        "⚠️ r1 is pending approval: only a succeeded run can be migrated (its model is what "
        "the new one is compared with)."
    )
    _, body = bot.command("migrate r1 provider=local", user_id="UR", channel_id="C2")
    assert "No run `r1` in this channel" in body["text"]
    _, body = bot.command("migrate r1 provider=local", user_id="UR", channel_id="C3")
    assert "tunebot does not serve this channel" in body["text"]
    _, body = bot.command("migrate", user_id="UR")
    assert "Name the run, e.g. `r3`" in body["text"]

    succeeded = succeeded_run_after(bot, "r1")
    assert succeeded.status == "succeeded"
    _, body = bot.command("migrate r1 provider=local", user_id="UX")  # a member, not UR
    assert body["text"] == (
        "⚠️ Only <@UR> or an approver can migrate r1: it is paid for from the team's budget."
    )
    _, body = bot.command("migrate r1 provider=azure", user_id="UR")
    assert body["text"] == (
        "⚠️ No provider `azure` here: `provider=` takes local, openai, together "
        "(`/finetune providers` lists them)."
    )
    _, body = bot.command("migrate r1", user_id="UR")
    assert "Name where to train: `provider=` one of local, openai, together." in body["text"]
    _, body = bot.command("forget d1", user_id="UA")
    assert "d1 is forgotten" in body["text"]
    bot.wait_idle()
    _, body = bot.command("migrate r1 provider=local", user_id="UR")
    assert "d1 was forgotten on" in body["text"]
    assert len(bot.store.runs(limit=None)) == 1  # nothing was recorded by any refusal
    shown = " ".join(texts(bot))
    assert "Traceback" not in shown


def succeeded_run_after(bot, run_id: str):
    """Approve `run_id` and poll it to the end on the OpenAI fake; its evaluation done."""
    click(bot, "UA", "approve_run", run_id)
    bot.wait_idle()
    for _ in range(30):
        bot.workflow.runs.poll_all()
        bot.wait_idle()
        if bot.store.get_run(run_id).status in ("succeeded", "failed"):
            break
    bot.wait_idle()
    return bot.store.get_run(run_id)


@pytest.mark.skipif(not local_available(), reason="local training needs the [local] extra")
def test_an_openai_run_migrated_to_local_trains_on_the_same_split_and_is_compared(
    paid_bot,
    tiny,  # noqa: F811 (the session fixture)
):
    bot = paid_bot(
        judge_model="",
        local_base_model=str(tiny.model),
        model_dirs=(str(tiny.root),),
    )
    bot.workflow.runs.local_overrides.update(FAST)
    upload(bot)
    request(bot, "train provider=openai model=gpt-4o-mini batch=8")
    old = succeeded_run_after(bot, "r1")
    assert old.status == "succeeded", old.error
    tuned = old.result_json["fine_tuned_model"]
    assert tuned.startswith("ft:gpt-4o-mini-2024-07-18")
    jobs_before = len(bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True))
    chats_before = len(bot.openai.chat_calls())

    _, body = bot.command("migrate r1 provider=local", user_id="UR")
    assert body["text"] == (
        "Migrating r1 to local: r2 accepted: it goes to the local GPU queue (see d1's thread). "
        "The plan lists what carries over and what differs."
    )
    bot.wait_idle()
    new = bot.store.get_run("r2")
    plan = new.plan_json
    assert new.provider == "local" and new.model == str(tiny.model)
    assert (
        plan["migrated_from"] == "r1" and plan["dataset_sha256"] == old.plan_json["dataset_sha256"]
    )
    assert plan["epochs"] == old.plan_json["epochs"] and plan["batch"] == 8
    assert plan["split"] == old.plan_json["split"]
    assert new.result_json["data"] == old.result_json["data"]  # the same held-out set
    accepted = [t for t in texts(bot) if t.startswith("r2 accepted")]
    assert len(accepted) == 1
    assert (
        f"epochs {old.plan_json['epochs']} (its auto choice) → epochs={plan['epochs']}"
        in (accepted[0])
    )
    assert "batch 8 → batch=8" in accepted[0] and "Migrates r1" in accepted[0]
    assert "• Differs: base model gpt-4o-mini-2024-07-18 (openai) →" in accepted[0]

    new = tick_until(bot, "r2", ("succeeded", "failed"))
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    assert len(bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True)) == jobs_before

    # The old model answered each held-out prompt once more, on the OpenAI fake.
    examples = examples_from_file(bot.workflow.blobs.path(new.result_json["data"]["eval_sha256"]))
    asked = [json.loads(c.body) for c in bot.openai.chat_calls()[chats_before:]]
    assert sorted(a["messages"][-1]["content"] for a in asked if a["model"] == tuned) == sorted(
        e.prompt[-1]["content"] for e in examples
    )
    old_answers = [f"[{tuned}] {e.prompt[-1]['content']}" for e in examples]  # the fake's echo
    record = bot.store.get_run("r2").result_json["migration"]
    assert [r["old"] for r in record["rows"]] == old_answers
    new_answers = [r["new"] for r in record["rows"]]
    # r2's adapter answered once, in its own evaluation; the comparison took those answers.
    (evaluated,) = bot.store.evals("r2")
    assert new_answers == [r["tuned"] for r in evaluated.rows_json["rows"]]
    assert record["answers_from"] == {"old": "asked", "new": "its evaluation"}

    # The numbers in the thread, computed again from the answers.
    result = score(examples, old_answers, new_answers, embedder=_embedder())
    s = result.summary()
    kept = s.tuned / s.base
    encoding = tiktoken_encoding("o200k_base")
    n = len(examples)
    tokens_in = round(sum(len(encoding.encode(e.prompt_text)) for e in examples) / n * 1000)
    tokens_out = round(sum(len(encoding.encode(e.reference)) for e in examples) / n * 1000)
    price = PriceTable().resolve("gpt-4o-mini")
    old_usd = (tokens_in * price.ft_input_per_1m + tokens_out * price.ft_output_per_1m) / 1e6
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted == (
        f"r2 vs r1 on the same {n} held-out examples: r2 keeps {kept:.0%} of r1's quality "
        f"({result.primary} {s.tuned:.3f} vs {s.base:.3f}); per example it wins {result.wins}, "
        f"ties {result.ties}, loses {result.losses}.\n"
        f"1,000 calls like these: r1 `{tuned}` ${old_usd:,.2f}; r2 `model + LoRA r2` "
        "$0 hosted cost (it runs on your own GPUs)."
    )
    assert result.wins + result.ties + result.losses + result.undecided == n == 5
    assert str(tiny.root) not in posted  # a folder model by its name, no server path
    # Asking the old model was reserved and settled through the spend gate.
    entry = [
        e
        for e in bot.workflow.runs.gate.ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        if e.ref == "r2:compare"
    ]
    assert len(entry) == 1 and entry[0].status == "settled"
    assert entry[0].actual_usd == pytest.approx(record["cost_usd"]) and record["cost_usd"] > 0

    # After 2027-01-14 the old model no longer serves: its stored answers stand in.
    chats = len(bot.openai.chat_calls())
    bot.workflow.runs.clock = Clock(dt.date(2027, 1, 20))
    bot.workflow.runs.migrations.compare("r2")
    assert len(bot.openai.chat_calls()) == chats  # nothing asked of a retired model
    again = bot.store.get_run("r2").result_json["migration"]
    assert again["answers_from"] == {"old": "its evaluation", "new": "its evaluation"}
    assert [r["old"] for r in again["rows"]] == old_answers  # r1's evaluation stored them
    assert again["notes"] == [
        "r1's model stopped serving on 2027-01-14, so its answers are the ones stored by "
        "its own evaluation"
    ]
    later = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert len(later) == 2 and later[1].endswith(
        "Note: r1's model stopped serving on 2027-01-14, so its answers are the ones stored "
        "by its own evaluation."
    )


def test_a_migration_to_a_paid_model_waits_for_approval_then_is_compared(paid_bot, tmp_path):
    bot = paid_bot(judge_model="")
    upload(bot)
    request(bot, "train provider=openai model=gpt-4o-mini batch=8")
    old = succeeded_run_after(bot, "r1")
    assert old.status == "succeeded"
    # r1's recorded split is another than today's rule would make (as for a run split
    # before a change of seed): the migration must take r1's, not make its own.
    blobs = bot.workflow.blobs
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    info = split_file(
        blobs.path(old.plan_json["dataset_sha256"]), train, held,
        fraction=old.plan_json["split"], seed=7,
    )  # fmt: skip
    recorded = {
        "train_sha256": blobs.put_file(train),
        "eval_sha256": blobs.put_file(held),
        "split": info.to_dict(),
    }
    assert recorded["eval_sha256"] != old.result_json["data"]["eval_sha256"]
    data = {**old.result_json["data"], **recorded}
    bot.store.update_run("r1", result_json={**old.result_json, "data": data})
    planner = bot.workflow.runs.planner
    planner.clock = Clock(dt.date(2027, 1, 6))  # after the cutoff: refused, nothing recorded
    _, body = bot.command("migrate r1 provider=openai model=gpt-4.1-mini", user_id="UR")
    assert html.unescape(body["text"]).startswith(
        "⚠️ OpenAI creates no new fine-tuning jobs since 2027-01-06;"
    )
    assert bot.store.find_run("r2") is None

    planner.clock = Clock(dt.date(2026, 12, 1))
    _, body = bot.command("migrate r1 provider=openai model=gpt-4.1-mini", user_id="UR")
    assert body["text"].startswith("Migrating r1 to openai: r2 needs approval")
    bot.wait_idle()
    new = bot.store.get_run("r2")
    assert new.status == "pending_approval" and new.plan_json["migrated_from"] == "r1"
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == new.card_ts)["text"]
    epochs = old.plan_json["epochs"]
    assert (
        f"Carried over: epochs {epochs} (its auto choice) → epochs={epochs}; batch 8 → batch=8"
        in card
    )
    model = PriceTable().resolve("gpt-4.1-mini")
    assert f"• Differs: base model gpt-4o-mini-2024-07-18 (openai) → {model.name} (openai)" in card
    assert new.result_json["data"] == data  # r1's split, held-out set and training file

    click(bot, "UA", "approve_run", "r2")
    bot.wait_idle()
    creates = bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True)
    assert len(creates) == 2
    training_file = json.loads(creates[1].body)["training_file"]
    assert bot.openai.contents[training_file] == train.read_bytes()
    hyper = json.loads(creates[1].body)["method"]["supervised"]["hyperparameters"]
    assert hyper["n_epochs"] == epochs and hyper["batch_size"] == 8
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=60)
    assert new.status == "succeeded", new.error
    bot.wait_idle()
    record = bot.store.get_run("r2").result_json["migration"]
    examples = examples_from_file(bot.workflow.blobs.path(new.result_json["data"]["eval_sha256"]))
    old_tuned, new_tuned = old.result_json["fine_tuned_model"], new.result_json["fine_tuned_model"]
    old_answers = [f"[{old_tuned}] {e.prompt[-1]['content']}" for e in examples]
    new_answers = [f"[{new_tuned}] {e.prompt[-1]['content']}" for e in examples]
    assert [r["old"] for r in record["rows"]] == old_answers
    assert [r["new"] for r in record["rows"]] == new_answers
    result = score(examples, old_answers, new_answers, embedder=_embedder())
    s = result.summary()
    encoding = tiktoken_encoding("o200k_base")
    n = len(examples)
    tokens_in = round(sum(len(encoding.encode(e.prompt_text)) for e in examples) / n * 1000)
    tokens_out = round(sum(len(encoding.encode(e.reference)) for e in examples) / n * 1000)

    def usd(price):
        return (tokens_in * price.ft_input_per_1m + tokens_out * price.ft_output_per_1m) / 1e6

    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted == (
        f"r2 vs r1 on the same {n} held-out examples: r2 keeps {s.tuned / s.base:.0%} of r1's "
        f"quality ({result.primary} {s.tuned:.3f} vs {s.base:.3f}); per example it wins "
        f"{result.wins}, ties {result.ties}, loses {result.losses}.\n"
        f"1,000 calls like these: r1 `{old_tuned}` "
        f"${usd(PriceTable().resolve('gpt-4o-mini')):,.2f}; r2 `{new_tuned}` ${usd(model):,.2f}."
    )


TOGETHER_MODEL = "Qwen/Qwen3-8B"
TOGETHER_PRICES = {
    "together": {
        "read": "2026-11-30",
        "source": "a test's own table",
        "sizes": [
            {"up_to_billions": 16, "lora_per_1m": 1.0, "full_per_1m": 2.0, "inference_per_1m": 0.5}
        ],
    }
}


@pytest.fixture
def together_fake():
    with FakeTogether(api_key="tg-test") as fake:
        yield fake


def test_an_openai_run_migrated_to_together_trains_there_and_is_compared(
    paid_bot, together_fake, tmp_path
):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(TOGETHER_PRICES))
    bot = paid_bot(
        judge_model="",
        together_api_key="tg-test",
        together_base_url=together_fake.base_url,
        prices_file=prices,
    )
    upload(bot)
    request(bot, "train provider=openai model=gpt-4o-mini batch=8 lr_mult=2 suffix=support")
    old = succeeded_run_after(bot, "r1")
    assert old.status == "succeeded", old.error
    old_tuned = old.result_json["fine_tuned_model"]
    openai_chats = len(bot.openai.chat_calls())
    assert openai_chats == 2 * old.result_json["data"]["split"]["eval"]  # r1's own evaluation
    assert together_fake.calls == []

    _, body = bot.command(f"migrate r1 provider=together model={TOGETHER_MODEL}", user_id="UR")
    assert body["text"].startswith("Migrating r1 to together: r2 needs approval"), body
    bot.wait_idle()
    new = bot.store.get_run("r2")
    assert (new.status, new.provider, new.model) == ("pending_approval", "together", TOGETHER_MODEL)
    assert new.plan_json["migrated_from"] == "r1"
    assert new.result_json["data"] == old.result_json["data"]  # r1's split and held-out set
    epochs = old.plan_json["epochs"]
    card = next(m for m in bot.slack.messages(channel="C1") if m["ts"] == new.card_ts)["text"]
    assert (
        f"Carried over: epochs {epochs} (its auto choice) → epochs={epochs}; batch 8 → batch=8; "
        "suffix support → suffix=support" in card
    )
    assert "lr_mult 2.0 not carried" in card and "Together AI uses its default" in card
    assert together_fake.calls == []  # nothing leaves before the approval

    click(bot, "UA", "approve_run", "r2")
    bot.wait_idle()
    new = tick_until(bot, "r2", ("succeeded", "failed"), timeout=120)
    assert new.status == "succeeded", new.error
    bot.wait_idle()

    # Together trained r1's recorded training file with the mapped hyperparameters.
    (create,) = together_fake.calls_to("POST", "/v1/fine-tunes", exact=True)
    sent = json.loads(create.body)
    assert (sent["model"], sent["n_epochs"], sent["batch_size"]) == (TOGETHER_MODEL, epochs, 8)
    assert sent["suffix"] == "support"
    assert sent["learning_rate"] == 1e-5  # lr_mult was not carried: the together SDK's default
    rank = limits_for(TOGETHER_MODEL)["lora_training"]["default_rank"]  # no rank was carried
    lora = sent["training_type"]
    assert (lora["type"], lora["lora_r"], lora["lora_alpha"]) == ("Lora", rank, 2 * rank)
    (job,) = together_fake.jobs()
    blobs = bot.workflow.blobs
    trained = blobs.path(old.result_json["data"]["train_sha256"]).read_bytes()
    assert together_fake.contents[sent["training_file"]] == trained
    assert len(together_fake.calls_to("POST", "/v1/fine-tunes", exact=True)) == 1
    assert len(bot.openai.calls_to("POST", "/fine_tuning/jobs", exact=True)) == 1

    # The comparison asked r1's model on OpenAI and r2's on Together, each prompt once.
    new_tuned = new.result_json["fine_tuned_model"]
    assert new_tuned == job["model_output_name"]
    examples = examples_from_file(blobs.path(new.result_json["data"]["eval_sha256"]))
    n = len(examples)
    prompts = sorted(e.prompt[-1]["content"] for e in examples)
    asked_openai = [json.loads(c.body) for c in bot.openai.chat_calls()[openai_chats:]]
    assert len(asked_openai) == n and {a["model"] for a in asked_openai} == {old_tuned}
    assert sorted(a["messages"][-1]["content"] for a in asked_openai) == prompts
    asked = [
        json.loads(c.body)
        for c in together_fake.calls_to("POST", "/v1/chat/completions", exact=True)
    ]
    # r2's own evaluation asks its base and its tuned model; the comparison reuses the tuned
    # answers it got (same held-out lines, same order) instead of paying for them again.
    assert n == 5 and len(asked_openai) == 5 and len(asked) == 10 == 2 * n
    assert sum(a["model"] == TOGETHER_MODEL for a in asked) == n
    tuned_asked = [a["messages"][-1]["content"] for a in asked if a["model"] == new_tuned]
    assert sorted(tuned_asked) == prompts
    (evaluated,) = bot.store.evals("r2")
    assert evaluated.summary_json["examples"] == n

    record = bot.store.get_run("r2").result_json["migration"]
    old_answers = [f"[{old_tuned}] {e.prompt[-1]['content']}" for e in examples]  # the fakes' echo
    new_answers = [f"[{new_tuned}] {e.prompt[-1]['content']}" for e in examples]
    assert [r["old"] for r in record["rows"]] == old_answers
    assert [r["new"] for r in record["rows"]] == new_answers

    # The numbers in the thread, computed again from the fakes' answers and the price files.
    result = score(examples, old_answers, new_answers, embedder=_embedder())
    s = result.summary()
    encoding = tiktoken_encoding("o200k_base")
    tokens_in = round(sum(len(encoding.encode(e.prompt_text)) for e in examples) / n * 1000)
    tokens_out = round(sum(len(encoding.encode(e.reference)) for e in examples) / n * 1000)
    openai_price = PriceTable().resolve("gpt-4o-mini")
    old_usd = (
        tokens_in * openai_price.ft_input_per_1m + tokens_out * openai_price.ft_output_per_1m
    ) / 1e6
    new_usd = (tokens_in + tokens_out) * 0.5 / 1e6  # inference_per_1m of the 8B size
    (posted,) = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert posted == (
        f"r2 vs r1 on the same {n} held-out examples: r2 keeps {s.tuned / s.base:.0%} of r1's "
        f"quality ({result.primary} {s.tuned:.3f} vs {s.base:.3f}); per example it wins "
        f"{result.wins}, ties {result.ties}, loses {result.losses}.\n"
        f"1,000 calls like these: r1 `{old_tuned}` ${old_usd:,.2f}; r2 `{new_tuned}` "
        f"${new_usd:,.2f}."
    )
    assert record["per_1k_calls_usd"] == pytest.approx({"old": old_usd, "new": new_usd})

    assert record["answers_from"] == {"old": "asked", "new": "its evaluation"}
    assert record["notes"] == []

    # Only r1's answers were paid by the comparison: reserved through the spend gate (every
    # answer at its token limit, r1's model alone), settled at their cost.
    def reserved(entries):
        return [e for e in entries if e.ref == "r2:compare"]

    ledger = bot.workflow.runs.gate.ledger
    (entry,) = reserved(ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    tokens_in_max = sum(len(e.prompt_text) for e in examples) // 4 + 1
    tokens_out_max = n * ANSWER_MAX_TOKENS
    assert entry.estimate_usd == pytest.approx(
        (
            tokens_in_max * openai_price.ft_input_per_1m
            + tokens_out_max * openai_price.ft_output_per_1m
        )
        / 1e6
    )
    paid = sum(  # the OpenAI fake counts words: MESSAGE_OVERHEAD + each message's, its echo's
        sum(MESSAGE_OVERHEAD + len(m["content"].split()) for m in a["messages"])
        * openai_price.ft_input_per_1m
        + len(f"[{old_tuned}] {a['messages'][-1]['content']}".split())
        * openai_price.ft_output_per_1m
        for a in asked_openai
    )
    assert entry.status == "settled" and entry.actual_usd == pytest.approx(record["cost_usd"])
    assert record["cost_usd"] == pytest.approx(paid / 1e6) and record["cost_usd"] > 0

    # r2's data now names another held-out file (as if re-split): its evaluation's answers
    # are not for these examples, so the comparison asks r2's model again and says so.
    blobs = bot.workflow.blobs
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    split_file(
        blobs.path(new.plan_json["dataset_sha256"]), train, held,
        fraction=new.plan_json["split"], seed=7,
    )  # fmt: skip
    other = {**new.result_json["data"], "eval_sha256": blobs.put_file(held)}
    bot.store.update_run("r2", result_json={**bot.store.get_run("r2").result_json, "data": other})
    resplit = examples_from_file(held)
    # The same line numbers (an index is a line of the held-out file), other examples.
    assert [e.index for e in resplit] == [e.index for e in examples]
    assert [e.prompt for e in resplit] != [e.prompt for e in examples]
    bot.workflow.runs.migrations.compare("r2")
    chats = together_fake.calls_to("POST", "/v1/chat/completions", exact=True)
    assert len(chats) == 10 + len(resplit)
    again = [json.loads(c.body) for c in chats[10:]]
    assert {a["model"] for a in again} == {new_tuned}
    assert sorted(a["messages"][-1]["content"] for a in again) == sorted(
        e.prompt[-1]["content"] for e in resplit
    )
    assert len(bot.openai.chat_calls()) == openai_chats + n + len(resplit)
    record = bot.store.get_run("r2").result_json["migration"]
    assert record["answers_from"] == {"old": "asked", "new": "asked"}
    assert record["notes"] == [
        "r2's own evaluation was not on these held-out examples, so its model was asked again"
    ]
    later = [t for t in texts(bot) if t.startswith("r2 vs r1")]
    assert len(later) == 2 and later[1].endswith(
        "Note: r2's own evaluation was not on these held-out examples, so its model was "
        "asked again."
    )
    second = reserved(ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    assert len(second) == 2 and second[1].estimate_usd > second[0].estimate_usd  # both asked

    # Once r1's model no longer serves, its stored answers stand in only for the examples
    # they answered: line numbers 1-5 of another held-out file are other examples.
    bot.workflow.runs.clock = Clock(dt.date(2027, 1, 20))
    with pytest.raises(UserError) as refused:
        bot.workflow.runs.migrations.compare("r2")
    assert refused.value.summary == (
        "r1's model no longer serves and no stored evaluation of it was made on this held-out "
        "set, so there is nothing to compare with."
    )
    assert len(together_fake.calls_to("POST", "/v1/chat/completions", exact=True)) == 15
    assert len(bot.openai.chat_calls()) == openai_chats + 10
    assert len(reserved(ledger.entries(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))) == 2
    shown = "\n".join(texts(bot))
    assert "Traceback" not in shown and str(tmp_path) not in shown


def test_a_migration_to_together_without_an_inference_price_is_refused_up_front(
    paid_bot, together_fake
):
    bot = paid_bot(
        judge_model="", together_api_key="tg-test", together_base_url=together_fake.base_url
    )
    upload(bot)
    request(bot, "train provider=openai model=gpt-4o-mini")
    assert succeeded_run_after(bot, "r1").status == "succeeded"
    _, body = bot.command(f"migrate r1 provider=together model={TOGETHER_MODEL}", user_id="UR")
    assert body["text"] == (
        f"⚠️ {TOGETHER_MODEL} has no inference price on Together AI in tunebot's price table, "
        "so the comparison after training cannot be priced; add inference_per_1m for its "
        "size to TUNEBOT_PRICES' together.sizes, then ask again."
    )
    bot.wait_idle()
    assert bot.store.find_run("r2") is None and together_fake.calls == []


def test_a_model_id_a_provider_sends_pings_nobody_in_the_comparison():
    """A host's fine-tuned model id is its text, not tunebot's: `<@U…>` or `<!channel>`
    in it reaches Slack inert."""
    from types import SimpleNamespace

    from bot.migrate import comparison

    old = SimpleNamespace(id="r1", provider="acme")
    new = SimpleNamespace(id="r2", provider="together")
    record = {
        "kept": 0.9, "win_tie_loss": {"win": 1, "tie": 0, "loss": 0}, "primary": "exact",
        "new": 0.9, "old": 1.0, "examples": 1, "notes": [],
        "per_1k_calls_usd": {"old": 1.0, "new": 2.0},
    }  # fmt: skip
    message = comparison(new, old, "ft:<@UBOSS>", "x-<!channel>", record)
    for text in (message.text, json.dumps(message.blocks)):
        assert "<@UBOSS>" not in text and "<!channel>" not in text
    assert "`ft:&lt;@UBOSS&gt;`" in message.text and "`x-&lt;!channel&gt;`" in message.text
