"""Who may approve a paid run, how many must, and what is refused outright.

Pure rules, no Slack and no database: the workflow gathers the facts (the
plan's estimate, the month's committed spend, the approvals so far) and asks.
Modelled on apply requirements in infrastructure tools and environment
reviewers in CI: the requester never approves their own run, one rejection
ends a request, and money limits refuse rather than escalate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    approvers: frozenset[str]  # Slack user ids, user groups already resolved
    required: int = 1
    two_approvals_above_usd: float | None = None
    max_run_usd: float | None = None
    monthly_budget_usd: float | None = None
    ttl: dt.timedelta = dt.timedelta(hours=24)
    local_needs_approval: bool = False

    def __post_init__(self) -> None:
        if self.required < 1:
            raise ValueError(f"required approvals must be at least 1, not {self.required}")
        if self.ttl <= dt.timedelta(0):
            raise ValueError("the approval time-to-live must be positive")


def plan_hash(plan: Mapping[str, object]) -> str:
    """A short, stable fingerprint of a frozen plan: what approvers signed off on."""
    canonical = json.dumps(plan, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def quorum(policy: Policy, estimate_usd: float) -> int:
    """Approvals needed: the configured number, at least two above the threshold."""
    needed = policy.required
    if policy.two_approvals_above_usd is not None and estimate_usd > policy.two_approvals_above_usd:
        needed = max(needed, 2)
    return needed


def over_budget(estimate_usd: float, left_usd: float, budget_usd: float) -> str:
    """The one clause every budget refusal uses, whichever check catches it: the
    request's policy check, the reservation in its transaction, or the check
    again at the last approval. Amounts in US dollars, `left_usd` floored at 0."""
    return (
        f"the estimate ${estimate_usd:,.2f} is over what is left of this month's budget: "
        f"${max(left_usd, 0):,.2f} of ${budget_usd:,.2f} (TUNEBOT_MONTHLY_BUDGET_USD)"
    )


def needs_approval(policy: Policy, provider: str) -> bool:
    return provider != "local" or policy.local_needs_approval


def refusals(
    policy: Policy, *, provider: str, estimate_usd: float, committed_usd: float, requester: str
) -> list[str]:
    """Why a request cannot even be put to approvers; empty when it can."""
    reasons = []
    if policy.max_run_usd is not None and estimate_usd > policy.max_run_usd:
        reasons.append(
            f"the estimate ${estimate_usd:,.2f} is over the per-run cap of "
            f"${policy.max_run_usd:,.2f} (TUNEBOT_MAX_RUN_USD)"
        )
    if policy.monthly_budget_usd is not None:
        left = policy.monthly_budget_usd - committed_usd
        if estimate_usd > left:
            reasons.append(over_budget(estimate_usd, left, policy.monthly_budget_usd))
    if needs_approval(policy, provider):
        eligible = policy.approvers - {requester}
        needed = quorum(policy, estimate_usd)
        if len(eligible) < needed:
            reasons.append(
                f"{needed} approval(s) needed but only {len(eligible)} approver(s) other than "
                "the requester exist (TUNEBOT_APPROVERS)"
            )
    return reasons


def click_refusal(
    policy: Policy, *, user: str, requester: str, status: str, expired: bool
) -> str | None:
    """Why `user` may not decide on this run now; None when they may."""
    if status != "pending_approval":
        return f"this request is already {status.replace('_', ' ')}"
    if expired:
        return "this request has expired; ask again with /finetune train"
    if user == requester:
        return "you asked for this run, so someone else must approve it"
    if user not in policy.approvers:
        return "you are not one of the approvers (TUNEBOT_APPROVERS)"
    return None


@dataclass(frozen=True)
class Tally:
    approvals: tuple[str, ...]
    rejected_by: str | None
    overridden_by: str | None
    needed: int
    held: bool  # the data may hold secrets and nobody has overridden that yet

    @property
    def approved(self) -> bool:
        return self.rejected_by is None and not self.held and len(self.approvals) >= self.needed


def tally(decisions: Iterable[tuple[str, str]], needed: int, *, secret_hold: bool) -> Tally:
    """Approvals so far from (user, decision) pairs, in the order they were made.

    A run whose data may hold secrets needs an explicit override as well.
    """
    approvals: list[str] = []
    rejected_by = overridden_by = None
    for user, decision in decisions:
        if decision == "approve" and user not in approvals:
            approvals.append(user)
        elif decision == "reject" and rejected_by is None:
            rejected_by = user
        elif decision == "override_secret" and overridden_by is None:
            overridden_by = user
    held = secret_hold and overridden_by is None
    return Tally(tuple(approvals), rejected_by, overridden_by, needed, held)


def month_start(now: dt.datetime) -> dt.datetime:
    """The start of the calendar month, UTC: budgets reset then."""
    now = now.astimezone(dt.UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
