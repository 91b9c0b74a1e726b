"""Button clicks on the approval card: Approve, Reject, Send despite secrets."""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, BoltContext
from slack_sdk import WebClient

from bot import render
from bot.listeners.common import NOT_SERVED, served, workflow_of
from bot.render.actions import APPROVE_RUN, CARD_ACTIONS, OVERRIDE_SECRET, REJECT_RUN
from bot.workflow import Workflow

ACTIONS = CARD_ACTIONS
# What each button asks the approval policy (bot.approvals) to count.
DECISIONS = {APPROVE_RUN: "approve", REJECT_RUN: "reject", OVERRIDE_SECRET: "override_secret"}


def on_decision(
    ack: Ack, body: dict[str, Any], action: dict[str, Any], client: WebClient, context: BoltContext
) -> None:
    ack()
    workflow = workflow_of(context)
    user, run_id = body["user"]["id"], action.get("value", "")
    channel = (body.get("channel") or {}).get("id", "")
    decision = DECISIONS[action["action_id"]]
    # The run's own channel decides; a click must come from a served channel too.
    run = workflow.store.find_run(run_id)
    if not (
        (run is None or served(workflow, run.channel, decision, user, run.id))
        and served(workflow, channel, decision, user)
    ):
        workflow.submit(
            f"refusing {user}'s {decision} of {run_id}",
            lambda: _tell(workflow, channel, user, NOT_SERVED),
            "",
            None,
        )
        return
    if decision == "reject" and workflow.runs.click_refusal(run_id, user) is None:
        # The reason comes from a modal; its trigger expires in 3 s, so open it now.
        client.views_open(trigger_id=body["trigger_id"], view=render.reject_modal(run_id))
        return
    # Recorded (pending_work) before Slack hears 200, counted on a job thread.
    workflow.decide_later(run_id, user, decision, channel)


def _tell(workflow: Workflow, channel: str, user: str, refusal: str | None) -> None:
    """A refused click is answered to the clicker alone."""
    if refusal and channel:
        workflow.client.chat_postEphemeral(
            channel=channel, user=user, text=f"⚠️ Not counted: {refusal}."
        )
