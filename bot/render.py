"""Every message tunebot shows: pure functions returning `Message(text, blocks)`.

The text alone must read well: it is what notifications, screen readers and
the CLI show. Blocks are Slack's Block Kit rendering of the same content.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from storage import Dataset
from trainers.convert import Conversion
from trainers.data import ERROR, Report
from trainers.pricing import CostTable, LocalEstimate, Trainer, trainable_by

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


_BARE_AMPERSAND = re.compile(r"&(?!(?:amp|lt|gt);)")
# The bot's own mentions, built from Slack ids: the only `<…>` a composed message keeps.
_OWN_MENTION = re.compile(r"<[@#][A-Z0-9]+>")
# An absolute (or ~/) path of two parts or more; a URL's slashes never start one.
_SERVER_PATH = re.compile(r"(?<![\w:/.~\\-])~?(?:/[\w.+@-]+)+/([\w.+@-]+)")
_TRACEBACK = "Traceback (most recent call last)"


def escape(text: object) -> str:
    """Text from a person or a file, made inert for mrkdwn: `&`, `<`, `>` as entities.

    Every file name, reason, prompt, answer, model name or option a user typed
    goes through this where it enters a message, in `text` and blocks alike, so
    `<!channel>` in a file name pings nobody. Idempotent: an `&amp;`, `&lt;` or
    `&gt;` already there is left as it is, so nothing is escaped twice.
    """
    text = str(text)
    return _BARE_AMPERSAND.sub("&amp;", text).replace("<", "&lt;").replace(">", "&gt;")


def _inert(text: str) -> str:
    """A message composed elsewhere: escaped, except the bot's own `<@U…>`/`<#C…>` mentions."""
    parts, last = [], 0
    for mention in _OWN_MENTION.finditer(text):
        parts += [escape(text[last : mention.start()]), mention.group()]
        last = mention.end()
    return "".join(parts) + escape(text[last:])


def short_paths(text: str) -> str:
    """Server paths cut to their last part: `/srv/tunebot/runs/r1/spec.json` -> `spec.json`."""
    return _SERVER_PATH.sub(r"\1", text)


def failure_line(error: str | None, log: str | None = None) -> str:
    """An error as a person should see it: one line, its class and message, no server paths.

    A traceback (in `error`, or in the `log` when there is no error) gives its
    last line, the exception itself.
    """
    text = (error or "").strip()
    if _TRACEBACK in text or (not text and log and _TRACEBACK in log):
        source = text or log or ""
        head = text.split(_TRACEBACK, 1)[0].strip() if text else ""
        tail = source.rsplit(_TRACEBACK, 1)[1].splitlines()
        last = next((s.strip() for s in reversed(tail) if s.strip() and not s[:1].isspace()), "")
        text = f"{head} {last}".strip()
    lines = text.splitlines()
    return short_paths(lines[0].strip() if lines else "") or "no error message"


def _no_internals(text: str) -> str:
    """No traceback and no server path: a traceback shrinks to its last line."""
    if _TRACEBACK in text:
        head = text.split(_TRACEBACK, 1)[0].strip()
        return f"{head} {failure_line(text[len(head) :])}".strip()
    return short_paths(text)


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


def _kind_line(report: Report, trainers: Sequence[Trainer]) -> str | None:
    """What kind of file this is, and who can train it; None when no line was recognised."""
    if report.kind == "unknown":
        return None
    kind = report.kind_label
    if report.images:
        kind += f" with {_plural(report.images, 'image')} (vision)"
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
        f"{label}: {_plural(report.examples, 'example')}, {report.valid_examples:,} valid — "
        f"{_plural(n_err, 'error')}, {_plural(n_warn, 'warning')}. {verdict}"
    )
    errors, warnings = finding_groups(report)
    kind = _kind_line(report, trainers)
    text_parts = [headline]
    blocks = [_section(f"*{headline}*")]
    if kind:
        text_parts.append(kind)
        blocks.append(_context(kind))
    if errors:
        text_parts.append("Errors:\n" + _bullets(errors))
        blocks.append(_section("*Errors*\n" + _bullets(errors)))
    if warnings:
        text_parts.append("Warnings:\n" + _bullets(warnings))
        blocks.append(_section("*Warnings*\n" + _bullets(warnings)))
    tokens = "\n".join(_tokens_lines(report))
    text_parts.append(tokens)
    blocks.append(_section(tokens))
    # Reinforcement files have no trainer in the table: a price would mislead.
    priced = report.kind != "reinforcement"
    if costs and report.valid_examples and priced:
        rows = cost_lines(costs)
        text_parts.append(_cost_heading(costs) + "\n" + "\n".join(f"  {r}" for r in rows))
        blocks.append(_section(f"*{_cost_heading(costs)}*\n```" + "\n".join(rows) + "```"))
    by_local = report.kind == "supervised" and not report.images
    if local and report.valid_examples and by_local:
        text_parts.append(local_line(local))
        blocks.append(_context(local_line(local)))
    notices = (list(costs.notices) if costs else []) + _model_notices(costs, trainers)
    if notices:
        text_parts.append("Notices:\n" + "\n".join(f"• {n}" for n in notices))
        blocks.append(_context("\n".join(f"⚠️ {n}" for n in notices)))
    return Message("\n".join(text_parts), blocks)


def error(summary: str, detail: str | None = None) -> Message:
    """The one way an error reaches a person: what went wrong, and what to do.

    Never a traceback or a server path; user text in it is escaped (the bot's
    own mentions stay).
    """
    summary = _inert(_no_internals(summary))
    detail = _inert(_no_internals(detail)) if detail else None
    text = f"⚠️ {summary}" + (f"\n{detail}" if detail else "")
    return Message(text, [_section(text)])


def estimate_summary(
    name: str, report: Report, costs: CostTable, local: Sequence[LocalEstimate] = ()
) -> Message:
    """Tokens and cost first; findings only as a count (validate shows them)."""
    n_err = report.error_count
    validity = f"{report.valid_examples:,} of {_plural(report.examples, 'example')} valid" + (
        f"; {_plural(n_err, 'error')}: run validate to see them" if n_err else ""
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
    return Message(text, [_section(text)])


def note(text: str, *, in_channel: bool = False) -> Message:
    """A message composed by the caller: escaped here, keeping the bot's own mentions."""
    text = _inert(text)
    return Message(text, [_section(text)], in_channel=in_channel)


CONVERT_FORMATS = "sharegpt|alpaca|csv|json"


def conversion_offer(name: str, dataset_id: str, fmt: str, looks_like: str) -> Message:
    """Under a dropped file that is not UTF-8 chat JSONL yet: what it is, and the command."""
    text = (
        f"{escape(name)} ({dataset_id}) looks like {escape(looks_like)}, not chat JSONL. "
        f"To turn it into chat JSONL, as a new dataset checked like any upload: "
        f"`/finetune convert {dataset_id} from={fmt}` "
        f"(from={CONVERT_FORMATS})"
    )
    return Message(text, [_section(text)])


def _verdict(errors: int) -> str:
    return "✅ ready to train" if not errors else "❌ fix the errors before training"


def reshared_pointer(name: str, dataset: Dataset) -> Message:
    """A file already checked in another channel (TUNEBOT_RESHARED_FILES=pointer): its
    counts in one line, and that it can be used here. Names no other channel."""
    n_err = dataset.errors or 0
    verdict = _verdict(n_err)
    text = (
        f"{escape(name)} ({dataset.id}) was checked before: "
        f"{_plural(dataset.examples or 0, 'example')}, {dataset.valid_examples or 0:,} valid — "
        f"{_plural(n_err, 'error')}, {_plural(dataset.warnings or 0, 'warning')}. {verdict}. "
        f"`/finetune estimate {dataset.id}` prices it here."
    )
    return Message(text, [_section(text)])


def conversion_summary(name: str, dataset_id: str, fmt: str, result: Conversion) -> Message:
    """What `/finetune convert` made of a dataset: counts, every kind of loss, notices."""
    label = f"{escape(name)} ({dataset_id}) from {fmt}"
    n_bad = len(result.problems)
    if result.examples:
        head = (
            f"{label}: {_plural(len(result.examples), 'example')} converted, "
            f"{_plural(n_bad, 'row')} not converted."
        )
        if result.dropped:
            head = "⚠️ " + head
    else:
        why = f"none of its {_plural(n_bad, 'row')} converts" if n_bad else "it holds no rows"
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
    return Message(text, [_section(text)])


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


def help_text(unknown: str | None = None) -> Message:
    from bot.commands import help_lines

    lines = help_lines()
    head = f"I don't know `{escape(unknown)}`. " if unknown else ""
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
            f"• {d.id} — {escape(d.name)} by <@{d.user}>, {d.created_at:%Y-%m-%d %H:%M} UTC: {state}"
        )
    text = "Datasets in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


def runs_list(runs: Sequence) -> Message:
    if not runs:
        text = "No training runs in this channel yet: `/finetune train` starts one."
        return Message(text, [_section(text)], in_channel=True)
    lines = [
        f"• {r.id} — {r.provider} {escape(r.model)} on {r.dataset_id}: {r.status} (by <@{r.requested_by}>)"
        for r in runs
    ]
    text = "Training runs in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


def run_status(run) -> Message:
    text = (
        f"{run.id}: {run.status} — {run.provider} {escape(run.model)} on {run.dataset_id}, "
        f"requested by <@{run.requested_by}> at {run.created_at:%Y-%m-%d %H:%M} UTC"
    )
    if run.error:
        text += f"\nError: {escape(failure_line(run.error))}"
    return Message(text, [_section(text)], in_channel=True)


def home_view(
    *, user: str, active: Sequence, waiting: Sequence, datasets: Sequence, evals: Sequence,
    spent_usd: float, budget_usd: float | None,
) -> dict:  # fmt: skip
    """The App Home tab: what runs, what waits for this person, spend, latest data and evals."""
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": "tunebot"}},
        _context(
            "Drop a .jsonl chat training file into a channel I'm in: I check it and price it in "
            "its thread. `/finetune help` lists the commands."
        ),
    ]
    budget = f" of {money(budget_usd)}" if budget_usd is not None else " (no monthly cap)"
    blocks.append(_section(f"*Spend this month:* {money(spent_usd)}{budget}"))
    if waiting:
        lines = [
            f"• {r.id}: {r.provider} {escape(r.model)}, {money(r.estimate_usd or 0)}, asked by <@{r.requested_by}> in <#{r.channel}>"
            for r in waiting
        ]
        blocks.append(_section(f"*Waiting for your approval* (<@{user}>)\n" + "\n".join(lines)))
    if active:
        lines = [
            f"• {r.id}: {_STATE_WORDS.get(r.status, r.status)} — {r.provider} {escape(r.model)} on {r.dataset_id}{_progress_hint(r)}"
            for r in active
        ]
        blocks.append(_section("*Runs in progress*\n" + "\n".join(lines)))
    else:
        blocks.append(_section("*Runs in progress*\nNone right now."))
    if datasets:
        lines = [
            f"• {d.id} {escape(d.name)}: {d.valid_examples or 0:,}/{d.examples or 0:,} valid, {d.tokens_total or 0:,} tokens"
            for d in datasets
        ]
        blocks.append(_section("*Latest datasets*\n" + "\n".join(lines)))
    if evals:
        lines = [f"• {e.run_id}: {_eval_line(e.summary_json or {})}" for e in evals]
        blocks.append(_section("*Latest evaluations*\n" + "\n".join(lines)))
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


def budget_report(
    rows: Sequence,
    *,
    spent_usd: float,
    budget_usd: float | None,
    month: str,
    here_usd: float | None = None,
    others_usd: float = 0.0,
) -> Message:
    """Spend this month: the shared total, then this channel's runs (estimate next to
    actual, by person), and every other channel as one sum with no ids, models or names.

    `rows` are this channel's paid runs; `here_usd` is this channel's committed spend
    (runs, evaluations, chats), `others_usd` that of all other channels together.
    """
    head = f"Spend in {month}: {money(spent_usd)}" + (
        f" of {money(budget_usd)} ({money(max(budget_usd - spent_usd, 0))} left)"
        if budget_usd is not None
        else " (no monthly cap)"
    )
    if here_usd is not None:
        head += f"\nThis channel: {money(here_usd)}. Other channels together: {money(others_usd)}."
    if not rows:
        text = head + "\nNo paid runs in this channel this month."
        return Message(text, [_section(text)], in_channel=True)
    lines = []
    people: dict[str, float] = {}
    for r in rows:
        actual = "—" if r.actual_usd is None else money(r.actual_usd)
        lines.append(
            f"• {r.id} {r.status} {r.provider} {escape(r.model)}: estimate {money(r.estimate_usd or 0)}, actual {actual} (<@{r.requested_by}>)"
        )
        counted = r.actual_usd if r.actual_usd is not None else (r.estimate_usd or 0)
        people[r.requested_by] = people.get(r.requested_by, 0.0) + counted
    by_person = ", ".join(
        f"<@{u}> {money(v)}" for u, v in sorted(people.items(), key=lambda kv: -kv[1])
    )
    text = f"{head}\nBy run:\n" + "\n".join(lines) + f"\nBy person: {by_person}"
    return Message(text, [_section(text)], in_channel=True)


def advise_modal(channel: str) -> dict:
    from trainers.advise import PROBLEMS, TRIED

    def options(items: dict[str, str]) -> list[dict]:
        return [
            {"text": {"type": "plain_text", "text": label[:75]}, "value": key}
            for key, label in items.items()
        ]

    def number(block_id: str, label: str, hint: str) -> dict:
        return {
            "type": "input",
            "block_id": block_id,
            "label": {"type": "plain_text", "text": label},
            "hint": {"type": "plain_text", "text": hint},
            "element": {
                "type": "number_input",
                "is_decimal_allowed": False,
                "action_id": block_id,
                "min_value": "0",
            },
        }

    return {
        "type": "modal",
        "callback_id": "advise",
        "private_metadata": channel,
        "title": {"type": "plain_text", "text": "Should we fine-tune?"},
        "submit": {"type": "plain_text", "text": "Advise me"},
        "blocks": [
            {
                "type": "input",
                "block_id": "problems",
                "label": {"type": "plain_text", "text": "What is wrong today?"},
                "element": {
                    "type": "checkboxes",
                    "action_id": "problems",
                    "options": options(PROBLEMS),
                },
            },
            number("calls_per_day", "Calls a day", "How often the model is called in production"),
            number("good_examples", "Good examples you have", "Reviewed input/output pairs"),
            {
                "type": "input",
                "block_id": "tried",
                "optional": True,
                "label": {"type": "plain_text", "text": "What have you tried?"},
                "element": {"type": "checkboxes", "action_id": "tried", "options": options(TRIED)},
            },
        ],
    }


def advice(advice, user: str | None = None) -> Message:
    lines = advice.lines()
    head = f"<@{user}> here is what I'd do:" if user else "Here is what I'd do:"
    text = head + "\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


# --- runs ------------------------------------------------------------------------

_STATE_WORDS = {
    "pending_approval": "⏳ Waiting for approval",
    "approved": "✅ Approved, starting",
    "queued": "✅ Approved, submitting",
    "running": "🏃 Running",
    "rejected": "🚫 Rejected",
    "expired": "⌛ Expired: nobody decided in time",
    "cancelled": "✋ Cancelled",
    "succeeded": "🎉 Succeeded",
    "failed": "❌ Failed",
}


def _plan_lines(run) -> list[str]:
    plan = run.plan_json or {}
    est = plan.get("estimate", {})
    hyper = [f"epochs {plan.get('epochs')}{' (auto)' if plan.get('epochs_auto') else ''}"]
    labels = (
        ("lr_mult", "lr ×"), ("lr", "lr "), ("batch", "batch "), ("suffix", "suffix "),
        ("r", "r "), ("alpha", "alpha "), ("targets", "targets "), ("max_length", "max_length "),
    )  # fmt: skip
    for key, label in labels:
        if plan.get(key) is not None:
            hyper.append(f"{label}{escape(plan[key])}")
    if plan.get("qlora"):
        hyper.append("QLoRA 4-bit")
    if plan.get("merge"):
        hyper.append("merged model too")
    held = (
        f"eval set {escape(plan['eval_dataset_id'])}"
        if plan.get("eval_dataset_id")
        else f"{int((plan.get('split') or 0) * 100)}% held out for evaluation"
    )
    if run.provider == "eval":
        parts = ["base and tuned answers"]
        if plan.get("teacher"):
            parts.append(f"the teacher {escape(plan['teacher'])}")
        if plan.get("judge"):
            parts.append("the LLM judge")
        return [
            f"Plan {run.plan_hash}: evaluate {plan.get('target_run')} on "
            f"{plan.get('examples', 0):,} held-out examples — {', '.join(parts)}",
            f"Estimate: at most {money(run.estimate_usd or 0)} (every answer at its token limit)",
        ]
    if run.provider == "distill":
        return [
            f"Plan {run.plan_hash}: distil {run.dataset_id} with teacher {escape(run.model)} — "
            f"{plan.get('prompts', 0):,} prompts"
            + (
                f", system prompt “{escape(_clip(plan['system'], 80))}”"
                if plan.get("system")
                else ""
            ),
            f"Estimate: {est.get('input_tokens', 0):,} input tokens exactly + at most "
            f"{est.get('output_tokens', 0):,} output tokens ({plan.get('max_tokens', 1024):,} an "
            f"answer), at most {money(run.estimate_usd or 0)}",
        ]
    if run.provider == "local":
        cost = (
            f"Estimate: {est.get('tokens', 0):,} training tokens, {_duration(est.get('gpu_hours', 0))} "
            f"on one 80 GB GPU for a ~{est.get('params_billions', 1):g}B model; no API cost"
        )
    else:
        cost = f"Estimate: {est.get('billed_tokens', 0):,} billed tokens, {money(run.estimate_usd or 0)}"
    return [
        f"Plan {run.plan_hash}: {run.provider} {escape(run.model)} on {run.dataset_id} — {', '.join(hyper)}; {held}",
        cost,
    ]


def approval_card(run, tally, *, approvers, budget, committed_usd, reasons=()) -> Message:
    """The request card: plan, estimate, budget, who decides, and the buttons while open."""
    state = _STATE_WORDS.get(run.status, run.status)
    lines = [f"*{run.id}* requested by <@{run.requested_by}> — {state}", *_plan_lines(run)]
    if budget is not None:
        left = budget - committed_usd
        lines.append(
            f"Budget this month: {money(committed_usd)} committed of {money(budget)}, {money(max(left, 0))} left"
        )
    who = ", ".join(f"<@{a}>" for a in approvers) or "nobody"
    lines.append(f"Approvals: {len(tally.approvals)} of {tally.needed} (from {who})")
    if tally.approvals:
        lines.append("Approved by " + ", ".join(f"<@{u}>" for u in tally.approvals))
    if (run.plan_json or {}).get("secret_hold"):
        if tally.overridden_by:
            lines.append(
                f"⚠️ Possible secrets in the data: sending anyway, overridden by <@{tally.overridden_by}>"
            )
        else:
            lines.append(
                "⚠️ The data may hold secrets: an approver must override that before it goes to OpenAI"
            )
    if tally.rejected_by:
        lines.append(
            f"Rejected by <@{tally.rejected_by}>" + (f": {escape(reasons[0])}" if reasons else "")
        )
    if run.status == "pending_approval" and run.expires_at:
        lines.append(f"Expires {run.expires_at:%Y-%m-%d %H:%M} UTC")
    text = "\n".join(lines)
    blocks = [_section(text)]
    if run.status == "pending_approval":
        buttons = [
            {
                "type": "button",
                "action_id": "approve_run",
                "text": {"type": "plain_text", "text": "Approve"},
                "style": "primary",
                "value": run.id,
            },
            {
                "type": "button",
                "action_id": "reject_run",
                "text": {"type": "plain_text", "text": "Reject"},
                "style": "danger",
                "value": run.id,
            },
        ]
        if (run.plan_json or {}).get("secret_hold") and not tally.overridden_by:
            buttons.append(
                {
                    "type": "button",
                    "action_id": "override_secret",
                    "text": {"type": "plain_text", "text": "Send despite secrets"},
                    "value": run.id,
                    "confirm": {
                        "title": {"type": "plain_text", "text": "Send possible secrets?"},
                        "text": {
                            "type": "mrkdwn",
                            "text": "The data may contain credentials. They will be uploaded to OpenAI. This is audited.",
                        },
                        "confirm": {"type": "plain_text", "text": "Send anyway"},
                        "deny": {"type": "plain_text", "text": "Cancel"},
                    },
                }
            )
        blocks.append({"type": "actions", "block_id": f"decide_{run.id}", "elements": buttons})
    return Message(text, blocks)


def reject_modal(run_id: str) -> dict:
    return {
        "type": "modal",
        "callback_id": "reject_reason",
        "private_metadata": run_id,
        "title": {"type": "plain_text", "text": f"Reject {run_id}"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "input",
                "block_id": "reason",
                "label": {"type": "plain_text", "text": "Why? The requester sees this."},
                "element": {
                    "type": "plain_text_input",
                    "action_id": "reason",
                    "multiline": True,
                    "max_length": 500,
                },
            }
        ],
    }


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def _steps(run, state) -> list[str]:
    """The start every progress line shares: run, status, bar, step, loss."""
    parts = [f"{run.id} {state.status}"]
    if state.total_steps:
        step = state.step or 0
        parts.append(f"{_bar(step / state.total_steps)} step {step:,}/{state.total_steps:,}")
    if state.train_loss is not None:
        parts.append(f"loss {state.train_loss:.4f}")
    return parts


def progress(run, state) -> Message:
    """The one progress message per OpenAI run, edited in place."""
    if state is None:
        text = (
            f"{run.id}: submitted to OpenAI as {escape(run.external_id)}; waiting for it to start."
        )
        return Message(text, [_section(text)])
    parts = _steps(run, state)
    if state.trained_tokens:
        parts.append(f"{state.trained_tokens:,} tokens")
    if state.estimated_finish:
        parts.append(f"ETA {dt_text(state.estimated_finish)}")
    text = " · ".join(parts)
    return Message(text, [_section(text)])


def dt_text(value) -> str:
    import datetime as dt

    if isinstance(value, int | float):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    return f"{value:%H:%M} UTC"


def run_result(run) -> Message:
    """Posted once when a run ends; mentions the requester."""
    data = run.result_json or {}
    head = f"<@{run.requested_by}> {run.id} {_STATE_WORDS.get(run.status, run.status).lower()}"
    lines = [head]
    if run.status == "succeeded":
        lines.append(f"Model: `{escape(data.get('fine_tuned_model'))}`")
        if data.get("trained_tokens"):
            lines.append(
                f"Trained tokens: {data['trained_tokens']:,} (estimated {run.plan_json['estimate']['billed_tokens']:,})"
            )
        lines.append(
            f"Cost: {money(run.actual_usd or 0)} (estimated {money(run.estimate_usd or 0)})"
        )
    if run.status != "succeeded" and run.actual_usd:
        lines.append(f"Spent: {money(run.actual_usd)} (approved {money(run.estimate_usd or 0)})")
    if run.error:
        who = "OpenAI said" if run.provider == "openai" and run.external_id else "Why"
        lines.append(f"{who}: {escape(failure_line(run.error))}")
    text = "\n".join(lines)
    return Message(text, [_section(text)])


def audit_log(entries, run_id: str | None) -> Message:
    if not entries:
        text = "Nothing in the audit log" + (
            f" for {run_id}." if run_id else " for this channel's runs."
        )
        return Message(text, [_section(text)], in_channel=True)
    lines = []
    for e in entries:
        who = "tunebot" if e.actor == "tunebot" else f"<@{e.actor}>"
        target = e.run_id or e.dataset_id or ""
        plan = f" plan {e.plan_hash}" if e.plan_hash else ""
        lines.append(f"• {e.created_at:%Y-%m-%d %H:%M:%S} {who} {e.action} {target}{plan}")
    text = "Audit log (newest first):\n" + "\n".join(lines)
    return Message(text, [_section(text)], in_channel=True)


def local_accepted(run) -> Message:
    text = "\n".join([f"{run.id} accepted: local runs need no approval here.", *_plan_lines(run)])
    return Message(text, [_section(text)])


def queued(run, position: int, total: int) -> Message:
    text = f"{run.id} queued for the local GPU: position {position} of {total}."
    return Message(text, [_section(text)])


def local_progress(run, state) -> Message:
    """The local run's progress message, edited in place."""
    if state is None:
        text = f"{run.id} starting: loading {escape(run.model)}…"
        return Message(text, [_section(text)])
    parts = _steps(run, state)
    if state.tokens_per_second:
        parts.append(f"{state.tokens_per_second:,.0f} tokens/s")
    if state.eta_seconds and state.status == "running":
        parts.append(f"ETA {_duration(state.eta_seconds / 3600)}")
    text = " · ".join(parts)
    return Message(text, [_section(text)])


def local_result(run, state) -> Message:
    """Posted once when a local run ends; mentions the requester."""
    head = f"<@{run.requested_by}> {run.id} {_STATE_WORDS.get(run.status, run.status).lower()}"
    lines = [head]
    metrics = state.output.get("metrics") or {}
    if run.status == "succeeded":
        lines.append(f"Adapter: `{state.output.get('adapter_dir')}`")
        if state.output.get("merged_dir"):
            lines.append(f"Merged model: `{state.output['merged_dir']}`")
        facts = []
        if metrics.get("train_loss") is not None:
            facts.append(f"final train loss {metrics['train_loss']:.4f}")
        if metrics.get("eval_loss") is not None:
            facts.append(f"held-out loss {metrics['eval_loss']:.4f}")
        if metrics.get("tokens_per_second"):
            facts.append(f"{metrics['tokens_per_second']:,.0f} tokens/s")
        if facts:
            lines.append(", ".join(facts).capitalize())
    elif run.status == "cancelled":
        lines.append(f"A checkpoint was saved: `/finetune resume {run.id}` continues from it.")
    if run.status == "failed":
        # In words: what failed, the exception, what to do. The log goes up as a file.
        lines.append(
            f"What failed: the local training of `{escape(short_paths(run.model))}` on {run.dataset_id} "
            "stopped before the end."
        )
    if run.error or run.status == "failed":
        lines.append(f"Error: {escape(failure_line(run.error, state.log_tail))}")
        lines.append(
            f"Next: `/finetune resume {run.id}` continues from the newest complete checkpoint, "
            "if any; if the error is in the data or the options, fix them and "
            "`/finetune train` again."
        )
    if state.log_tail and run.status == "failed":
        lines.append(f"The last lines of the worker's log are in this thread as {log_name(run)}.")
    text = "\n".join(lines)
    return Message(text, [_section(text)])


def log_name(run) -> str:
    """The file name a failed local run's log tail is uploaded under."""
    return f"worker-{run.id}.log"


def _clip(text: str, limit: int = 180) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def eval_summary(
    run, result, *, cost_usd: float, prices_per_1k: Mapping[str, Mapping] | None = None
) -> Message:
    """Base vs tuned on held-out data: scores, win/tie/loss, the five worst examples.

    With a teacher (a distilled dataset's), its column, the share of its
    score the tuned student kept, and the price of 1,000 calls to each model.
    """
    n = len(result.rows)
    teacher = result.teacher_model
    contenders = (
        f"teacher `{escape(teacher)}` vs base `{escape(run.model)}` vs tuned student"
        if teacher
        else f"base `{escape(run.model)}` vs tuned"
    )
    lines = [f"{run.id} evaluation: {contenders} on {n:,} held-out examples"]
    header = f"{'scorer':<10} {'base':>6} {'tuned':>6} {'delta':>7}"
    table = [header + (f" {'teacher':>7}" if teacher else "")]
    for s in result.summaries:
        if s.base is None and s.tuned is None:
            continue
        mark = "  ◀ primary" if s.name == result.primary else ""
        third = ""
        if teacher:
            third = f" {s.teacher:>7.3f}" if s.teacher is not None else f" {'–':>7}"
        table.append(
            f"{s.name:<10} {s.base or 0:>6.3f} {s.tuned or 0:>6.3f} {(s.delta or 0):>+7.3f}{third}{mark}"
        )
    source = (
        "pairwise judge"
        if result.outcome_source == "pairwise"
        else f"{result.outcome_source}, ties within 0.02"
    )
    verdict = f"Tuned vs base: {result.wins} wins · {result.ties} ties · {result.losses} losses ({source})"
    extras = []
    kept = result.kept()
    if kept is not None:
        primary = result.summary()
        extras.append(
            f"the tuned student kept {kept:.0%} of the teacher's {result.primary} "
            f"(base: {(primary.base or 0) / primary.teacher:.0%})"
        )
    if prices_per_1k:
        extras.append("per 1,000 calls like these: " + _prices_line(prices_per_1k))
    if result.invalid_judge:
        extras.append(f"{result.invalid_judge} judge answer(s) were unparseable and not counted")
    if result.base_errors or result.tuned_errors or result.teacher_errors:
        failed = f"{result.base_errors} base and {result.tuned_errors} tuned"
        if teacher:
            failed = f"{result.base_errors} base, {result.tuned_errors} tuned and {result.teacher_errors} teacher"
        extras.append(f"generation failed for {failed} answer(s)")
    extras.append(
        f"evaluation cost {money(cost_usd)}"
        + (f" (judge {result.judge_model})" if result.judge_model else " (offline scorers)")
    )
    worst = result.worst(5)
    worst_lines = [
        f"{i}. Prompt: {escape(_clip(w.prompt))}\n   Expected: {escape(_clip(w.expected))}\n"
        f"   Got: {escape(_clip(w.actual))}\n   Why: {escape(_clip(w.reason, 240))}"
        for i, w in enumerate(worst, 1)
    ]
    text = "\n".join(
        [*lines, *table, verdict, *extras]
        + (
            [f"The {len(worst)} worst (lowest tuned {result.primary}):", *worst_lines]
            if worst
            else []
        )
    )
    blocks = [
        _section(f"*{lines[0]}*"),
        _section("```" + "\n".join(table) + "```"),
        _section(verdict + "\n" + "\n".join(f"• {e}" for e in extras)),
    ]
    if worst:
        blocks.append(
            _section(
                f"*The {len(worst)} worst (lowest tuned {result.primary})*\n"
                + "\n".join(worst_lines)
            )
        )
    return Message(text, blocks)


def _prices_line(prices: Mapping[str, Mapping]) -> str:
    parts = []
    for role in ("teacher", "base", "tuned"):
        entry = prices.get(role)
        if entry is None:
            continue
        usd = entry.get("usd")
        if usd is not None:
            shown = money(usd)
        elif entry.get("self_hosted"):
            shown = "self-hosted, no per-call price"
        else:
            shown = "no price in the price table"
        parts.append(f"{role} `{escape(entry.get('model'))}` {shown}")
    return " · ".join(parts)


def distilled(run, dataset_id: str, examples: int, failed, cost_usd: float) -> Message:
    lines = [
        f"<@{run.requested_by}> {run.id} done: {escape(run.model)} wrote {examples:,} examples → {dataset_id} "
        f"(from {run.dataset_id}), for {money(cost_usd)} (estimated {money(run.estimate_usd or 0)})"
    ]
    if failed:
        shown = "; ".join(f"line {n}: {escape(_clip(why, 80))}" for n, why in failed[:10])
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        lines.append(f"⚠️ The teacher failed on {len(failed)} prompt(s): {shown}{more}")
    lines.append(
        f"Next: `/finetune train {dataset_id} provider=openai model=gpt-4o-mini` or "
        f"`/finetune train {dataset_id} provider=local` trains a student on it."
    )
    text = "\n".join(lines)
    return Message(text, [_section(text)])


def side_by_side(run, prompt: str, base: str, tuned: str) -> Message:
    text = (
        f"{run.id} — prompt: {escape(_clip(prompt, 300))}\n"
        f"*Base* ({escape(run.model)}):\n{escape(_clip(base, 1200))}\n"
        f"*Tuned*:\n{escape(_clip(tuned, 1200))}"
    )
    return Message(text, [_section(text)])
