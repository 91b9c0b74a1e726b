"""Lists answered to a command: datasets, runs, the month's budget, the audit log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.render.text import Message, escape, money, plural, section
from bot.results import RunResult


def datasets_list(datasets: Sequence) -> Message:
    if not datasets:
        return Message("No datasets in this channel yet: drop a .jsonl file here.", in_channel=True)
    lines = []
    for d in datasets:
        if d.examples is None:
            state = "still being checked"
        else:
            state = (
                f"{d.valid_examples:,}/{d.examples:,} valid, {plural(d.errors or 0, 'error')}, "
                f"{d.tokens_total or 0:,} tokens"
            )
        lines.append(
            f"• {d.id} — {escape(d.name)} by <@{d.user}>, {d.created_at:%Y-%m-%d %H:%M} UTC: {state}"
        )
    text = "Datasets in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [section(text)], in_channel=True)


def runs_list(runs: Sequence) -> Message:
    if not runs:
        text = "No training runs in this channel yet: `/finetune train` starts one."
        return Message(text, [section(text)], in_channel=True)
    lines = [
        f"• {r.id} — {r.provider} {escape(r.model)} on {r.dataset_id}: {r.status} (by <@{r.requested_by}>)"
        + _serving_end(r)
        for r in runs
    ]
    text = "Training runs in this channel (newest first):\n" + "\n".join(lines)
    return Message(text, [section(text)], in_channel=True)


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
        return Message(text, [section(text)], in_channel=True)
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
    return Message(text, [section(text)], in_channel=True)


def audit_log(entries, run_id: str | None) -> Message:
    if not entries:
        text = "Nothing in the audit log" + (
            f" for {run_id}." if run_id else " for this channel's runs."
        )
        return Message(text, [section(text)], in_channel=True)
    lines = []
    for e in entries:
        who = "tunebot" if e.actor == "tunebot" else f"<@{e.actor}>"
        target = e.run_id or e.dataset_id or ""
        plan = f" plan {e.plan_hash}" if e.plan_hash else ""
        lines.append(f"• {e.created_at:%Y-%m-%d %H:%M:%S} {who} {e.action} {target}{plan}")
    text = "Audit log (newest first):\n" + "\n".join(lines)
    return Message(text, [section(text)], in_channel=True)


def _serving_end(run) -> str:
    """`; its model stops serving on …` for a fine-tuned model whose end is known."""
    from trainers.retirement import serving_ends

    model = RunResult.of(run).fine_tuned_model
    ends = serving_ends(model) if model and run.status == "succeeded" else None
    return f"; its model stops serving on {ends:%Y-%m-%d}" if ends else ""


def providers_list(providers: Mapping, environ: Mapping[str, str] | None = None) -> Message:
    """Where runs can train: OpenAI and local always, then the providers file's, each
    with its kind, models (training price per 1M tokens, context) and whether its key is
    set. `environ` defaults to the process environment; keys are never shown."""
    import os

    env = os.environ if environ is None else environ
    key = "key set" if env.get("OPENAI_API_KEY") else "OPENAI_API_KEY not set"
    lines = [
        f"• openai — OpenAI fine-tuning ({key}); new jobs until 2027-01-06",
        "• local — LoRA / QLoRA on this machine's GPUs (`tunebot models`)",
    ]
    for name, p in sorted(providers.items()):
        key = "key set" if env.get(p.api_key_env) else f"{p.api_key_env} not set"
        where = f" at {p.base_url}" if p.base_url else ""
        models = ", ".join(
            f"{escape(m.name)} (${m.training_per_1m:g}/1M, {m.context:,} tokens)" for m in p.models
        )
        read = f"; prices read {p.prices_read}" if p.prices_read else ""
        lines.append(
            f"• {escape(name)} — {p.kind}{escape(where)} ({key}): {models or 'no models listed'}{read}"
        )
    text = "Providers (TUNEBOT_PROVIDERS adds more):\n" + "\n".join(lines)
    return Message(text, [section(text)], in_channel=False)
