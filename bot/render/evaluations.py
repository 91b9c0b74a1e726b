"""Evaluations: base vs tuned (and a teacher) on held-out data, and a chat's
two answers side by side."""

from __future__ import annotations

from collections.abc import Mapping

from bot.render.text import Message, clip, escape, money, section, short_paths


def eval_summary(
    run,
    result,
    *,
    cost_usd: float,
    prices_per_1k: Mapping[str, Mapping] | None = None,
    local: str | None = None,
    base_name: str | None = None,
) -> Message:
    """Base vs tuned on held-out data: scores, win/tie/loss, the five worst examples.

    With a teacher (a distilled dataset's), its column, the share of its
    score the tuned student kept, and the price of 1,000 calls to each model.
    `local`: a hosted run evaluated here from its downloaded adapter; the line
    that says so (bot/downloaded.py `LocalCopy.label`); `base_name` the base
    model that answered when it is not the run's `model`.
    """
    n = len(result.rows)
    teacher = result.teacher_model
    base = escape(short_paths(base_name or run.model))
    contenders = (
        f"teacher `{escape(teacher)}` vs base `{base}` vs tuned student"
        if teacher
        else f"base `{base}` vs tuned"
    )
    lines = [f"{run.id} evaluation: {contenders} on {n:,} held-out examples"]
    if local:
        lines[0] += " (run locally)"
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
    extras = [escape(local)] if local else []
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
        f"{i}. Prompt: {escape(clip(w.prompt))}\n   Expected: {escape(clip(w.expected))}\n"
        f"   Got: {escape(clip(w.actual))}\n   Why: {escape(clip(w.reason, 240))}"
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
        section(f"*{lines[0]}*"),
        section("```" + "\n".join(table) + "```"),
        section(verdict + "\n" + "\n".join(f"• {e}" for e in extras)),
    ]
    if worst:
        blocks.append(
            section(
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


def side_by_side(
    run,
    prompt: str,
    base: str,
    tuned: str,
    *,
    base_name: str | None = None,
    local: str | None = None,
) -> Message:
    """Base and tuned answers to one prompt; `local` says where they ran when not
    where the run trained (a downloaded adapter: bot/downloaded.py)."""
    text = (
        f"{run.id} — prompt: {escape(clip(prompt, 300))}\n"
        f"*Base* ({escape(short_paths(base_name or run.model))}):\n{escape(clip(base, 1200))}\n"
        f"*Tuned*:\n{escape(clip(tuned, 1200))}" + (f"\n_{escape(local)}_" if local else "")
    )
    return Message(text, [section(text)])
