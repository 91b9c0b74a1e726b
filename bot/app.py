"""The Slack app: `create_app(settings, workflow) -> slack_bolt.App`. No module-level app."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from bot import listeners
from bot.config import Settings
from bot.priority import ACKS
from bot.workflow import Workflow


class _SameTokenFilter(logging.Filter):
    """Bolt looks up SLACK_BOT_TOKEN itself and warns that our client's token
    wins; it is the same token (Settings read it), so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


def _bolt_logger() -> logging.Logger:
    logger = logging.getLogger("tunebot.slack")
    if not any(isinstance(f, _SameTokenFilter) for f in logger.filters):
        logger.addFilter(_SameTokenFilter())
    return logger


class _AcksFirstClient(WebClient):
    """Every Web API call from a job thread first steps aside for acks in flight
    (bot.priority); from an ack's own thread it goes at once."""

    def api_call(self, *args: Any, **kwargs: Any) -> Any:
        ACKS.step_aside()
        return super().api_call(*args, **kwargs)


def make_client(settings: Settings) -> WebClient:
    """A Web API client that waits out Slack's rate limits instead of failing."""
    client = _AcksFirstClient(
        token=settings.slack_bot_token, base_url=settings.slack_api_url, timeout=30
    )
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=3))
    return client


def create_app(settings: Settings, workflow: Workflow) -> App:
    """The Bolt app with every listener registered. Calls Slack's auth.test."""
    app = App(
        client=workflow.client,
        signing_secret=settings.slack_signing_secret,  # a str, so Bolt reads no environment
        logger=_bolt_logger(),
        # Socket Mode needs no signature; HTTP mode always checks it.
        request_verification_enabled=bool(settings.slack_signing_secret),
        name="tunebot",
        # Listeners only dedupe and queue work, so running them before the HTTP
        # response keeps acks fast and means "200" = "the work is queued".
        process_before_response=True,
    )
    app.use(_acks_first)
    listeners.register(app, workflow)
    return app


def _acks_first(next: Callable[[], Any]) -> Any:
    """Every request Bolt dispatches counts as an ack in flight until its listener
    returns (see bot.priority)."""
    with ACKS.ack():
        return next()
