"""Modal submissions: a rejection's reason, and the advise questions."""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, BoltContext

from bot import render
from bot.listeners.common import NOT_SERVED, served, workflow_of
from bot.render.actions import (
    CALLS_PER_DAY,
    GOOD_EXAMPLES,
    PROBLEMS,
    REASON,
    TRIED,
)


def on_reject_reason(
    ack: Ack, body: dict[str, Any], view: dict[str, Any], context: BoltContext
) -> None:
    workflow = workflow_of(context)
    user, run_id = body["user"]["id"], view.get("private_metadata", "")
    run = workflow.store.find_run(run_id)
    channel = run.channel if run else ""
    if run is not None and not served(workflow, channel, "reject", user, run_id):
        ack(response_action="errors", errors={REASON: f"Not counted: {NOT_SERVED}."})
        return
    ack()
    values = view.get("state", {}).get("values", {})
    reason = ((values.get(REASON) or {}).get(REASON) or {}).get("value")
    workflow.decide_later(run_id, user, "reject", channel, reason=reason)


def on_advise(ack: Ack, body: dict[str, Any], view: dict[str, Any], context: BoltContext) -> None:
    from trainers.advise import Situation, advise, parse_count

    workflow = workflow_of(context)
    user, channel = body["user"]["id"], view.get("private_metadata", "")
    if not served(workflow, channel, "advise", user):
        ack(response_action="errors", errors={PROBLEMS: f"{NOT_SERVED}."})
        return
    values = view.get("state", {}).get("values", {})

    def picked(block: str) -> frozenset[str]:
        element = (values.get(block) or {}).get(block) or {}
        options = element.get("selected_options") or []
        return frozenset(str(o.get("value")) for o in options if isinstance(o, dict))

    # Each number is parsed strictly; a bad one is an error next to its own field.
    counts: dict[str, int] = {}
    errors: dict[str, str] = {}
    for block in (CALLS_PER_DAY, GOOD_EXAMPLES):
        try:
            counts[block] = parse_count(((values.get(block) or {}).get(block) or {}).get("value"))
        except ValueError as exc:
            errors[block] = str(exc)
    if errors:
        ack(response_action="errors", errors=errors)
        return
    try:
        situation = Situation(
            picked(PROBLEMS), counts[CALLS_PER_DAY], counts[GOOD_EXAMPLES], picked(TRIED)
        )
    except ValueError as exc:
        ack(response_action="errors", errors={PROBLEMS: str(exc)})
        return
    ack()
    message = render.advice(advise(situation), user)
    workflow.submit("posting advice", lambda: workflow.post(channel, None, message), channel, None)
