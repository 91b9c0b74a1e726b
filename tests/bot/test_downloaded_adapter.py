"""After the host: a Together run's downloaded adapter, evaluated and asked on this machine.

Signed HTTP into the real Bolt app; Together's SDK at the local fake, whose
adapter archive holds a real PEFT LoRA adapter made on the tiny test model
(`adapter_files`), its config naming that model as ``tiny-org/tiny-llama``;
the model's folder under TUNEBOT_MODEL_DIRS; the local evaluation and the
chat worker run for real; SQLite on disk. Not one chat call reaches Together.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch", reason="local evaluation needs the [local] extra")
pytest.importorskip("peft", reason="local evaluation needs the [local] extra")

from tests.bot.test_paid_guarantees import EPOCH
from tests.bot.test_runs import request, texts, upload
from tests.bot.test_together_runs import TRAIN, posted, succeed, together_bot, together_fake
from tests.trainers.test_lora import tiny  # noqa: F401 (the session fixture)

__all__ = ["together_bot", "together_fake"]  # the fixtures, used by name

BASE = "tiny-org/tiny-llama"
CHATS = "/v1/chat/completions"
ADAPTER = "runs/r1/together/adapter"


@pytest.fixture(scope="module")
def adapter_files(tiny, tmp_path_factory) -> dict[str, bytes]:  # noqa: F811 (tiny)
    """A real PEFT LoRA adapter on the tiny model (random B, so tuned != base), as files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    out = tmp_path_factory.mktemp("together-adapter")
    get_peft_model(model, lora).save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": (out / "adapter_model.safetensors").read_bytes(),
    }


@pytest.fixture
def models_dir(tmp_path, tiny):  # noqa: F811 (tiny)
    """A TUNEBOT_MODEL_DIRS folder holding the tiny model as ``tiny-org/tiny-llama``."""
    root = tmp_path / "models"
    shutil.copytree(tiny.model, root / BASE)
    return root


@pytest.fixture
def finished(together_bot, adapter_files, models_dir):
    """A bot with r1, a succeeded Together LoRA run whose archive is the real adapter."""
    bots = []

    def start(*, files=None, model_dirs=None, **overrides):
        bot = together_bot(model_dirs=model_dirs or (str(models_dir),), **overrides)
        bot.together.adapter_files = adapter_files if files is None else files
        bots.append(bot)
        upload(bot)
        request(bot, TRAIN)
        succeed(bot)
        bot.wait_idle()
        return bot

    yield start
    for bot in bots:  # a chat worker must not outlive its test
        bot.workflow.runs.distiller.chat_worker.close()


def download(bot) -> None:
    _, body = bot.command("download r1", user_id="UR")
    assert body["text"] == "Fetching r1's adapter from Together; its thread says when.", body
    bot.wait_idle()
    assert bot.store.get_run("r1").result_json["downloads"] == {"adapter": ADAPTER}
    (told,) = posted(bot, "r1's adapter is in tunebot's home")
    assert told.endswith(
        '`/finetune eval r1 local` and `/finetune chat r1 local "…"` run it on this machine, '
        "with no call to Together."
    ), told


def ask(bot, command: str) -> str:
    """The ack's text for a member's /finetune (a refusal without its ⚠️)."""
    status, body = bot.command(command, user_id="UM")
    assert status == 200, body
    return body["text"].removeprefix("⚠️ ")


def together_chats(bot) -> int:
    return len(bot.together.calls_to("POST", CHATS))


def clean(text: str, bot) -> None:
    assert "Traceback" not in text and str(bot.settings.home) not in text and "/tmp" not in text


def test_a_downloaded_adapter_is_evaluated_here_at_no_hosted_cost(finished):
    bot = finished()
    text = ask(bot, "eval r1 local")
    assert text == ("r1 has no downloaded adapter: download it first with `/finetune download r1`.")
    download(bot)
    spend_before = len(bot.workflow.runs.gate.ledger.entries(EPOCH))

    text = ask(bot, "eval r1 local")  # a member: nothing is spent
    assert text == (
        f"Evaluating r1 here from its downloaded adapter on `{BASE}` (no call to Together, "
        "$0 hosted); the results go to its thread."
    ), text
    bot.wait_idle()
    run = bot.store.get_run("r1")
    held_out = run.result_json["data"]["split"]["eval"]
    (summary,) = posted(bot, "r1 evaluation:")
    assert summary.startswith(
        f"r1 evaluation: base `{BASE}` vs tuned on {held_out} held-out examples (run locally)"
    ), summary
    assert f"run locally from the downloaded adapter `{ADAPTER}` on the base `{BASE}`" in summary
    assert "evaluation cost $0.00 (offline scorers)" in summary
    clean(summary, bot)
    (stored,) = bot.store.evals("r1")
    assert stored.cost_usd == 0.0 and stored.summary_json["examples"] == held_out
    assert stored.summary_json["local"] == {"base": BASE, "adapter": ADAPTER}
    means = stored.summary_json["means"]["rouge_l"]
    assert isinstance(means["base"], float) and isinstance(means["tuned"], float)
    rows = stored.rows_json["rows"] if isinstance(stored.rows_json, dict) else stored.rows_json
    assert len(rows) == held_out
    # The same held-out split the hosted evaluation uses, and nothing hosted at all.
    assert together_chats(bot) == 0
    assert len(bot.workflow.runs.gate.ledger.entries(EPOCH)) == spend_before
    assert bot.workflow.runs.gate.ledger.open_entries() == []
    checked = list((bot.settings.home / "runs" / "r1" / "together" / "checked").iterdir())
    assert len(checked) == 1
    assert sorted(p.name for p in checked[0].iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_simultaneous_local_evaluations_of_a_run_make_one(finished):
    """Ten members ask at once while the one job thread is held by a download (the
    fake holds the archive): one evaluation is queued, the others are told it is
    going; one summary is posted."""
    bot = finished(job_threads=1, job_queue=5)
    download(bot)
    bot.together.download_delay = 2.0
    _, body = bot.command("download r1 merged", user_id="UR")
    assert body["text"].startswith("Fetching r1's merged"), body
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: ask(bot, "eval r1 local"), range(10)))
    going = "r1 is being evaluated from its downloaded adapter; its thread gets the results."
    assert sum(a.startswith("Evaluating r1 here") for a in answers) == 1, answers
    assert answers.count(going) == 9, answers
    bot.wait_idle()
    assert len(posted(bot, "r1 evaluation:")) == 1 and len(bot.store.evals("r1")) == 1
    assert together_chats(bot) == 0
    assert ask(bot, "eval r1 local").startswith("Evaluating r1 here")  # free again
    bot.wait_idle()
    assert len(posted(bot, "r1 evaluation:")) == 2


def test_a_downloaded_adapter_answers_a_chat_here(finished):
    bot = finished()
    download(bot)
    text = ask(bot, 'chat r1 local "Do you take Apple Pay?"')
    assert text == (
        "Asking r1's base and downloaded adapter here (no call to Together); the answers go "
        "to its thread."
    ), text
    bot.wait_idle()
    (answer,) = posted(bot, "r1 — prompt: Do you take Apple Pay?")
    assert f"*Base* ({BASE}):" in answer and "*Tuned*:" in answer
    assert "run locally from the downloaded adapter" in answer
    clean(answer, bot)
    assert together_chats(bot) == 0
    assert bot.workflow.runs.gate.ledger.open_entries() == []

    text = ask(bot, "chat r1 local")
    assert text.startswith("Give a prompt: `/finetune chat r1 local"), text


def test_without_the_base_on_this_machine_one_sentence_says_where_to_put_it(
    finished, adapter_files, models_dir, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = json.loads(adapter_files["adapter_config.json"])
    absent = "acme/absent-model"  # what the archive's config names: not on this machine
    files = {
        **adapter_files,
        "adapter_config.json": json.dumps({**config, "base_model_name_or_path": absent}).encode(),
    }
    bot = finished(files=files, model_dirs=(str(empty), str(models_dir)))
    download(bot)
    for command in ("eval r1 local", 'chat r1 local "hi"'):
        text = ask(bot, command)
        assert text == (
            f"No local copy of `{absent}`, r1's base model: put its folder under "
            f"TUNEBOT_MODEL_DIRS (…/empty, …/models) as `{absent}`, or pass `base=` naming a "
            "model folder there."
        ), text
    outside = tmp_path / "elsewhere"
    shutil.copytree(models_dir / BASE, outside)  # a model, but not inside the dirs
    text = ask(bot, f"eval r1 local base={outside}")
    assert text == (
        "The folder `base=` names is not a model folder inside TUNEBOT_MODEL_DIRS (after "
        "resolving links and `..`)."
    )
    assert ask(bot, "eval r1 local base=acme/other").startswith(
        "No local copy of `base=acme/other`: put its folder under TUNEBOT_MODEL_DIRS"
    )
    assert ask(bot, 'chat r1 "hi" base=x').startswith("`base=` goes with `local`")
    assert ask(bot, "eval r1 here").startswith("`here` is not understood after the run")
    bot.wait_idle()
    assert not posted(bot, "r1 evaluation:") and not posted(bot, "r1 — prompt")

    # base= names the model: by its name in the dirs, or by its full path there.
    text = ask(bot, f'chat r1 local "Do you take Apple Pay?" base={models_dir / BASE}')
    assert text.startswith("Asking r1's base and downloaded adapter here"), text
    bot.wait_idle()
    (answer,) = posted(bot, "r1 — prompt: Do you take Apple Pay?")
    assert "*Base* (…/tiny-llama):" in answer and "*Tuned*:" in answer
    clean(answer, bot)
    assert together_chats(bot) == 0


def test_a_pickled_adapter_in_the_archive_is_refused(finished, adapter_files):
    files = {
        "adapter_config.json": adapter_files["adapter_config.json"],
        "adapter_model.bin": b"\x80\x04cos\nsystem\n.",  # a pickle: never loaded
    }
    bot = finished(files=files)
    download(bot)
    text = ask(bot, "eval r1 local")
    assert text == (
        "r1's downloaded adapter is refused: it holds adapter_model.bin, a pickle file "
        "tunebot never loads (only adapter_model.safetensors is read)."
    ), text
    assert not (bot.settings.home / "runs" / "r1" / "together" / "checked").exists()


HOSTILE = [
    ({"peft_type": "PROMPT_TUNING"}, "its peft_type is `PROMPT_TUNING`, not `LORA`"),
    ({"r": 0}, "its `r` is not a whole number from 1 to 1,024"),
    ({"r": "8; rm -rf /"}, "its `r` is not a whole number from 1 to 1,024"),
    ({"r": True}, "its `r` is not a whole number from 1 to 1,024"),
    ({"lora_alpha": 10**9}, "its `lora_alpha` is not a whole number from 1 to 65,536"),
    (
        {"base_model_name_or_path": "/etc/models/x"},
        "its base_model_name_or_path is an absolute path",
    ),
    ({"base_model_name_or_path": "tiny-org/../../x"}, "its base_model_name_or_path contains `..`"),
    (
        {"base_model_name_or_path": "https://evil.example/model"},
        "its base_model_name_or_path is a URL",
    ),
    ({"base_model_name_or_path": "hf://x/y"}, "its base_model_name_or_path is a URL"),
    ({"target_modules": "(a+)+$"}, "its `target_modules` is not valid"),
    ({"target_modules": None}, "its target_modules is missing"),
    ({"rank_pattern": {".*": 8}}, "its `rank_pattern` is not valid"),
    ({"lora_dropout": 7}, "its `lora_dropout` is not valid"),
]


def test_hostile_adapter_configs_are_refused_in_one_sentence(finished, adapter_files):
    bot = finished()
    download(bot)
    folder = bot.settings.home / ADAPTER
    good = json.loads(adapter_files["adapter_config.json"])
    for change, why in HOSTILE:
        (folder / "adapter_config.json").write_text(json.dumps({**good, **change}))
        for command in ("eval r1 local", 'chat r1 local "hi"'):
            text = ask(bot, command)
            assert text == f"r1's downloaded adapter is refused: {why}.", (change, text)
    for raw, why in (
        ("[1, 2]", "its adapter_config.json is not a JSON object"),
        ("{not json", "its adapter_config.json is not valid JSON"),
        (" " * (64 * 1024 + 1), "its adapter_config.json is 65,537 bytes, more than 65,536"),
    ):
        (folder / "adapter_config.json").write_text(raw)
        text = ask(bot, "eval r1 local")
        assert text == f"r1's downloaded adapter is refused: {why}.", (raw[:20], text)
    (folder / "adapter_config.json").write_text(json.dumps(good))
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    text = ask(bot, "eval r1 local")
    assert text == (
        "r1's downloaded adapter is refused: its adapter_model.safetensors is not a "
        "safetensors file."
    )
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04.")
    text = ask(bot, "eval r1 local")
    assert "adapter_model.bin, a pickle file tunebot never loads" in text
    bot.wait_idle()
    assert not posted(bot, "r1 evaluation:") and not posted(bot, "r1 — prompt")
    assert together_chats(bot) == 0
    for text in texts(bot):
        clean(text, bot)


def test_a_full_fine_tune_is_told_local_takes_an_adapter(together_bot):
    bot = together_bot()
    upload(bot)
    request(bot, TRAIN + " lora=false")
    succeed(bot)
    bot.wait_idle()
    for command in ("eval r1 local", 'chat r1 local "hi"'):
        assert ask(bot, command) == (
            "r1 was a full fine-tune: tunebot runs a downloaded LoRA adapter locally, not full "
            "weights."
        )
    assert together_chats(bot) == 0


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_a_safetensors_header_that_does_not_fit_its_file_is_refused_in_the_ack(
    finished, adapter_files
):
    """A header naming LoRA tensors larger than the file holds (a 16 GiB claim in a
    few bytes), overlapping or with an unknown dtype is refused when asked, in one
    sentence: nothing is queued, no model is loaded, no generic failure later."""
    bot = finished()
    download(bot)
    weights = bot.settings.home / ADAPTER / "adapter_model.safetensors"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    giant = {name: {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 1 << 34]}}
    small_shape = {name: {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}
    bad_dtype = {name: {"dtype": "EVIL", "shape": [2, 2], "data_offsets": [0, 16]}}
    negative = {name: {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}
    fine = {name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    bad_metadata = {"__metadata__": {"format": 1}, **fine}
    for header in (giant, small_shape, bad_dtype, negative, bad_metadata):
        weights.write_bytes(_safetensors(header, b"\0" * 16))
        for command in ("eval r1 local", 'chat r1 local "hi"'):
            text = ask(bot, command)
            assert text == (
                "r1's downloaded adapter is refused: its adapter_model.safetensors header "
                "does not match its tensors' data."
            ), (header, text)
    weights.write_bytes(b"")  # a 0-byte file
    assert ask(bot, "eval r1 local") == (
        "r1's downloaded adapter is refused: its adapter_model.safetensors is not a "
        "safetensors file."
    )
    bot.wait_idle()
    assert not posted(bot, "r1 evaluation:") and not posted(bot, "r1 — prompt")
    assert not posted(bot, "Something went wrong")
    assert bot.store.evals("r1") == [] and together_chats(bot) == 0
    assert not (bot.settings.home / "runs" / "r1" / "together" / "checked").exists()
    for text in texts(bot):
        clean(text, bot)
