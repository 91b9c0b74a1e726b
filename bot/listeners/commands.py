"""The slash command: parsed and answered in the ack, within Slack's 3 seconds."""

from __future__ import annotations

from typing import Any

from slack_bolt import Ack, BoltContext
from slack_sdk import WebClient

from bot import render
from bot.commands import CommandError, parse
from bot.errors import UserError
from bot.listeners.common import log, workflow_of

COMMAND = "/finetune"


def on_finetune(ack: Ack, command: dict[str, Any], client: WebClient, context: BoltContext) -> None:
    workflow = workflow_of(context)
    channel, user = command.get("channel_id", ""), command.get("user_id", "")
    try:
        parsed = parse(command.get("text", ""))
        if parsed.name == "advise" and workflow.settings.serves(channel):
            # A modal must open within the trigger's 3 seconds: here, not in a job.
            # (In a channel not served, workflow.command answers with the refusal.)
            client.views_open(trigger_id=command["trigger_id"], view=render.advise_modal(channel))
            ack()
            return
        message = workflow.command(parsed, channel, user)
    except (CommandError, UserError) as exc:
        message = render.error(getattr(exc, "summary", str(exc)), getattr(exc, "detail", None))
    except Exception as exc:  # the ack must still go out: Slack shows a bare error otherwise
        message = workflow.unexpected(exc, f"answering /finetune {command.get('text', '')!r}")
    log.info("%s %s by %s in %s", COMMAND, command.get("text", "") or "(help)", user, channel)
    ack(
        response_type="in_channel" if message.in_channel else "ephemeral",
        text=message.text,
        blocks=message.blocks or None,
    )
