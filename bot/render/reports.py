"""Reports on data: a dropped file's validation report, cost estimates,
conversions, and the one-line pointer to a file checked in another channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.render.text import Message, context, duration, escape, money, plural, section
from trainers.data import ERROR
from trainers.pricing import trainable_by

if TYPE_CHECKING:
    from storage import Dataset
    from trainers.convert import Conversion
    from trainers.data import Report
    from trainers.pricing import CostTable, LocalEstimate, Trainer


MAX_LINES_SHOWN = 5  # line numbers listed per finding code
MAX_CODES_SHOWN = 12  # finding codes listed per severity
CONVERT_FORMATS = "sharegpt|alpaca|csv|json"


def _lines_label(lines: Sequence[int], total: int | None = None) -> str:
    total = len(lines) if total is None else max(total, len(lines))  # the report stores the first
    shown = ", ".join(str(n) for n in lines[:MAX_LINES_SHOWN])
    more = f" and {total - MAX_LINES_SHOWN:,} more" if total > MAX_LINES_SHOWN else ""
    word = "line" if total == 1 else "lines"
    return f"{word} {shown}{more}"


def finding_groups(report: Report) -> tuple[list[str], list[str]]:
    """One line per finding code, errors and warnings apart: count, lines, first message."""
    errors: list[str] = []
    warnings: list[str] = []
    for code, group in report.by_code().items():
        lines = [f.line for f in group if f.line > 0]
        n = report.counts.get(code, len(group))  # the true count: only the first are stored
        where = f" — {_lines_label(lines, n - (len(group) - len(lines)))}" if lines else ""
        entry = f"{code} ×{n:,}{where}: {escape(group[0].message)}"
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
        parts.append(f"{e.params_billions:g}B{mode} {duration(e.gpu_hours)}")
    assumption = ", ".join(f"{e.tokens_per_second:,.0f}" for e in local)
    return (
        f"Local LoRA on one 80 GB GPU ({local[0].epochs} epochs): {' · '.join(parts)} "
        f"(assuming {assumption} tokens/s)"
    )


def _kind_line(report: Report, trainers: Sequence[Trainer]) -> str | None:
    """What kind of file this is, and who can train it; None when no line was recognised."""
    if report.kind == "unknown":
        return None
    kind = report.kind_label
    if report.images:
        kind += f" with {plural(report.images, 'image')} (vision)"
    if len(report.kinds or {}) > 1:
        kind += " (mixed with other kinds: see the errors)"
    if trainers:
        who = "trainable by " + ", ".join(t.label for t in trainers)
    else:
        who = "no provider in the price table trains it today"
    extra = ""
    if report.images and report.kind == "supervised":
        extra = " · local LoRA trains text models only: it would drop the images"
    return f"Kind: {kind} · {who}{extra}"


def _tokens_lines(report: Report) -> list[str]:
    """The tokens line, and under it how the counts were made when it matters."""
    t = report.tokens
    if not report.valid_examples or not report.token_notes:
        return [tokens_line(report)]
    how = "exact" if t.exact else "approximate"
    head = (
        f"Tokens ({report.encoding}, chat formula, {how}): {t.total:,} total · "
        f"min {t.min:,} · p50 {t.p50:,} · mean {t.mean:,.1f} · p95 {t.p95:,} · max {t.max:,}"
    )
    return [head, *(f"• {escape(n)}" for n in report.token_notes)]


def _model_notices(costs: CostTable | None, trainers: Sequence[Trainer]) -> list[str]:
    """A notice when the chosen model cannot train this kind of file."""
    if not costs:
        return []
    chosen = costs.selected.model
    out = []
    for t in trainers:
        if t.provider == "openai" and t.models and chosen not in t.models:
            what = "DPO" if t.method == "dpo" else "vision fine-tuning"
            out.append(
                f"{chosen} does not take this file: OpenAI's {what} trains "
                f"{', '.join(t.models)}; estimate and train with one of those"
            )
    return out


def _verdict(errors: int) -> str:
    return "✅ ready to train" if not errors else "❌ fix the errors before training"


def validation_report(
    name: str,
    report: Report,
    costs: CostTable | None,
    local: Sequence[LocalEstimate] = (),
    *,
    dataset_id: str | None = None,
    trainers: Sequence[Trainer] | None = None,
) -> Message:
    """The report on a dropped or checked file. `trainers` defaults to `trainable_by` today."""
    if trainers is None:
        trainers = trainable_by(report.kind, images=bool(report.images))
    label = f"{escape(name)} ({dataset_id})" if dataset_id else escape(name)
    n_err, n_warn = report.error_count, report.warning_count
    verdict = _verdict(n_err)
    headline = (
        f"{label}: {plural(report.examples, 'example')}, {report.valid_examples:,} valid — "
        f"{plural(n_err, 'error')}, {plural(n_warn, 'warning')}. {verdict}"
    )
    errors, warnings = finding_groups(report)
    kind = _kind_line(report, trainers)
    text_parts = [headline]
    blocks = [section(f"*{headline}*")]
    if kind:
        text_parts.append(kind)
        blocks.append(context(kind))
    if errors:
        text_parts.append("Errors:\n" + _bullets(errors))
        blocks.append(section("*Errors*\n" + _bullets(errors)))
    if warnings:
        text_parts.append("Warnings:\n" + _bullets(warnings))
        blocks.append(section("*Warnings*\n" + _bullets(warnings)))
    tokens = "\n".join(_tokens_lines(report))
    text_parts.append(tokens)
    blocks.append(section(tokens))
    # Reinforcement files have no trainer in the table: a price would mislead.
    priced = report.kind != "reinforcement"
    if costs and report.valid_examples and priced:
        rows = cost_lines(costs)
        text_parts.append(_cost_heading(costs) + "\n" + "\n".join(f"  {r}" for r in rows))
        blocks.append(section(f"*{_cost_heading(costs)}*\n```" + "\n".join(rows) + "```"))
    by_local = report.kind == "supervised" and not report.images
    if local and report.valid_examples and by_local:
        text_parts.append(local_line(local))
        blocks.append(context(local_line(local)))
    notices = (list(costs.notices) if costs else []) + _model_notices(costs, trainers)
    if notices:
        text_parts.append("Notices:\n" + "\n".join(f"• {n}" for n in notices))
        blocks.append(context("\n".join(f"⚠️ {n}" for n in notices)))
    return Message("\n".join(text_parts), blocks)


def estimate_summary(
    name: str, report: Report, costs: CostTable, local: Sequence[LocalEstimate] = ()
) -> Message:
    """Tokens and cost first; findings only as a count (validate shows them)."""
    n_err = report.error_count
    validity = f"{report.valid_examples:,} of {plural(report.examples, 'example')} valid" + (
        f"; {plural(n_err, 'error')}: run validate to see them" if n_err else ""
    )
    parts = [f"{escape(name)}: {validity}", tokens_line(report)]
    if report.valid_examples:
        rows = cost_lines(costs)
        parts.append(_cost_heading(costs) + "\n" + "\n".join(f"  {r}" for r in rows))
        if local:
            parts.append(local_line(local))
    if costs.notices:
        parts.append("Notices:\n" + "\n".join(f"• {n}" for n in costs.notices))
    text = "\n".join(parts)
    return Message(text, [section(text)])


def conversion_offer(name: str, dataset_id: str, fmt: str, looks_like: str) -> Message:
    """Under a dropped file that is not UTF-8 chat JSONL yet: what it is, and the command."""
    text = (
        f"{escape(name)} ({dataset_id}) looks like {escape(looks_like)}, not chat JSONL. "
        f"To turn it into chat JSONL, as a new dataset checked like any upload: "
        f"`/finetune convert {dataset_id} from={fmt}` "
        f"(from={CONVERT_FORMATS})"
    )
    return Message(text, [section(text)])


def reshared_pointer(name: str, dataset: Dataset) -> Message:
    """A file already checked in another channel (TUNEBOT_RESHARED_FILES=pointer): its
    counts in one line, and that it can be used here. Names no other channel."""
    n_err = dataset.errors or 0
    verdict = _verdict(n_err)
    text = (
        f"{escape(name)} ({dataset.id}) was checked before: "
        f"{plural(dataset.examples or 0, 'example')}, {dataset.valid_examples or 0:,} valid — "
        f"{plural(n_err, 'error')}, {plural(dataset.warnings or 0, 'warning')}. {verdict}. "
        f"`/finetune estimate {dataset.id}` prices it here."
    )
    return Message(text, [section(text)])


def conversion_summary(name: str, dataset_id: str, fmt: str, result: Conversion) -> Message:
    """What `/finetune convert` made of a dataset: counts, every kind of loss, notices."""
    label = f"{escape(name)} ({dataset_id}) from {fmt}"
    n_bad = len(result.problems)
    if result.examples:
        head = (
            f"{label}: {plural(len(result.examples), 'example')} converted, "
            f"{plural(n_bad, 'row')} not converted."
        )
        if result.dropped:
            head = "⚠️ " + head
    else:
        why = f"none of its {plural(n_bad, 'row')} converts" if n_bad else "it holds no rows"
        head = f"⚠️ Nothing converted from {label}: {why}; no dataset was made."
    parts = [head]
    if result.problems:
        shown = [f"{escape(w)}: {escape(what)}" for w, what in result.problems[:MAX_LINES_SHOWN]]
        more = n_bad - len(shown)
        parts.append(
            "Not converted:\n"
            + _bullets(shown)
            + (f"\n…and {more:,} more (`tunebot convert` lists them all)" if more else "")
        )
    if result.ignored:
        parts.append("Not in the output:\n" + _bullets([escape(x) for x in result.ignored_lines()]))
    if result.notices:
        parts.append("Notices:\n" + _bullets([escape(x) for x in result.notices]))
    text = "\n".join(parts)
    return Message(text, [section(text)])


def with_caveat(message: Message, caveat: str) -> Message:
    """A report whose ✅ would hide that something was lost before it: the ✅ gives way."""

    def fix(value: object) -> object:
        if isinstance(value, str):
            return value.replace("✅ ready to train", f"⚠️ {caveat}").replace("✅", "⚠️")
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return Message(fix(message.text), fix(message.blocks), in_channel=message.in_channel)
