"""The spend gate: every call that costs money asks here first.

Paid work is a fine-tuning job, a distillation's teacher calls, generation on
a hosted model during an evaluation, the LLM judge, and `chat` on a hosted
model. Each one, before it spends a cent:

1. asks who may spend (`require`; the table below, also in the README);
2. reserves its estimate against the month's budget (`reserve`): work waiting
   for approval and work in flight count, and the check and the reservation
   are one transaction, so racing requests cannot overshoot together;
3. when it ends, however it ends, settles at what it actually spent
   (`settle`; work in flight notes its spend so far in the ledger, so a crash
   keeps it), which releases the rest.

Who may do what (requester: the person who asked for the run):

    action                          who
    request a paid run / distill    any member of a served channel; starts only after approval
    approve / reject                TUNEBOT_APPROVERS, never the requester
    cancel, resume, download        the requester or an approver
    eval, chat on a hosted model    the run's requester or an approver; an estimate above
                                    TUNEBOT_EVAL_APPROVAL_ABOVE_USD needs an approval like a run
    eval, chat with no paid call    any member of a served channel
    forget a dataset                whoever uploaded it, or an approver
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from bot.approvals import month_start, over_budget
from bot.config import Settings
from bot.errors import SpendRefused
from storage import AlreadyReserved, Ledger, OverBudget, Reservation, Store

log = logging.getLogger("tunebot")


class SpendGate:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        approvers: Callable[[], frozenset[str]],
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.store = store
        self.settings = settings
        self.ledger = Ledger(store)
        self._approvers = approvers
        self.clock = clock

    # -- who ---------------------------------------------------------------------

    def is_approver(self, user: str) -> bool:
        return user in self._approvers()

    def require(self, user: str, *, requester: str | None, what: str) -> None:
        """Only the requester or an approver may `what`; SpendRefused otherwise."""
        if user == requester or self.is_approver(user):
            return
        owner = f"<@{requester}>" if requester else "the requester"
        raise SpendRefused(
            f"Only {owner} or an approver can {what}: it is paid for from the team's budget."
        )

    # -- how much --------------------------------------------------------------------

    def since(self) -> dt.datetime:
        return month_start(self.clock())

    def committed_usd(self) -> float:
        """This calendar month's spend: open reservations at estimate, the rest at actual."""
        return self.ledger.committed(self.since())

    def left_usd(self) -> float | None:
        budget = self.settings.monthly_budget_usd
        return None if budget is None else max(0.0, budget - self.committed_usd())

    def needs_approval(self, usd: float) -> bool:
        """Whether an evaluation or a chat estimated at `usd` needs an approver's yes."""
        return usd > self.settings.eval_approval_above_usd

    def reserve(
        self,
        kind: str,
        ref: str,
        usd: float,
        *,
        what: str,
        run_id: str | None = None,
        channel: str | None = None,
        user: str | None = None,
    ) -> Reservation:
        """Reserve `usd` for `what`, or raise SpendRefused saying how much is left."""
        try:
            return self.ledger.reserve(
                kind,
                ref,
                usd,
                since=self.since(),
                budget_usd=self.settings.monthly_budget_usd,
                run_id=run_id,
                channel=channel,
                user=user,
            )
        except OverBudget as exc:
            reason = over_budget(usd, exc.left_usd, exc.budget_usd)
            raise SpendRefused(f"{what} cannot start: {reason}.", reason=reason) from None
        except AlreadyReserved:
            raise SpendRefused(f"{what} is already going; wait for its result.") from None

    def fits(self, reservation: Reservation) -> str | None:
        """Checked again when the last approval arrives: None when it still fits, else why."""
        budget = self.settings.monthly_budget_usd
        if budget is None:
            return None
        others = self.ledger.committed(self.since(), besides=reservation.id)
        if others + reservation.estimate_usd <= budget + 1e-9:
            return None
        return "the budget changed since the request: " + over_budget(
            reservation.estimate_usd, budget - others, budget
        )

    def settle(self, kind: str, ref: str, actual_usd: float | None, *, note: str | None = None):
        """Close (kind, ref)'s open reservation at `actual_usd` (None: what was recorded)."""
        if self.ledger.settle_open(kind, ref, actual_usd, note=note):
            log.info("spend %s %s settled at $%.4f", kind, ref, actual_usd or 0.0)
        elif actual_usd is not None:  # closed early (a poller thought it dead): true it up
            self.ledger.raise_actual(kind, ref, actual_usd)

    def recover(self) -> list:
        """At start-up: evaluations and chats a dead process left open count at their estimate.

        What they spent before the crash is unknown past what they recorded,
        so the estimate (the most they could have spent) is kept. Runs are
        settled by the run service, which knows their state. Returns the
        reservations (storage.ledger.Reservation) this closed, for the threads
        to be told (bot/migrate.py `Migrations.after_restart`).
        """
        closed = []
        for entry in self.ledger.open_entries():
            if entry.kind in ("eval", "chat"):
                spent = max(entry.estimate_usd, entry.actual_usd or 0.0)
                if self.ledger.settle(entry.id, spent, note="interrupted by a restart"):
                    closed.append(entry)
        return closed
