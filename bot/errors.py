"""The bot's exceptions: what a person can act on, worded for them."""

from __future__ import annotations


class UserError(Exception):
    """A problem a person can act on; `summary` and `detail` are shown as they are."""

    def __init__(self, summary: str, detail: str | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail


class SpendRefused(UserError):
    """The spend gate said no: who may not spend, over budget, or already going."""


def describe(exc: BaseException, home: object | None = None) -> str:
    """`Class: message` for a person: the bot's home folder (spaces and all) named,
    not shown, so no server path reaches Slack."""
    text = f"{type(exc).__name__}: {exc}"
    if home is not None:
        text = text.replace(str(home), "TUNEBOT_HOME")
    return text


def slack_error(exc: BaseException) -> str:
    """Why a Slack call failed, for the log: Slack's error code, or the network's words.

    Callers catch every exception from a Slack call: an unreachable Slack must
    not stop the work behind the message (a run's end, its evaluation).
    """
    response = getattr(exc, "response", None)
    code = response.get("error") if hasattr(response, "get") else None
    return str(code) if code else f"{type(exc).__name__}: {exc}"
