"""The baseline of bench/train.py: plain TRL; and the loss of trained adapters.

    python bench/_trl_baseline.py train CONFIG.json   # SFTTrainer with SFTConfig defaults
    python bench/_trl_baseline.py eval CONFIG.json    # adapters' loss on chat files

`train` is what a user gets from the TRL quick start with a LoRA config:
`SFTTrainer(model=path, args=SFTConfig(...), peft_config=LoraConfig(...))`,
with SFTConfig's defaults except the hyper-parameters the benchmark holds
equal (batch, accumulation, epochs, learning rate, seed, max length). So it
samples at random, pads each batch to its longest example, and keeps TRL's
bf16 and activation-checkpointing defaults unless the config says otherwise.
For a like-for-like loss it trains on the same pre-tokenized examples as
tunebot (`trainers.lora.build_dataset`: the same template and assistant-only
mask); TRL turns the `assistant_masks` column into labels itself.

Both modes write one JSON object to the config's `result` path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.lora import build_dataset, training_template  # noqa: E402 (the path is set above)


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    template, _ = training_template(tokenizer)
    dataset = build_dataset(tokenizer, template, cfg["train_file"])
    set_seed(cfg["seed"])  # before the LoRA weights are drawn, as the worker does
    args = SFTConfig(
        output_dir=str(Path(cfg["output_dir"]) / "checkpoints"),
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=cfg["grad_accum"],
        num_train_epochs=cfg["epochs"],
        learning_rate=cfg["lr"],
        seed=cfg["seed"],
        max_length=cfg["max_length"],
        report_to="none",
        disable_tqdm=True,
        **cfg.get("overrides", {}),
    )
    trainer = SFTTrainer(
        model=cfg["model"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=cfg["r"],
            lora_alpha=cfg["alpha"],
            lora_dropout=cfg["dropout"],
            target_modules=cfg["targets"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    trainer.save_model(str(Path(cfg["output_dir"]) / "adapter"))
    return {
        "train_runtime": output.metrics["train_runtime"],
        "wall": wall,
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "bf16": args.bf16,
        "activation_checkpointing": bool(args.activation_checkpointing),
        "train_sampling_strategy": args.train_sampling_strategy,
    }


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Token-weighted assistant-only loss of the base model and each adapter on each file."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    template, _ = training_template(tokenizer)
    n = cfg["max_length"]
    sets = {}
    for name, path in cfg["files"].items():
        rows = build_dataset(tokenizer, template, path)
        pairs = zip(rows["input_ids"], rows["assistant_masks"], strict=True)
        sets[name] = sorted(((ids[:n], mask[:n]) for ids, mask in pairs), key=lambda e: len(e[0]))
    base = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    pad = tokenizer.pad_token_id or 0
    losses: dict[str, dict[str, float]] = {name: {} for name in sets}
    for model_name, adapter in cfg["adapters"].items():
        model = PeftModel.from_pretrained(base, adapter) if adapter else base
        model.eval()
        for name, examples in sets.items():
            losses[name][model_name] = _loss(model, examples, cfg["batch"], pad)
        if adapter:
            base = model.unload()  # the same base weights, adapter removed
    return {"loss": losses}


def _loss(model: Any, examples: list[tuple[list[int], list[int]]], batch: int, pad: int) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            chunk = examples[i : i + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100)
            for row, (tokens, mask) in enumerate(chunk):
                n = len(tokens)
                ids[row, :n] = torch.tensor(tokens)
                attention[row, :n] = 1
                labels[row, :n] = torch.tensor(
                    [t if m else -100 for t, m in zip(tokens, mask, strict=True)]
                )
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((target != -100).sum())
    return total / count


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("train", "eval"):
        print("usage: _trl_baseline.py train|eval CONFIG.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    result = train(cfg) if argv[0] == "train" else evaluate(cfg)
    with open("/proc/self/status", encoding="ascii") as fh:
        hwm = next((line for line in fh if line.startswith("VmHWM:")), "VmHWM: 0 kB")
    result["vm_hwm_kb"] = int(hwm.split()[1])
    Path(cfg["result"]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
