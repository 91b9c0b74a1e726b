"""App Home: each person's tab, from the channels they belong to.

`refresh_home(user)` publishes a tab on a job thread (one waiting per user
is enough); `home(user)` is the view itself: runs, approvals waiting for
them, datasets and evaluations from the channels they are in and
TUNEBOT_CHANNELS serves, and the month's spend.
"""

from __future__ import annotations

import logging
import threading
import time

from bot import render
from bot.config import Settings
from bot.context import Context
from bot.errors import slack_error
from bot.runs import Runs

log = logging.getLogger("tunebot")

# How long App Home trusts a user's channel list from Slack (users.conversations).
# Someone who leaves a channel may go on seeing its items on Home for up to this long.
MEMBERSHIP_TTL_SECONDS = 180


class Home:
    """The Home tab service: `ctx` for Slack and the store, `runs` for approvers and spend."""

    def __init__(self, ctx: Context, runs: Runs) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.runs = runs
        self._lock = threading.Lock()
        # user -> (time.monotonic() when asked, their channels); see member_channels.
        self._memberships: dict[str, tuple[float, frozenset[str]]] = {}
        self._homes_waiting: set[str] = set()  # users whose Home refresh is queued

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def refresh_home(self, user: str) -> None:
        """Publish `user`'s Home tab on a job thread; one refresh waiting per user is enough
        (a burst of run changes would otherwise render the same tab once per change)."""
        with self._lock:
            if user in self._homes_waiting:
                return
            self._homes_waiting.add(user)

        def publish() -> None:
            with self._lock:  # a change from here on asks for a new refresh
                self._homes_waiting.discard(user)
            self.publish_home(user)

        try:
            self.ctx.submit("refreshing the Home tab", publish, "", None)
        except BaseException:
            with self._lock:
                self._homes_waiting.discard(user)
            raise

    def member_channels(self, user: str) -> frozenset[str]:
        """The public and private channels `user` belongs to, as Slack says (users.conversations).

        Cached per user for MEMBERSHIP_TTL_SECONDS. When Slack will not answer,
        the answer is no channels (Home then shows nothing rather than everything),
        and that failure is not cached.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._memberships.get(user)
        if cached is not None and now - cached[0] < MEMBERSHIP_TTL_SECONDS:
            return cached[1]
        found: set[str] = set()
        try:
            pages = self.client.users_conversations(
                user=user, types="public_channel,private_channel", exclude_archived=True, limit=200
            )
            for page in pages:  # the SDK follows response_metadata.next_cursor
                found.update(c["id"] for c in page.get("channels") or [] if c.get("id"))
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot list %s's channels: %s", user, slack_error(exc))
            return frozenset()
        channels = frozenset(found)
        with self._lock:
            self._memberships = {
                u: entry
                for u, entry in self._memberships.items()
                if now - entry[0] < MEMBERSHIP_TTL_SECONDS
            }  # expired entries go, so the cache holds only recent viewers
            self._memberships[user] = (now, channels)
        return channels

    def home(self, user: str) -> dict:
        """The Home tab for `user`: only channels they belong to and TUNEBOT_CHANNELS allows.

        Runs, approvals waiting for them, datasets and evaluations come from those
        channels alone; the month's spend is one total, since the budget is shared.
        """
        visible = sorted(c for c in self.member_channels(user) if self.settings.serves(c))
        if visible:  # a list of channels is one `channel IN (...)` query in the store
            runs = self.store.runs(channel=visible, limit=200)
            datasets = self.store.datasets(channel=visible, limit=5)
        else:
            runs, datasets = [], []
        approvers = self.runs.approvers.policy().approvers
        waiting = [
            r for r in runs
            if r.status == "pending_approval" and user in approvers and r.requested_by != user
        ]  # fmt: skip
        active = [r for r in runs if r.status in ("approved", "queued", "submitting", "running")]
        evals = [e for r in runs[:20] for e in self.store.evals(r.id)][-5:]
        return render.home_view(
            user=user,
            active=active,
            waiting=waiting,
            datasets=datasets,
            evals=evals,
            finished=[r for r in runs if r.status == "succeeded"],
            spent_usd=self.runs.committed_usd(),
            budget_usd=self.settings.monthly_budget_usd,
        )

    def publish_home(self, user: str) -> None:
        """Render `user`'s tab (`home`) and publish it now (views.publish)."""
        self.client.views_publish(user_id=user, view=self.home(user))
