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
