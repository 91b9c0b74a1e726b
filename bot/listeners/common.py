"""What every listener shares: the workflow from Bolt's context, and the
TUNEBOT_CHANNELS check that refuses (and logs, and audits) without raising."""

from __future__ import annotations

import logging

from slack_bolt import BoltContext

from bot.workflow import Workflow

log = logging.getLogger("tunebot")

NOT_SERVED = "tunebot does not serve this channel (see TUNEBOT_CHANNELS)"
WORKFLOW = "workflow"  # the context key register's middleware sets on every request


def workflow_of(context: BoltContext) -> Workflow:
    """The workflow `register` put in this request's context."""
    return context[WORKFLOW]


def served(
    workflow: Workflow, channel: str | None, what: str, user: str, run_id: str | None = None
) -> bool:
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
