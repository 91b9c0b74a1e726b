"""When hosted models stop serving, and when to tell the teams that use them.

Facts, with their sources (read 2026-11-30):

- OpenAI stops creating fine-tuning jobs for everyone on 2027-01-06
  (`trainers.pricing.OPENAI_FINE_TUNING_CUTOFF`; OpenAI's fine-tuning
  deprecation notice, as publicly reported, read 2026-11-30). After it
  tunebot refuses new OpenAI runs and names where else it can train
  (bot.retirement.cutoff_refusal).
- Public reports of OpenAI's deprecations page say the gpt-4o, gpt-4o-mini,
  gpt-4.1 and gpt-4.1-mini models, and every fine-tune built on them, stop
  serving on 2027-01-14. OpenAI's `/v1/models` gives no shutdown date, so
  this dated table is the source until a provider's API gives one.

`serving_ends(model)` knows a fine-tune by its base (``ft:<base>:<org>::<id>``);
`notice_due(days_left, sent)` says which of the 30-, 7- and 1-day notices is
due now: the nearest one not yet sent, so a bot that was down for a week
sends one notice on its return, not three.
"""

from __future__ import annotations

import datetime as dt

SOURCE = "OpenAI's deprecations page, as publicly reported (read 2026-11-30)"
SERVING_ENDS: dict[str, dt.date] = {
    "gpt-4o": dt.date(2027, 1, 14),
    "gpt-4o-mini": dt.date(2027, 1, 14),
    "gpt-4.1": dt.date(2027, 1, 14),
    "gpt-4.1-mini": dt.date(2027, 1, 14),
}
NOTICE_DAYS = (30, 7, 1)  # days before the end at which a team is told


def base_model(model: str) -> str:
    """The model a fine-tune was trained from (``ft:gpt-4o-mini-2024-07-18:acme::x`` ->
    ``gpt-4o-mini-2024-07-18``); any other name unchanged."""
    if model.startswith("ft:"):
        return model.split(":", 2)[1]
    return model


def family(model: str) -> str | None:
    """The entry of `SERVING_ENDS` a model (or a fine-tune of it) belongs to, or None.

    A dated snapshot belongs to its family (``gpt-4o-mini-2024-07-18`` ->
    ``gpt-4o-mini``); a longer name that is a family of its own
    (``gpt-4.1-nano``) does not belong to the shorter one.
    """
    base = base_model(model)
    for name in sorted(SERVING_ENDS, key=len, reverse=True):
        rest = base.removeprefix(name)
        if rest != base and (not rest or _is_date_suffix(rest)):
            return name
    return None


def serving_ends(model: str) -> dt.date | None:
    """The day `model` (or the model a fine-tune was built on) stops answering, if known."""
    name = family(model)
    return SERVING_ENDS[name] if name else None


def notice_due(days_left: int, sent: set[int] | frozenset[int]) -> int | None:
    """The notice to send now with `days_left` days to go, given those already sent:
    the nearest of `NOTICE_DAYS` reached and not sent, and only if no nearer one was
    sent. None when nothing is due (too early, all sent, or the day has passed)."""
    if days_left < 0:
        return None
    reached = [d for d in NOTICE_DAYS if days_left <= d]
    if not reached:
        return None
    nearest = min(reached)
    if any(d <= nearest for d in sent):  # this one, or a later one, was sent
        return None
    return nearest


def _is_date_suffix(rest: str) -> bool:
    """``-2024-07-18``: a dated snapshot of the same model."""
    parts = rest.split("-")
    return len(parts) == 4 and parts[0] == "" and all(p.isdigit() for p in parts[1:])
