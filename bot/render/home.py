"""The App Home tab: runs in progress, approvals waiting, spend, latest data and evaluations."""

from __future__ import annotations

from collections.abc import Sequence

from bot.render.runs import STATE_WORDS
from bot.render.text import context, escape, money, section
from bot.results import RunResult


def home_view(
    *, user: str, active: Sequence, waiting: Sequence, datasets: Sequence, evals: Sequence,
    spent_usd: float, budget_usd: float | None, finished: Sequence = (),
) -> dict:  # fmt: skip
    """The App Home tab: what runs, what waits for this person, spend, latest data and evals."""
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "tunebot"}},
        context(
            "Drop a .jsonl chat training file into a channel I'm in: I check it and price it in "
            "its thread. `/finetune help` lists the commands."
        ),
    ]
    budget = f" of {money(budget_usd)}" if budget_usd is not None else " (no monthly cap)"
    blocks.append(section(f"*Spend this month:* {money(spent_usd)}{budget}"))
    if waiting:
        lines = [
            f"• {r.id}: {r.provider} {escape(r.model)}, {money(r.estimate_usd or 0)}, asked by <@{r.requested_by}> in <#{r.channel}>"
            for r in waiting
        ]
        blocks.append(section(f"*Waiting for your approval* (<@{user}>)\n" + "\n".join(lines)))
    if active:
        lines = [
            f"• {r.id}: {STATE_WORDS.get(r.status, r.status)} — {r.provider} {escape(r.model)} on {r.dataset_id}{_progress_hint(r)}"
            for r in active
        ]
        blocks.append(section("*Runs in progress*\n" + "\n".join(lines)))
    else:
        blocks.append(section("*Runs in progress*\nNone right now."))
    retiring = _retiring(finished)
    if retiring:
        blocks.append(section("*Models that stop serving*\n" + "\n".join(retiring)))
    if datasets:
        lines = [
            f"• {d.id} {escape(d.name)}: {d.valid_examples or 0:,}/{d.examples or 0:,} valid, {d.tokens_total or 0:,} tokens"
            for d in datasets
        ]
        blocks.append(section("*Latest datasets*\n" + "\n".join(lines)))
    if evals:
        lines = [f"• {e.run_id}: {_eval_line(e.summary_json or {})}" for e in evals]
        blocks.append(section("*Latest evaluations*\n" + "\n".join(lines)))
    return {"type": "home", "blocks": blocks}


def _progress_hint(run) -> str:
    data = run.result_json or {}
    step, total = data.get("step"), data.get("total_steps")
    return f" (step {step}/{total})" if step and total else ""


def _eval_line(summary: dict) -> str:
    primary = summary.get("primary")
    means = (summary.get("means") or {}).get(primary) or {}
    wtl = summary.get("win_tie_loss") or {}
    if not primary or not means:
        return "no scores"
    return (
        f"{primary} base {means.get('base', 0):.2f} → tuned {means.get('tuned', 0):.2f}; "
        f"tuned wins {wtl.get('win', 0)}, ties {wtl.get('tie', 0)}, loses {wtl.get('loss', 0)}"
    )


def _retiring(runs: Sequence) -> list[str]:
    """A line for each finished run whose fine-tuned model's provider stops serving it."""
    from trainers.retirement import serving_ends

    lines = []
    for run in runs:
        model = RunResult.of(run).fine_tuned_model
        ends = serving_ends(model) if model else None
        if ends:
            lines.append(f"• {run.id}: `{escape(model)}` stops serving on {ends:%Y-%m-%d}")
    return lines
