"""Every message tunebot shows: pure functions returning `Message(text, blocks)`.

The text alone must read well: it is what notifications, screen readers and
the CLI show. Blocks are Slack's Block Kit rendering of the same content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trainers.data import ERROR, Report
from trainers.pricing import CostTable, LocalEstimate

SECTION_LIMIT = 2_900  # Slack caps a section's text at 3,000 characters
MAX_LINES_SHOWN = 5
MAX_CODES_SHOWN = 12


@dataclass(frozen=True)
class Message:
    text: str
    blocks: list[dict] = field(default_factory=list)
    in_channel: bool = False  # as a command's answer: for everyone, not just the caller

    def to_kwargs(self) -> dict:
        return {"text": self.text, "blocks": self.blocks}


def _section(markdown: str) -> dict:
    if len(markdown) > SECTION_LIMIT:
        markdown = markdown[: SECTION_LIMIT - 1] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": markdown}}


def _context(markdown: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": markdown[:SECTION_LIMIT]}]}


def money(usd: float) -> str:
    """Dollars with cents, or four decimals under a dollar so small runs aren't $0.00."""
    return f"${usd:,.2f}" if usd >= 1 or usd == 0 else f"${usd:.4f}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _lines_label(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:MAX_LINES_SHOWN])
    more = f" and {len(lines) - MAX_LINES_SHOWN:,} more" if len(lines) > MAX_LINES_SHOWN else ""
    word = "line" if len(lines) == 1 else "lines"
    return f"{word} {shown}{more}"


def finding_groups(report: Report) -> tuple[list[str], list[str]]:
    """One line per finding code, errors and warnings apart: count, lines, first message."""
    errors: list[str] = []
    warnings: list[str] = []
    for code, group in report.by_code().items():
        lines = [f.line for f in group if f.line > 0]
        where = f" — {_lines_label(lines)}" if lines else ""
        entry = f"{code} ×{len(group):,}{where}: {group[0].message}"
        (errors if group[0].severity == ERROR else warnings).append(entry)
    return errors, warnings


def _bullets(entries: list[str]) -> str:
    shown = entries[:MAX_CODES_SHOWN]
    extra = len(entries) - len(shown)
    text = "\n".join(f"• {e}" for e in shown)
    return text + (f"\n• … and {extra} more kinds" if extra > 0 else "")


def tokens_line(report: Report) -> str:
    t = report.tokens
    how = "exact" if t.exact else "approximate: tool definitions have no published formula"
    if not report.valid_examples:
        return "Tokens: no valid examples to count"
    return (
        f"Tokens ({report.encoding}, chat formula, {how}): {t.total:,} total · "
        f"min {t.min:,} · p50 {t.p50:,} · mean {t.mean:,.1f} · p95 {t.p95:,} · max {t.max:,}"
    )


def cost_lines(costs: CostTable) -> list[str]:
    rows = []
    width = max(len(e.model) for e in costs.estimates)
    for e in costs.estimates:
        mark = "  ◀" if e.model == costs.selected.model else ""
        rows.append(
            f"{e.model:<{width}}  {e.epochs:>2} ep  {e.billed_tokens:>13,} tok  "
            f"{money(e.cost_usd):>11}{mark}"
        )
    return rows


def _cost_heading(costs: CostTable) -> str:
    s = costs.selected
    how = f"auto epochs ({s.epochs})" if s.epochs_auto else f"{s.epochs} epochs"
    return f"Training cost on OpenAI at {how}:"


def local_line(local: Sequence[LocalEstimate]) -> str:
    parts = []
    for e in local:
        mode = " QLoRA" if e.qlora else ""
        parts.append(f"{e.params_billions:g}B{mode} {_duration(e.gpu_hours)}")
    assumption = ", ".join(f"{e.tokens_per_second:,.0f}" for e in local)
    return (
        f"Local LoRA on one 80 GB GPU ({local[0].epochs} epochs): {' · '.join(parts)} "
        f"(assuming {assumption} tokens/s)"
    )


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return "under 1 min"
    if hours < 1:
        return f"~{round(hours * 60)} min"
    return f"~{hours:.1f} h"


def validation_report(
    name: str,
    report: Report,
    costs: CostTable | None,
    local: Sequence[LocalEstimate] = (),
    *,
    dataset_id: str | None = None,
) -> Message:
    label = f"{name} ({dataset_id})" if dataset_id else name
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "✅ ready to train" if not n_err else "❌ fix the errors before training"
    headline = (
        f"{label}: {_plural(report.examples, 'example')}, {report.valid_examples:,} valid — "
        f"{_plural(n_err, 'error')}, {_plural(n_warn, 'warning')}. {verdict}"
    )
    errors, warnings = finding_groups(report)
    text_parts = [headline]
    blocks = [_section(f"*{headline}*")]
    if errors:
        text_parts.append("Errors:\n" + _bullets(errors))
        blocks.append(_section("*Errors*\n" + _bullets(errors)))
    if warnings:
        text_parts.append("Warnings:\n" + _bullets(warnings))
        blocks.append(_section("*Warnings*\n" + _bullets(warnings)))
    text_parts.append(tokens_line(report))
    blocks.append(_section(tokens_line(report)))
    if costs and report.valid_examples:
        rows = cost_lines(costs)
        text_parts.append(_cost_heading(costs) + "\n" + "\n".join(f"  {r}" for r in rows))
        blocks.append(_section(f"*{_cost_heading(costs)}*\n```" + "\n".join(rows) + "```"))
    if local and report.valid_examples:
        text_parts.append(local_line(local))
        blocks.append(_context(local_line(local)))
    notices = list(costs.notices) if costs else []
    if notices:
        text_parts.append("Notices:\n" + "\n".join(f"• {n}" for n in notices))
        blocks.append(_context("\n".join(f"⚠️ {n}" for n in notices)))
    return Message("\n".join(text_parts), blocks)


def error(summary: str, detail: str | None = None) -> Message:
    """The one way an error reaches a person: what went wrong, and what to do."""
    text = f"⚠️ {summary}" + (f"\n{detail}" if detail else "")
    return Message(text, [_section(text)])


def estimate_summary(
    name: str, report: Report, costs: CostTable, local: Sequence[LocalEstimate] = ()
) -> Message:
    """Tokens and cost first; findings only as a count (validate shows them)."""
    n_err = len(report.errors)
    validity = f"{report.valid_examples:,} of {_plural(report.examples, 'example')} valid" + (
        f"; {_plural(n_err, 'error')}: run validate to see them" if n_err else ""
    )
    parts = [f"{name}: {validity}", tokens_line(report)]
    if report.valid_examples:
        rows = cost_lines(costs)
        parts.append(_cost_heading(costs) + "\n" + "\n".join(f"  {r}" for r in rows))
        if local:
            parts.append(local_line(local))
    if costs.notices:
        parts.append("Notices:\n" + "\n".join(f"• {n}" for n in costs.notices))
    text = "\n".join(parts)
    return Message(text, [_section(text)])


def note(text: str) -> Message:
    return Message(text, [_section(text)])


def help_text(unknown: str | None = None) -> Message:
    from bot.commands import help_lines

    lines = help_lines()
    head = f"I don't know `{unknown}`. " if unknown else ""
    text = (
        f"{head}Drop a .jsonl chat training file in this channel and I'll check it and price it "
        "in its thread. Commands:\n" + "\n".join(f"• {line}" for line in lines)
    )
    return Message(text, [_section(text)])


def datasets_list(datasets: Sequence) -> Message:
    if not datasets:
        return Message("No datasets in this channel yet: drop a .jsonl file here.", in_channel=True)
    lines = []
    for d in datasets:
        if d.examples is None:
            state = "still being checked"
        else:
            state = (
                f"{d.valid_examples:,}/{d.examples:,} valid, {_plural(d.errors or 0, 'error')}, "
                f"{d.tokens_total or 0:,} tokens"
            )
        lines.append(
            f"• {d.id} — {d.name} by <@{d.user}>, {d.created_at:%Y-%m-%d %H:%M} UTC: {state}"
        )
    text = "Datasets in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


def runs_list(runs: Sequence) -> Message:
    if not runs:
        text = "No training runs in this channel yet: `/finetune train` starts one."
        return Message(text, [_section(text)], in_channel=True)
    lines = [
        f"• {r.id} — {r.provider} {r.model} on {r.dataset_id}: {r.status} (by <@{r.requested_by}>)"
        for r in runs
    ]
    text = "Training runs in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


def run_status(run) -> Message:
    text = (
        f"{run.id}: {run.status} — {run.provider} {run.model} on {run.dataset_id}, "
        f"requested by <@{run.requested_by}> at {run.created_at:%Y-%m-%d %H:%M} UTC"
    )
    if run.error:
        text += f"\nError: {run.error}"
    return Message(text, [_section(text)], in_channel=True)


def home_view(datasets: Sequence, runs: Sequence) -> dict:
    """The App Home tab: the latest datasets and runs."""
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "tunebot"}},
        _section(
            "Drop a .jsonl chat training file into a channel I'm in: I check it and price it "
            "in its thread. `/finetune help` lists the commands."
        ),
    ]
    if datasets:
        lines = [
            f"• {d.id} {d.name}: {d.valid_examples or 0:,}/{d.examples or 0:,} valid"
            for d in datasets
        ]
        blocks.append(_section("*Latest datasets*\n" + "\n".join(lines)))
    if runs:
        lines = [f"• {r.id} {r.provider} {r.model}: {r.status}" for r in runs]
        blocks.append(_section("*Latest runs*\n" + "\n".join(lines)))
    return {"type": "home", "blocks": blocks}
