"""Events: files shared (as a message and as `file_shared`) and the Home tab opened.

They only dedupe and hand off: downloads and validation are the workflow's jobs.
"""

from __future__ import annotations

from typing import Any

from slack_bolt import BoltContext

from bot.datasets import FileDrop
from bot.listeners.common import workflow_of

MESSAGE = "message"
FILE_SHARED = "file_shared"
APP_HOME_OPENED = "app_home_opened"
EVENTS = (MESSAGE, FILE_SHARED, APP_HOME_OPENED)
FILE_SUBTYPES = (None, "file_share", "thread_broadcast")


def on_message(event: dict[str, Any], body: dict[str, Any], context: BoltContext) -> None:
    # A file shared with a message: subtype file_share, or none, or a thread
    # reply also sent to the channel. Edits, deletions and the rest: not ours.
    if event.get("subtype") not in FILE_SUBTYPES or not event.get("files"):
        return
    if event.get("user") and event.get("user") == context.bot_user_id:
        return  # our own uploads (charts)
    workflow = workflow_of(context)
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
    workflow = workflow_of(context)
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


def on_home_opened(event: dict[str, Any], context: BoltContext) -> None:
    if event.get("tab") == "home":
        workflow_of(context).refresh_home(event["user"])
