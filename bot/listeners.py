"""Thin Slack listeners: parse, ack fast, hand off to the workflow.

Registered in one place (`register`). Nothing here waits on the network or
the CPU: downloads, validation and uploads are the workflow's jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt import Ack, App, BoltContext

from bot import render
from bot.commands import CommandError, parse
from bot.workflow import FileDrop, UserError, Workflow

log = logging.getLogger("tunebot")

COMMAND = "/finetune"
EVENTS = ("message", "file_shared", "app_home_opened")
ACTIONS = ("approve_run", "reject_run", "override_secret")
FILE_SUBTYPES = (None, "file_share", "thread_broadcast")
NOT_SERVED = "tunebot does not serve this channel (see TUNEBOT_CHANNELS)"


def register(app: App, workflow: Workflow) -> None:
    def served(channel: str | None, what: str, user: str, run_id: str | None = None) -> bool:
        """Whether TUNEBOT_CHANNELS lets `what` happen in `channel`; a refusal is logged
        (and audited when it concerns a run), never raised."""
        if workflow.settings.serves(channel):
            return True
        log.warning("refused %s by %s: channel %s is not served", what, user, channel or "(none)")
        if run_id and user:
            workflow.store.audit(
                user, "refused_unserved", run_id=run_id, detail={"what": what, "channel": channel}
            )
        return False

    def on_finetune(ack: Ack, command: dict[str, Any], client) -> None:
        channel, user = command.get("channel_id", ""), command.get("user_id", "")
        try:
            parsed = parse(command.get("text", ""))
            if parsed.name == "advise" and workflow.settings.serves(channel):
                # A modal must open within the trigger's 3 seconds: here, not in a job.
                # (In a channel not served, workflow.command answers with the refusal.)
                client.views_open(
                    trigger_id=command["trigger_id"], view=render.advise_modal(channel)
                )
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

    def on_message(event: dict[str, Any], body: dict[str, Any], context: BoltContext) -> None:
        # A file shared with a message: subtype file_share, or none, or a thread
        # reply also sent to the channel. Edits, deletions and the rest: not ours.
        if event.get("subtype") not in FILE_SUBTYPES or not event.get("files"):
            return
        if event.get("user") and event.get("user") == context.bot_user_id:
            return  # our own uploads (charts)
        if not workflow.first_delivery(body.get("event_id")):
            return
        for file in event["files"]:
            if not isinstance(file, dict) or not file.get("id"):
                continue
            workflow.file_dropped(
                FileDrop(
                    file_id=str(file["id"]),
                    channel=event.get("channel", ""),
                    user=event.get("user"),
                    # The message's own ts, or its thread's: where the answer goes.
                    thread_ts=event.get("thread_ts") or event.get("ts"),
                    file=file,
                )
            )

    def on_file_shared(event: dict[str, Any], body: dict[str, Any], context: BoltContext) -> None:
        if event.get("user_id") and event.get("user_id") == context.bot_user_id:
            return  # our own uploads (charts)
        if not event.get("file_id") or not workflow.first_delivery(body.get("event_id")):
            return
        # It names no thread, and its file object is an id alone: the ingest asks
        # files.info, and takes the thread from the message event when it comes.
        workflow.file_dropped(
            FileDrop(
                file_id=str(event["file_id"]),
                channel=event.get("channel_id", ""),
                user=event.get("user_id"),
            )
        )

    def on_home_opened(event: dict[str, Any]) -> None:
        if event.get("tab") == "home":
            workflow.refresh_home(event["user"])

    def on_decision(ack: Ack, body: dict[str, Any], action: dict[str, Any], client) -> None:
        ack()
        user, run_id = body["user"]["id"], action.get("value", "")
        channel = (body.get("channel") or {}).get("id", "")
        decision = {
            "approve_run": "approve",
            "reject_run": "reject",
            "override_secret": "override_secret",
        }[action["action_id"]]
        # The run's own channel decides; a click must come from a served channel too.
        run = workflow.store.find_run(run_id)
        if not (
            (run is None or served(run.channel, decision, user, run.id))
            and served(channel, decision, user)
        ):
            workflow.submit(
                f"refusing {user}'s {decision} of {run_id}",
                lambda: _tell(channel, user, NOT_SERVED),
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

    def on_reject_reason(ack: Ack, body: dict[str, Any], view: dict[str, Any]) -> None:
        user, run_id = body["user"]["id"], view.get("private_metadata", "")
        run = workflow.store.find_run(run_id)
        channel = run.channel if run else ""
        if run is not None and not served(channel, "reject", user, run_id):
            ack(response_action="errors", errors={"reason": f"Not counted: {NOT_SERVED}."})
            return
        ack()
        reason = (
            (view.get("state", {}).get("values", {}).get("reason") or {}).get("reason") or {}
        ).get("value")
        workflow.decide_later(run_id, user, "reject", channel, reason=reason)

    def on_advise(ack: Ack, body: dict[str, Any], view: dict[str, Any]) -> None:
        from trainers.advise import Situation, advise, parse_count

        user, channel = body["user"]["id"], view.get("private_metadata", "")
        if not served(channel, "advise", user):
            ack(response_action="errors", errors={"problems": f"{NOT_SERVED}."})
            return
        values = view.get("state", {}).get("values", {})

        def picked(block: str) -> frozenset[str]:
            element = (values.get(block) or {}).get(block) or {}
            options = element.get("selected_options") or []
            return frozenset(str(o.get("value")) for o in options if isinstance(o, dict))

        # Each number is parsed strictly; a bad one is an error next to its own field.
        counts: dict[str, int] = {}
        errors: dict[str, str] = {}
        for block in ("calls_per_day", "good_examples"):
            try:
                counts[block] = parse_count(
                    ((values.get(block) or {}).get(block) or {}).get("value")
                )
            except ValueError as exc:
                errors[block] = str(exc)
        if errors:
            ack(response_action="errors", errors=errors)
            return
        try:
            situation = Situation(
                picked("problems"),
                counts["calls_per_day"],
                counts["good_examples"],
                picked("tried"),
            )
        except ValueError as exc:
            ack(response_action="errors", errors={"problems": str(exc)})
            return
        ack()
        message = render.advice(advise(situation), user)
        workflow.submit(
            "posting advice", lambda: workflow.post(channel, None, message), channel, None
        )

    def _tell(channel: str, user: str, refusal: str | None) -> None:
        """A refused click is answered to the clicker alone."""
        if refusal and channel:
            workflow.client.chat_postEphemeral(
                channel=channel, user=user, text=f"⚠️ Not counted: {refusal}."
            )

    def on_error(error: Exception, body: dict[str, Any]) -> None:
        workflow.unexpected(error, f"handling a {body.get('type', 'Slack')} request")

    app.command(COMMAND)(on_finetune)
    app.event("message")(on_message)
    app.event("file_shared")(on_file_shared)
    app.event("app_home_opened")(on_home_opened)
    for action_id in ACTIONS:
        app.action(action_id)(on_decision)
    app.view("reject_reason")(on_reject_reason)
    app.view("advise")(on_advise)
    app.error(on_error)
