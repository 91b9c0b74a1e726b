"""Thin Slack listeners: parse, ack fast, hand off to the workflow.

One module per kind of request, each a set of top-level functions:

    commands   the /finetune slash command
    events     files shared, the Home tab opened
    actions    the approval card's buttons
    views      modal submissions (reject reason, advise)

`register` wires them all, here and nowhere else. The listeners reach the
workflow through Bolt's context: a global middleware puts it there on every
request (context["workflow"]), and Bolt passes `context` to any listener that
names it. Nothing here waits on the network or the CPU: downloads,
validation and uploads are the workflow's jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slack_bolt import App, BoltContext

from bot.listeners.actions import ACTIONS, on_decision
from bot.listeners.commands import COMMAND, on_finetune
from bot.listeners.common import WORKFLOW, log
from bot.listeners.events import (
    APP_HOME_OPENED,
    EVENTS,
    FILE_SHARED,
    MESSAGE,
    on_file_shared,
    on_home_opened,
    on_message,
)
from bot.listeners.views import on_advise, on_reject_reason
from bot.render.actions import ADVISE, REJECT_REASON
from bot.workflow import Workflow

__all__ = ["ACTIONS", "COMMAND", "EVENTS", "register"]


def register(app: App, workflow: Workflow) -> None:
    """Every listener tunebot has, and the middleware that hands them the workflow."""

    def provide_workflow(context: BoltContext, next: Callable[[], Any]) -> Any:
        context[WORKFLOW] = workflow
        return next()

    app.use(provide_workflow)
    app.command(COMMAND)(on_finetune)
    app.event(MESSAGE)(on_message)
    app.event(FILE_SHARED)(on_file_shared)
    app.event(APP_HOME_OPENED)(on_home_opened)
    for action_id in ACTIONS:
        app.action(action_id)(on_decision)
    app.view(REJECT_REASON)(on_reject_reason)
    app.view(ADVISE)(on_advise)
    app.error(on_error)


def on_error(error: Exception, body: dict[str, Any], context: BoltContext) -> None:
    what = f"handling a {body.get('type', 'Slack')} request"
    workflow = context.get(WORKFLOW)
    if workflow is None:  # raised by one of Bolt's own middlewares, before ours ran
        log.error("%s failed: %s: %s", what, type(error).__name__, error)
        return
    workflow.unexpected(error, what)
