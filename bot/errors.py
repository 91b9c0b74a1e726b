"""The bot's exceptions, under one base, and the one tuple that catches every
exception tunebot raises on purpose (`REFUSED`).

    BotError
    ├── UserError                  a problem a person can act on, shown as it is
    │   ├── Busy                   the long-job queue is full
    │   ├── SpendRefused           the spend gate said no
    │   └── ModelRefused           bot.local_models: `model=` not allowed
    ├── CommandError (ValueError)  bot.commands: a /finetune line that does not parse
    ├── ConfigError (ValueError)   bot.config: a setting tunebot cannot use
    ├── UsageError                 bot.cli: a command line that does not parse
    ├── RefusedRedirect            bot.downloads: a file's redirect off Slack's hosts
    └── ClaimLost                  bot.claims: another owner took the run over

trainers.errors.TrainerError and storage.errors.StorageError are the other two
trees; `except REFUSED` catches all three.
"""

from __future__ import annotations

from storage.errors import StorageError
from trainers.errors import TrainerError


class BotError(Exception):
    """Base of every exception bot/ raises on purpose."""


REFUSED = (BotError, TrainerError, StorageError)
"""Every exception tunebot raises on purpose, whichever package raised it."""


class UserError(BotError):
    """A problem a person can act on; `summary` and `detail` are shown as they are."""

    def __init__(self, summary: str, detail: str | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail


class Busy(UserError):
    """The long-job queue is full: the request is refused at once, not queued."""

    def __init__(self, ahead: int) -> None:
        super().__init__(f"busy: {ahead} jobs ahead, try again in a few minutes.")
        self.ahead = ahead


class SpendRefused(UserError):
    """The spend gate said no: who may not spend, over budget, or already going.

    `reason` is the bare clause (no subject, no full stop) for a caller that puts
    it into its own sentence, e.g. "r2 cannot be requested: <reason>."
    """

    def __init__(self, summary: str, detail: str | None = None, *, reason: str | None = None):
        super().__init__(summary, detail)
        self.reason = reason if reason is not None else summary.rstrip(".")


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
