"""trainers.lora: a real LoRA run on a tiny Llama built offline, through real worker processes.

The model (2 layers, hidden 64) and its byte-level BPE tokenizer are built
from the test data at session start. Every end-to-end run is a separate
worker process started the way the bot starts it (`trainers.local.launch`),
so the runs go in parallel: an uninterrupted run, a run stopped by SIGTERM
and then resumed, and a two-rank `accelerate launch` run. Most of their time
is the import of torch + transformers + trl (about 12 s of CPU each here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from tests.conftest import ROOT
from trainers import local
from trainers.lora import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    Chat,
    LoraSpec,
    default_qlora,
    detect_family,
    flatten_content,
    latest_checkpoint,
    parse_targets,
    to_chat,
    tokenize_chat,
    training_template,
)

SYSTEM = "You are a concise support assistant."
RUN_TIMEOUT = 300.0
TEST_LR = 1e-2  # a tiny random model learns visibly in 18 steps at this rate


def chat_row(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"How do I reset device {i}?"},
            {
                "role": "assistant",
                "content": f"Hold the power button of device {i} for ten seconds.",
            },
        ]
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bpe(texts: list[str], specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Tiny:
    root: Path
    model: Path
    train: Path
    eval: Path
    tokenizer: object
    llama3_tokenizer: object


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A 2-layer Llama and a ChatML BPE tokenizer (its template has no generation markers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    rows = [chat_row(i) for i in range(32)]
    texts = [m["content"] for r in rows for m in r["messages"]]
    texts += ["system user assistant tool", "[tool result] [tool call] ok"]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = PLAIN_CHATML
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=len(fast),
        max_position_embeddings=256,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)

    llama3 = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(
            texts,
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    return Tiny(
        root=root,
        model=model_dir,
        train=write_jsonl(root / "train.jsonl", rows[:24]),
        eval=write_jsonl(root / "eval.jsonl", rows[24:]),
        tokenizer=fast,
        llama3_tokenizer=llama3,
    )


def base_spec(tiny: Tiny, out: Path, **overrides) -> dict:
    spec = {
        "run_id": out.name,
        "model": str(tiny.model),
        "train_file": str(tiny.train),
        "eval_file": str(tiny.eval),
        "output_dir": str(out),
        "epochs": 3,
        "lr": TEST_LR,
        "batch": 4,
        "grad_accum": 1,
    }
    spec.update(overrides)
    return spec


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / local.PROGRESS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["event"] == kind]


def wait_done(run_dir: Path, worker: local.Worker, timeout: float = RUN_TIMEOUT) -> dict:
    """Wait for the worker (every rank) to end; its result.json."""
    deadline = time.monotonic() + timeout
    while local.alive(worker):
        if time.monotonic() > deadline:
            local.stop(worker)
            raise AssertionError(f"worker in {run_dir} still running after {timeout} s")
        time.sleep(0.1)
    path = run_dir / local.RESULT
    assert path.exists(), f"no result.json; log tail:\n{local.log_tail(run_dir)}"
    return json.loads(path.read_text())


@dataclass
class Runs:
    full: Path  # uninterrupted, with eval and merge
    full_result: dict
    cancelled: dict  # result.json after SIGTERM
    cancelled_events: list[dict]
    resumed: Path  # the stopped run, resumed (a broken newer checkpoint beside it)
    resumed_result: dict
    broken: Path
    ddp: Path  # accelerate launch, two gloo ranks
    ddp_result: dict


@pytest.fixture(scope="session")
def runs(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Start every end-to-end run at once (two cores: they overlap their imports)."""
    root = tmp_path_factory.mktemp("runs")
    full_dir, stop_dir, ddp_dir = root / "full", root / "stopped", root / "ddp"
    started = time.monotonic()
    full = local.launch(full_dir, base_spec(tiny, full_dir, merge=True))
    stopped = local.launch(stop_dir, base_spec(tiny, stop_dir))
    ddp = local.launch(ddp_dir, base_spec(tiny, ddp_dir, eval_file=None), processes=2)
    workers = [full, stopped, ddp]

    outcome: dict = {}

    def stop_then_resume() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not events(stop_dir, "start"):  # the worker is in its training loop
            assert time.monotonic() < deadline, local.log_tail(stop_dir)
            time.sleep(0.02)
        assert local.stop(stopped)  # SIGTERM to the process group, as the bot does
        outcome["cancelled"] = wait_done(stop_dir, stopped)
        outcome["cancelled_events"] = events(stop_dir)
        checkpoint = Path(outcome["cancelled"]["checkpoint"])
        step = int(checkpoint.name.rsplit("-", 1)[1])
        broken = checkpoint.with_name(f"checkpoint-{step + 1}")  # newer, but its save "crashed"
        shutil.copytree(checkpoint, broken)
        (broken / "trainer_state.json").unlink()
        outcome["broken"] = broken
        resumed = local.launch(stop_dir, base_spec(tiny, stop_dir, resume=True))
        workers.append(resumed)
        outcome["resumed"] = wait_done(stop_dir, resumed)

    thread = threading.Thread(target=stop_then_resume, daemon=True)
    thread.start()
    try:
        full_result = wait_done(full_dir, full)
        ddp_result = wait_done(ddp_dir, ddp)
        thread.join(RUN_TIMEOUT)
        assert "resumed" in outcome, f"stop/resume did not finish:\n{local.log_tail(stop_dir)}"
        print(f"\nend-to-end worker runs: {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield Runs(
            full=full_dir,
            full_result=full_result,
            cancelled=outcome["cancelled"],
            cancelled_events=outcome["cancelled_events"],
            resumed=stop_dir,
            resumed_result=outcome["resumed"],
            broken=outcome["broken"],
            ddp=ddp_dir,
            ddp_result=ddp_result,
        )
    finally:
        for worker in workers:
            local.stop(worker)


# ---- the spec -------------------------------------------------------------------------------------


def test_import_is_cheap() -> None:
    code = "import sys, trainers.lora; print(sorted({'torch','transformers','trl','peft'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_spec_defaults_follow_the_article(tmp_path: Path) -> None:
    spec = LoraSpec(run_id="r1", model="m", train_file="t.jsonl", output_dir=str(tmp_path))
    assert (spec.epochs, spec.lr, spec.batch, spec.grad_accum, spec.warmup) == (3, 2e-4, 4, 2, 0.1)
    assert (spec.r, spec.alpha, spec.dropout, spec.targets) == (16, 32, 0.05, "all-linear")
    assert (spec.max_length, spec.qlora, spec.merge, spec.seed, spec.resume) == (
        2048,
        False,
        False,
        42,
        False,
    )
    assert spec.max_steps is None and spec.save_steps is None and spec.group_by_length is True


def test_spec_json_round_trip(tmp_path: Path) -> None:
    spec = LoraSpec(
        run_id="r1",
        model="m",
        train_file="t.jsonl",
        output_dir=str(tmp_path),
        targets="q,k,v,o",
        max_steps=5,
    )
    path = tmp_path / "spec.json"
    spec.to_json(path)
    assert json.loads(path.read_text())["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert LoraSpec.from_json(path) == spec


def test_spec_fields_carry_help() -> None:
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(LoraSpec))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lr": 0}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"batch": 0}, "batch"),
        ({"batch": 2.5}, "batch"),
        ({"grad_accum": True}, "grad_accum"),
        ({"epochs": -1}, "epochs"),
        ({"warmup": 1.5}, "warmup"),
        ({"warmup": -0.1}, "warmup"),
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "targets"),
        ({"targets": "q; drop table"}, "targets"),
        ({"targets": 7}, "targets"),
        ({"max_length": 0}, "max_length"),
        ({"qlora": "yes"}, "qlora"),
        ({"merge": 1}, "merge"),
        ({"max_steps": 0}, "max_steps"),
        ({"save_steps": -3}, "save_steps"),
        ({"seed": -1}, "seed"),
        ({"model": ""}, "model"),
        ({"eval_file": ""}, "eval_file"),
        ({"epochz": 3}, "epochz"),
    ],
)
def test_bad_spec_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    data = {"run_id": "r1", "model": "m", "train_file": "t.jsonl", "output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LoraSpec.from_dict({**data, **change})


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^train_file: required"):
        LoraSpec.from_dict({"run_id": "r1", "model": "m", "output_dir": str(tmp_path)})


def test_targets_shorthand() -> None:
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q,k,v,o") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_targets(["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert parse_targets("q, v, gate") == ("q_proj", "v_proj", "gate_proj")


def test_default_qlora_only_big_models_on_cuda() -> None:
    assert default_qlora(8e9, cuda=True)
    assert not default_qlora(1.7e9, cuda=True)
    assert not default_qlora(8e9, cuda=False)


# ---- data and the loss mask -----------------------------------------------------------------------


def test_content_parts_are_flattened() -> None:
    parts = [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "second"},
    ]
    assert flatten_content(parts) == "first\nsecond"
    assert flatten_content("plain") == "plain"
    assert flatten_content(None) == ""
    chat = to_chat(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]}
    )
    assert chat.messages[0] == {"role": "user", "content": "first\nsecond"}


def test_tool_traffic_is_context_never_learned() -> None:
    chat = to_chat(
        {
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "4 C, rain"},
                {"role": "assistant", "content": "It is 4 C and raining.", "weight": 1},
            ]
        }
    )
    roles = [m["role"] for m in chat.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == '[tool call] weather({"city": "Oslo"})'
    assert chat.messages[2]["content"] == "[tool result c1]\n4 C, rain"
    assert chat.weights == (0, 0, 0, 1)


def _masked_text(tokenizer, row: dict[str, list[int]]) -> str:
    ids = [i for i, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m]
    return tokenizer.decode(ids)


def test_loss_mask_covers_assistant_tokens_and_honours_weight_zero(tiny: Tiny) -> None:
    tok = tiny.tokenizer
    template, source = training_template(tok)
    assert source == "chatml"  # the model's own template has no generation markers
    chat = to_chat(
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "How do I reset device 1?"},
                {"role": "assistant", "content": "Hold the power button.", "weight": 0},
                {"role": "user", "content": "And device 2?"},
                {"role": "assistant", "content": "Hold the power button of device 2."},
            ]
        }
    )
    row = tokenize_chat(tok, template, chat)
    assert len(row["input_ids"]) == len(row["assistant_masks"])
    assert _masked_text(tok, row) == "Hold the power button of device 2.<|im_end|>"
    # Without weight 0 both assistant turns carry loss, and nothing else does.
    both = tokenize_chat(tok, template, Chat(chat.messages, (0, 0, 1, 0, 1)))
    assert _masked_text(tok, both) == (
        "Hold the power button.<|im_end|>Hold the power button of device 2.<|im_end|>"
    )


def test_chatml_training_template_renders_the_inference_format(tiny: Tiny) -> None:
    messages = list(to_chat(chat_row(3)).messages)
    ours = tiny.tokenizer.apply_chat_template(
        messages, chat_template=CHATML_TEMPLATE, tokenize=False
    )
    plain = tiny.tokenizer.apply_chat_template(messages, chat_template=PLAIN_CHATML, tokenize=False)
    assert ours == plain
    prompt = tiny.tokenizer.apply_chat_template(
        messages[:2], chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n") and ours.startswith(prompt)


def test_llama3_family_detected_and_masked(tiny: Tiny) -> None:
    tok = tiny.llama3_tokenizer
    assert detect_family(tok) == "llama3"
    template, source = training_template(tok)
    assert (template, source) == (LLAMA3_TEMPLATE, "llama3")
    row = tokenize_chat(tok, template, to_chat(chat_row(5)))
    assert row["input_ids"][0] == tok.bos_token_id
    assert _masked_text(tok, row) == "Hold the power button of device 5 for ten seconds.<|eot_id|>"


def test_known_model_template_uses_trl_training_variant(tiny: Tiny) -> None:
    """A model shipping Qwen2.5's exact template gets TRL's marked copy of it (default system too)."""
    import copy

    from trl.chat_template_utils import qwen2_5_chat_template

    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = qwen2_5_chat_template
    template, source = training_template(tok)
    assert source == "trl"
    chat = to_chat(
        {
            "messages": [
                {"role": "user", "content": "How do I reset device 1?"},
                {"role": "assistant", "content": "Hold the power button.", "weight": 0},
                {"role": "user", "content": "And device 2?"},
                {"role": "assistant", "content": "Hold the power button of device 2."},
            ]
        }
    )
    row = tokenize_chat(tok, template, chat)
    assert _masked_text(tok, row).strip() == "Hold the power button of device 2.<|im_end|>"
    assert "You are Qwen" in tok.decode(row["input_ids"])  # rendered as the model expects


def test_sft_config_follows_the_spec(tmp_path: Path) -> None:
    from trainers.lora import Device, sft_config

    spec = LoraSpec(run_id="r1", model="m", train_file="t.jsonl", output_dir=str(tmp_path))
    cpu = Device(cuda=False, bf16=False, fp16=False, local_rank=0)
    cfg = sft_config(spec, cpu, qlora=False, has_eval=True)
    assert cfg.output_dir == str(tmp_path / "checkpoints")
    assert (cfg.num_train_epochs, cfg.per_device_train_batch_size) == (3, 4)
    assert (cfg.gradient_accumulation_steps, cfg.learning_rate, cfg.warmup_steps) == (2, 2e-4, 0.1)
    assert cfg.logging_steps == 1 and cfg.max_length == 2048 and cfg.max_steps == -1
    assert cfg.save_strategy == "epoch" and cfg.eval_strategy == "epoch"
    assert cfg.train_sampling_strategy == "group_by_length" and cfg.packing is False
    assert cfg.bf16 is False and cfg.fp16 is False  # TRL's default bf16=True would fail here
    assert cfg.activation_checkpointing is False and cfg.use_cpu is True
    steps = LoraSpec(
        run_id="r1",
        model="m",
        train_file="t.jsonl",
        output_dir=str(tmp_path),
        save_steps=5,
        warmup=3,
        group_by_length=False,
    )
    cfg = sft_config(steps, cpu, qlora=True, has_eval=False)
    assert cfg.save_strategy == "steps" and cfg.save_steps == 5 and cfg.eval_strategy == "no"
    assert cfg.warmup_steps == 3 and cfg.train_sampling_strategy == "random"
    assert cfg.activation_checkpointing is True  # QLoRA


def test_unknown_chat_format_is_refused() -> None:
    class Bare:
        chat_template = None

        def get_vocab(self) -> dict:
            return {"a": 0}

    with pytest.raises(ValueError, match=r"^model:"):
        training_template(Bare())


# ---- checkpoints and failures ---------------------------------------------------------------------


def test_latest_checkpoint_skips_broken_ones(tmp_path: Path) -> None:
    def checkpoint(step: int, *, state: bool = True, weights: bool = True) -> None:
        path = tmp_path / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        if state:
            (path / "trainer_state.json").write_text("{}")
        if weights:
            (path / "adapter_model.safetensors").write_bytes(b"x")

    assert latest_checkpoint(tmp_path) is None
    checkpoint(6)
    checkpoint(12)
    checkpoint(18, state=False)  # the save crashed before the trainer state
    checkpoint(24, weights=False)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-12"


def test_crashed_worker_writes_failed_result(tmp_path: Path) -> None:
    spec = {
        "run_id": "r9",
        "model": str(tmp_path / "no-model"),
        "train_file": str(tmp_path / "missing.jsonl"),
        "output_dir": str(tmp_path),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with open(tmp_path / local.LOG, "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "trainers.lora", str(tmp_path / "spec.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            timeout=120,
        )
    assert proc.returncode == 1
    result = json.loads((tmp_path / local.RESULT).read_text())
    assert result["status"] == "failed"
    assert result["error"].startswith("FileNotFoundError: train_file:")
    assert "\n" not in result["error"]
    assert "Traceback" in result["log_tail"] and "missing.jsonl" in result["log_tail"]


def test_bad_spec_file_fails_beside_it(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"run_id": "r1", "lr": -1}))
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.lora", str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    result = json.loads((tmp_path / local.RESULT).read_text())
    assert result["status"] == "failed" and result["error"].startswith(
        "ValueError: model: required"
    )


# ---- end to end -----------------------------------------------------------------------------------


def test_training_writes_progress_and_result(runs: Runs) -> None:
    rows = events(runs.full)
    start = rows[0]
    assert start["event"] == "start" and start["max_steps"] == 18 and start["epochs"] == 3
    assert isinstance(start["pid"], int)
    steps = [r for r in rows if r["event"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 19))  # logging_steps=1
    for s in steps:
        assert s["max_steps"] == 18 and s["loss"] > 0 and s["tokens_per_second"] > 0
        assert s["eta_seconds"] >= 0 and s["learning_rate"] >= 0 and s["time"] > 0
    assert steps[0]["learning_rate"] == 0.0  # warm-up starts from zero
    first = sum(s["loss"] for s in steps[:3]) / 3
    last = sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert [r["step"] for r in rows if r["event"] == "eval"] == [6, 12, 18]  # each epoch
    checkpoints = [r for r in rows if r["event"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [6, 12, 18]
    assert all(Path(c["path"]).is_dir() for c in checkpoints)

    result = runs.full_result
    assert result["status"] == "succeeded" and result["max_steps"] == 18
    metrics = result["metrics"]
    assert metrics["steps"] == 18
    assert metrics["eval_loss"] == pytest.approx(rows[-2]["eval_loss"])
    assert metrics["train_loss"] == pytest.approx(sum(s["loss"] for s in steps) / 18)
    assert metrics["train_runtime"] > 0 and metrics["tokens_per_second"] > 0
    assert result["adapter_dir"] == str(runs.full / "adapter")
    assert result["merged_dir"] == str(runs.full / "merged")
    state = local.read_state(runs.full)  # the bot's reader agrees
    assert state.status == "succeeded" and state.step == 18 and state.total_steps == 18


def test_adapter_and_merged_model_load(runs: Runs, tiny: Tiny) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(runs.full_result["adapter_dir"])
    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template(
        list(to_chat(chat_row(30)).messages), return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(runs.full_result["merged_dir"])
        merged_logits = merged(input_ids=ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=ids).logits
    assert torch.allclose(tuned_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)


def test_sigterm_saves_a_checkpoint_and_cancels(runs: Runs) -> None:
    result = runs.cancelled
    assert result["status"] == "cancelled"
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.name == f"checkpoint-{result['step']}"
    saved = [r for r in runs.cancelled_events if r["event"] == "checkpoint"]
    assert [r["path"] for r in saved] == [str(checkpoint)]  # saved once, on the way out
    assert not [r for r in runs.cancelled_events if r["event"] == "eval"]


def test_resume_skips_broken_checkpoint_and_matches_uninterrupted_run(runs: Runs) -> None:
    resumed = runs.resumed_result
    assert resumed["status"] == "succeeded"
    starts = events(runs.resumed, "start")
    assert starts[-1]["resumed_from"] == runs.cancelled["checkpoint"]  # not the broken one
    assert starts[-1]["step"] == runs.cancelled["step"]
    full, again = runs.full_result["metrics"], resumed["metrics"]
    assert again["steps"] == full["steps"] == 18
    assert again["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-3)
    assert again["train_loss"] == pytest.approx(full["train_loss"], rel=1e-3)
    final = {r["step"]: r["loss"] for r in events(runs.resumed, "step")}
    reference = {r["step"]: r["loss"] for r in events(runs.full, "step")}
    assert final[18] == pytest.approx(reference[18], rel=1e-3)


def test_accelerate_two_cpu_ranks_only_rank0_writes(runs: Runs) -> None:
    result = runs.ddp_result
    assert result["status"] == "succeeded", result
    starts = events(runs.ddp, "start")
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    assert starts[0]["max_steps"] == 9  # 24 examples / (4 per rank x 2 ranks) x 3 epochs
    steps = [r["step"] for r in events(runs.ddp, "step")]
    assert steps == list(range(1, 10))
    log = (runs.ddp / local.LOG).read_text()
    assert "rank0 trainers.lora INFO run ddp: succeeded" in log
    assert "rank1 trainers.lora INFO run ddp: succeeded" not in log
    assert (runs.ddp / "adapter" / "adapter_model.safetensors").exists()


# ---- QLoRA on the CPU -----------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _qlora_model(tiny: Tiny, tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    from trainers.lora import Device, load_model

    spec = LoraSpec(
        run_id="q", model=str(tiny.model), train_file=str(tiny.train), output_dir=str(tmp_path)
    )
    try:
        return load_model(
            spec, Device(cuda=False, bf16=False, fp16=False, local_rank=0), qlora=True
        )
    except Exception as exc:  # an old CPU or a bitsandbytes build without CPU 4-bit
        pytest.skip(f"bitsandbytes cannot load 4-bit weights on this CPU: {exc}")


def _grads_after_eval(model, tiny: Tiny) -> float:
    import torch

    ids = torch.tensor(
        [tokenize_chat(tiny.tokenizer, CHATML_TEMPLATE, to_chat(chat_row(1)))["input_ids"]]
    )
    model.eval()
    with torch.no_grad():  # what an evaluation does
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return sum(
        float(p.grad.abs().sum())
        for name, p in model.named_parameters()
        if "lora_" in name and p.grad is not None
    )


def test_qlora_on_cpu_turns_bnb_repacking_off(tiny: Tiny, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model = _qlora_model(tiny, tmp_path)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert _grads_after_eval(model, tiny) > 0


def test_qlora_cpu_gradients_survive_an_eval_on_avx512_bf16(tiny: Tiny, tmp_path: Path) -> None:
    if "avx512_bf16" not in _cpu_flags():
        reason = "this CPU lacks AVX512-BF16, so bitsandbytes never repacks 4-bit weights here"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    model = _qlora_model(tiny, tmp_path)
    assert _grads_after_eval(model, tiny) > 0
    assert _grads_after_eval(model, tiny) > 0  # a second eval: still learning


def test_worker_env_is_clean() -> None:
    """The worker must run from the project root without bot/storage on its import path."""
    code = (
        "import sys, trainers.lora as l; import trainers.local; "
        "print(any(m.split('.')[0] in ('bot', 'storage') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip() == "False"
