"""A run's own messages: the approval card and its buttons, the progress line
edited in place, the queue position, the result posted once, the status line."""

from __future__ import annotations

from bot.render.actions import APPROVE_RUN, OVERRIDE_SECRET, REJECT_RUN
from bot.render.text import (
    Message,
    clip,
    duration,
    escape,
    failure_line,
    money,
    section,
    short_paths,
)
from bot.results import RunResult

STATE_WORDS = {
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
        ("gpus", "gpus "), ("nodes", "nodes "),  # a Ray run's resources: the card says them
    )  # fmt: skip
    for key, label in labels:
        if plan.get(key) is not None:
            hyper.append(f"{label}{escape(plan[key])}")
    if plan.get("dropout") is not None:
        hyper.append(f"dropout {escape(plan['dropout'])}")
    if plan.get("kind") == "together":
        hyper.insert(0, "LoRA" if plan.get("lora", True) else "full fine-tuning")
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
                f", system prompt “{escape(clip(plan['system'], 80))}”"
                if plan.get("system")
                else ""
            ),
            f"Estimate: {est.get('input_tokens', 0):,} input tokens exactly + at most "
            f"{est.get('output_tokens', 0):,} output tokens ({plan.get('max_tokens', 1024):,} an "
            f"answer), at most {money(run.estimate_usd or 0)}",
        ]
    if run.provider == "local":
        cost = (
            f"Estimate: {est.get('tokens', 0):,} training tokens, {duration(est.get('gpu_hours', 0))} "
            f"on one 80 GB GPU for a ~{est.get('params_billions', 1):g}B model; no API cost"
        )
    else:
        cost = f"Estimate: {est.get('billed_tokens', 0):,} billed tokens, {money(run.estimate_usd or 0)}"
        if plan.get("prices_source"):  # a hosted provider beside OpenAI: say whose prices
            cost += (
                f" at {money(est.get('price_per_1m', 0))} per 1M tokens (prices from "
                f"{escape(plan['prices_source'])}, read {escape(plan.get('prices_read') or 'on an unknown day')})"
            )
    lines = [
        f"Plan {run.plan_hash}: {run.provider} {escape(short_paths(run.model))} on {run.dataset_id} — {', '.join(hyper)}; {held}",
        cost,
    ]
    if plan.get("migrated_from"):  # bot/migrate.py
        lines.append(
            f"Migrates {escape(plan['migrated_from'])}: the same dataset and held-out set; "
            "when it succeeds, both models answer the held-out set and this thread gets the "
            "comparison"
        )
        if plan.get("carried"):
            lines.append("Carried over: " + "; ".join(escape(c) for c in plan["carried"]))
        lines += [f"• Differs: {escape(short_paths(d))}" for d in plan.get("differences", ())]
    return lines


def approval_card(run, tally, *, approvers, budget, committed_usd, reasons=()) -> Message:
    """The request card: plan, estimate, budget, who decides, and the buttons while open."""
    state = STATE_WORDS.get(run.status, run.status)
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
                "⚠️ The data may hold secrets: an approver must override that before it goes to "
                f"{provider_name(run.provider)}"
            )
    if tally.rejected_by:
        lines.append(
            f"Rejected by <@{tally.rejected_by}>" + (f": {escape(reasons[0])}" if reasons else "")
        )
    if run.status == "pending_approval" and run.expires_at:
        lines.append(f"Expires {run.expires_at:%Y-%m-%d %H:%M} UTC")
    text = "\n".join(lines)
    blocks = [section(text)]
    if run.status == "pending_approval":
        held = bool((run.plan_json or {}).get("secret_hold") and not tally.overridden_by)
        blocks.append(_decision_buttons(run, offer_override=held))
    return Message(text, blocks)


def _decision_buttons(run, *, offer_override: bool) -> dict:
    """Approve and Reject, and *Send despite secrets* while a secret hold is not overridden."""
    # slack_sdk's typed blocks, imported here: the CLI renders reports without them.
    from slack_sdk.models.blocks import (
        ActionsBlock,
        ButtonElement,
        ConfirmObject,
        MarkdownTextObject,
        PlainTextObject,
    )

    def plain(text: str) -> PlainTextObject:
        return PlainTextObject(text=text)  # no `emoji` key: the JSON stays as Slack got it

    buttons = [
        ButtonElement(action_id=APPROVE_RUN, text=plain("Approve"), style="primary", value=run.id),
        ButtonElement(action_id=REJECT_RUN, text=plain("Reject"), style="danger", value=run.id),
    ]
    if offer_override:
        buttons.append(
            ButtonElement(
                action_id=OVERRIDE_SECRET,
                text=plain("Send despite secrets"),
                value=run.id,
                confirm=ConfirmObject(
                    title=plain("Send possible secrets?"),
                    text=MarkdownTextObject(
                        text="The data may contain credentials. They will be uploaded to "
                        f"{provider_name(run.provider)}. This is audited."
                    ),
                    confirm=plain("Send anyway"),
                    deny=plain("Cancel"),
                ),
            )
        )
    return ActionsBlock(block_id=f"decide_{run.id}", elements=buttons).to_dict()


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


# How people write the hosted providers tunebot knows by name.
PROVIDER_NAMES = {"openai": "OpenAI", "together": "Together AI"}


def provider_name(provider: str) -> str:
    """ "OpenAI", "Together AI", or a providers-file name as it is written."""
    return PROVIDER_NAMES.get(provider, provider)


def progress(run, state, last_event: str | None = None) -> Message:
    """The one progress message per hosted run, edited in place; `last_event` is the
    newest line of the provider's job log (Together's events, OpenAI's)."""
    if state is None:
        text = (
            f"{run.id}: submitted to {provider_name(run.provider)} as "
            f"{escape(run.external_id)}; waiting for it to start."
        )
        return Message(text, [section(text)])
    parts = _steps(run, state)
    if state.trained_tokens:
        parts.append(f"{state.trained_tokens:,} tokens")
    if state.estimated_finish:
        parts.append(f"ETA {dt_text(state.estimated_finish)}")
    if last_event:
        parts.append(f"“{escape(clip(last_event, 120))}”")
    text = " · ".join(parts)
    return Message(text, [section(text)])


def dt_text(value) -> str:
    import datetime as dt

    if isinstance(value, int | float):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    return f"{value:%H:%M} UTC"


def run_result(run) -> Message:
    """Posted once when a run ends; mentions the requester."""
    data = RunResult.of(run)
    head = f"<@{run.requested_by}> {run.id} {STATE_WORDS.get(run.status, run.status).lower()}"
    lines = [head]
    if run.status == "succeeded":
        lines.append(f"Model: `{escape(data.fine_tuned_model)}`")
        if data.trained_tokens:
            lines.append(
                f"Trained tokens: {data.trained_tokens:,} (estimated {run.plan_json['estimate']['billed_tokens']:,})"
            )
        lines.append(
            f"Cost: {money(run.actual_usd or 0)} (estimated {money(run.estimate_usd or 0)})"
        )
    if run.status != "succeeded" and run.actual_usd:
        lines.append(f"Spent: {money(run.actual_usd)} (approved {money(run.estimate_usd or 0)})")
    if run.error:
        hosted = run.provider not in ("local", "distill", "eval") and run.external_id
        who = f"{provider_name(run.provider)} said" if hosted else "Why"
        lines.append(f"{who}: {escape(failure_line(run.error))}")
    if run.status == "succeeded" and (run.plan_json or {}).get("kind") == "together":
        lines.append(
            f"Next: `/finetune eval {run.id}` (base vs tuned through Together's chat "
            f'completions), `/finetune chat {run.id} "<prompt>"`, and `/finetune download '
            f"{run.id}` (the LoRA adapter; `merged` for the merged model) into tunebot's home "
            "for local evaluation, chat and serving."
            if (run.plan_json or {}).get("lora", True)
            else f'Next: `/finetune eval {run.id}`, `/finetune chat {run.id} "<prompt>"`, and '
            f"`/finetune download {run.id}` (the full model's weights) into tunebot's home."
        )
    text = "\n".join(lines)
    return Message(text, [section(text)])


def run_status(run) -> Message:
    text = (
        f"{run.id}: {run.status} — {run.provider} {escape(short_paths(run.model))} on {run.dataset_id}, "
        f"requested by <@{run.requested_by}> at {run.created_at:%Y-%m-%d %H:%M} UTC"
    )
    if run.error:
        text += f"\nError: {escape(failure_line(run.error))}"
    return Message(text, [section(text)], in_channel=True)


def local_accepted(run) -> Message:
    text = "\n".join([f"{run.id} accepted: local runs need no approval here.", *_plan_lines(run)])
    return Message(text, [section(text)])


def queued(run, position: int, total: int, *, waiting: str | None = None) -> Message:
    """`waiting`: what the run waits for besides its turn ("waiting for 2 GPUs (…)")."""
    text = f"{run.id} queued for the local GPU: position {position} of {total}"
    text += f", {waiting}." if waiting else "."
    return Message(text, [section(text)])


def local_progress(run, state, *, waiting: str | None = None) -> Message:
    """The local run's progress message, edited in place; `waiting`: what a job the Ray
    cluster has not started yet waits for ("waiting for 2 GPUs (…)")."""
    if state is None:
        text = f"{run.id} starting: loading {escape(short_paths(run.model))}…"
        return Message(text, [section(text)])
    if waiting and state.step is None:
        text = f"{run.id} submitted to the Ray cluster, {waiting}."
        return Message(text, [section(text)])
    parts = _steps(run, state)
    if state.tokens_per_second:
        parts.append(f"{state.tokens_per_second:,.0f} tokens/s")
    if state.eta_seconds and state.status == "running":
        parts.append(f"ETA {duration(state.eta_seconds / 3600)}")
    text = " · ".join(parts)
    return Message(text, [section(text)])


def ray_unavailable(run, why: str, retry_seconds: float) -> Message:
    """A local run the Ray cluster could not take: it keeps its place in the queue."""
    text = (
        f"{run.id} is waiting for the Ray cluster ({escape(clip(short_paths(why), 200))}); "
        f"it is tried again in {retry_seconds:.0f} s and keeps its place in the queue."
    )
    return Message(text, [section(text)])


def unanswered(run, minutes: int, why: str) -> Message:
    """A running local job whose cluster or artifacts have not answered for `minutes`."""
    text = (
        f"⚠️ {run.id}: no answer about its job for {minutes} minutes ({escape(clip(short_paths(why)))}). "
        f"It may still be training; tunebot keeps asking. `/finetune cancel {run.id}` gives up."
    )
    return Message(text=text, blocks=[section(text)])


def answered_again(run) -> Message:
    """The job of a run whose thread was told of its silence answers again."""
    text = f"{run.id}: its job answers again; progress resumes in the message above."
    return Message(text=text, blocks=[section(text)])


def cancelled_before_start(run) -> Message:
    """A local run cancelled while the Ray cluster still held its job back (no GPUs free)."""
    text = f"{run.id} cancelled before the Ray cluster started it."
    return Message(text, [section(text)])


def local_result(run, state) -> Message:
    """Posted once when a local run ends; mentions the requester."""
    head = f"<@{run.requested_by}> {run.id} {STATE_WORDS.get(run.status, run.status).lower()}"
    lines = [head]
    metrics = state.output.get("metrics") or {}
    if run.status == "succeeded":
        if state.output.get("unreachable"):  # followed from the Ray job's log
            folder = short_paths(str(state.output.get("run_dir") or "").rstrip("/"))
            lines.append(
                f"Adapter: in `{folder}/adapter` under the Ray cluster's TUNEBOT_ARTIFACTS, "
                "which this machine cannot read: it is not copied home, so evaluation and "
                "chat cannot load it here."
            )
        else:
            lines.append(f"Adapter: `{home_path(run, state.output.get('adapter_dir'))}`")
        if state.output.get("merged_dir"):
            lines.append(f"Merged model: `{home_path(run, state.output['merged_dir'])}`")
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
    return Message(text, [section(text)])


def home_path(run, path: str | None) -> str:
    """A run's output folder as Slack may see it: from ``runs/<run>/`` on (its place under
    TUNEBOT_HOME), never the server path before it; another path, its last part."""
    text = str(path or "")
    marker = f"/runs/{run.id}/"
    if marker in text:
        return "runs/" + text.split(marker, 1)[1].join((f"{run.id}/", ""))
    if text.endswith(f"/runs/{run.id}"):
        return f"runs/{run.id}"
    return short_paths(text)


def log_name(run) -> str:
    """The file name a failed local run's log tail is uploaded under."""
    return f"worker-{run.id}.log"


def distilled(run, dataset_id: str, examples: int, failed, cost_usd: float) -> Message:
    lines = [
        f"<@{run.requested_by}> {run.id} done: {escape(run.model)} wrote {examples:,} examples → {dataset_id} "
        f"(from {run.dataset_id}), for {money(cost_usd)} (estimated {money(run.estimate_usd or 0)})"
    ]
    if failed:
        shown = "; ".join(f"line {n}: {escape(clip(why, 80))}" for n, why in failed[:10])
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        lines.append(f"⚠️ The teacher failed on {len(failed)} prompt(s): {shown}{more}")
    lines.append(
        f"Next: `/finetune train {dataset_id} provider=openai model=gpt-4o-mini` or "
        f"`/finetune train {dataset_id} provider=local` trains a student on it."
    )
    text = "\n".join(lines)
    return Message(text, [section(text)])


def retirement_notice(run, model: str, ends, days: int) -> Message:
    """A fine-tuned model's provider stops serving it in `days` days (30, 7 or 1)."""
    from trainers.retirement import SOURCE

    when = "tomorrow" if days <= 1 else f"in {days} days"
    text = (
        f"⚠️ {run.id}'s model `{escape(model)}` stops serving on {ends:%Y-%m-%d} ({when}), "
        f"with every fine-tune of its base model ({SOURCE}); calls to it fail from then on. "
        f"`/finetune migrate {run.id} provider=local` trains it again where it keeps serving, "
        "from the same data and held-out set, and compares the two while this one still "
        "answers."
    )
    return Message(text, [section(text)], in_channel=True)
