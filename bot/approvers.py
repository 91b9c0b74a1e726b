"""Who the approvers are, and the approval policy they approve under.

``TUNEBOT_APPROVERS`` names users (``U…``) and user groups (``S…``); a
group's members approve, listed through Slack's ``usergroups.users.list``.
`Approvers` keeps the resolved ids so that no ack waits on Slack, and builds
the `Policy` (bot/approvals.py, the pure rules) from them and the settings.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from bot.approvals import Policy
from bot.config import Settings
from bot.context import Context
from bot.errors import slack_error

log = logging.getLogger("tunebot")

APPROVERS_TTL_SECONDS = 300  # user groups are resolved through Slack at most this often
APPROVERS_RETRY_SECONDS = 10  # ...or this soon again after Slack would not list one


class Approvers:
    """The approvers of one installation, resolved through its Context's Slack client."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._cached: tuple[float, frozenset[str]] | None = None  # (when to refresh, the ids)
        self._lock = threading.Lock()
        self._refreshing = False

    @property
    def settings(self) -> Settings:
        """The installation's settings, read from the Context each time (never a copy)."""
        return self.ctx.settings

    def ids(self) -> frozenset[str]:
        """Approver user ids, user groups resolved through Slack at most every few minutes.

        Acks ask this, so it never waits on Slack once known: a list older than
        APPROVERS_TTL_SECONDS (APPROVERS_RETRY_SECONDS when Slack would not list
        a group) is answered as it is and refreshed on a job thread. Only the
        very first call resolves in place (the workflow asks for it at start
        when there are groups, see `warm`).
        """
        with self._lock:
            cached = self._cached  # (when to refresh, the ids), time.monotonic()
            if cached is None:
                cached = self._cached = self._resolved()
                return cached[1]
            stale = time.monotonic() > cached[0]
            refresh = stale and self._has_groups() and not self._refreshing
            if refresh:
                self._refreshing = True
        if refresh:
            try:
                self.ctx.submit("resolving the approvers' user groups", self._refresh, "", None)
            except RuntimeError:  # stopping: the pool takes no more work
                self._refreshing = False
        return cached[1]

    def warm(self) -> None:
        """Resolve the approvers' user groups on a job thread now, so no ack waits for it."""
        if self._has_groups():
            self.ctx.submit("resolving the approvers' user groups", self.ids, "", None)

    def policy(self) -> Policy:
        """The approval policy now: these approvers and the settings' quorum, limits
        (USD), budget (USD a calendar month) and time to live of a request."""
        s = self.settings
        return Policy(
            approvers=self.ids(),
            required=s.required_approvals,
            two_approvals_above_usd=s.two_approvals_above_usd,
            max_run_usd=s.max_run_usd,
            monthly_budget_usd=s.monthly_budget_usd,
            ttl=dt.timedelta(hours=s.approval_ttl_hours),
            local_needs_approval=s.local_needs_approval,
        )

    def _has_groups(self) -> bool:
        return any(ident.startswith("S") for ident in self.settings.approvers)

    def _refresh(self) -> None:
        try:
            resolved = self._resolved()
            with self._lock:
                self._cached = resolved
        finally:
            self._refreshing = False

    def _resolved(self) -> tuple[float, frozenset[str]]:
        """(when to ask again, the approver ids), resolved through Slack now."""
        failed: list[str] = []
        users = frozenset(self._resolve(self.settings.approvers, failed))
        ttl = APPROVERS_RETRY_SECONDS if failed else APPROVERS_TTL_SECONDS
        return time.monotonic() + ttl, users

    def _resolve(self, ids: tuple[str, ...], failed: list[str] | None = None) -> set[str]:
        users = set()
        for ident in ids:
            if ident.startswith("S"):  # a user group: its members approve
                try:
                    users.update(self.ctx.client.usergroups_users_list(usergroup=ident)["users"])
                except Exception as exc:  # Slack refused, or could not be reached
                    log.error("cannot list user group %s: %s", ident, slack_error(exc))
                    if failed is not None:
                        failed.append(ident)
            else:
                users.add(ident)
        return users
