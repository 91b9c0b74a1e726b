"""The retirement watch: each channel that owns a fine-tuned model hears, 30, 7 and
1 days before, that its model stops serving.

A daily scheduler job (`RetirementWatch.check`). Each notice is claimed in the
audit log (action `retirement_notice`, with the days and the date) in the
same transaction that checks none was sent, so a restart, a second process
or a second tick never posts it twice. The facts come from
trainers.retirement, with their source.

`cutoff_refusal` is the sentence a `/finetune train … provider=openai` gets
once OpenAI creates no more fine-tuning jobs: where else this installation
can train (`alternatives`), and `/finetune migrate` for the runs it has.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bot import render
from bot.results import RunResult
from trainers import pricing, retirement

if TYPE_CHECKING:
    from storage import Run, Store
    from trainers.providers import Provider

log = logging.getLogger("tunebot")

NOTICE = "retirement_notice"  # the audit action that records a notice
LOCAL_MODULES = ("torch", "transformers", "peft", "trl")  # the [local] extra's
ELSEWHERE_KINDS = ("together", "openai-compatible")  # providers-file kinds OpenAI's end spares


def local_available() -> bool:
    """True when the [local] extra is installed: provider=local can train here."""
    return all(importlib.util.find_spec(name) is not None for name in LOCAL_MODULES)


def alternatives(
    providers: Mapping[str, Provider],
    *,
    local: bool,
    together_key: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Where this installation can train instead of OpenAI, one phrase each, in order:
    ``local`` when `local` (the [local] extra is installed), Together AI when
    `together_key` is not None (the built-in provider; whether TOGETHER_API_KEY
    is set), then each provider of
    the providers file (trainers.providers) whose kind is together or
    openai-compatible, by name, with its kind and whether its key variable is set
    in `environ` (the process environment by default). Keys are never shown."""
    env = os.environ if environ is None else environ
    out = ["local (LoRA on this machine's GPUs)"] if local else []
    if together_key is not None:
        key = "TOGETHER_API_KEY set" if together_key else "TOGETHER_API_KEY not set"
        out.append(f"together (Together AI, {key})")
    for name, p in sorted(providers.items()):
        if p.kind in ELSEWHERE_KINDS:
            key = f"{p.api_key_env} set" if env.get(p.api_key_env) else f"{p.api_key_env} not set"
            out.append(f"{render.escape(name)} ({p.kind}, {key})")
    return out


def cutoff_refusal(
    today: dt.date,
    providers: Mapping[str, Provider],
    *,
    local: bool,
    together_key: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The one sentence refusing a new OpenAI fine-tuning run on `today`, or None
    before `pricing.OPENAI_FINE_TUNING_CUTOFF` (2027-01-06; see trainers.retirement
    for its source). It names the `alternatives` and points to `/finetune migrate`."""
    cutoff = pricing.OPENAI_FINE_TUNING_CUTOFF
    if today < cutoff:
        return None
    head = f"OpenAI creates no new fine-tuning jobs since {cutoff:%Y-%m-%d}"
    places = alternatives(providers, local=local, together_key=together_key, environ=environ)
    if not places:
        return (
            f"{head}, and this installation has nowhere else to train: install the [local] "
            "extra or add a provider to TUNEBOT_PROVIDERS, then `/finetune migrate <run> "
            "provider=<name>` moves a finished OpenAI run there."
        )
    listed = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " or " + places[-1]
    return (
        f"{head}; this installation can train on {listed}: ask again with provider=<name>, "
        "or move a finished OpenAI run with `/finetune migrate <run> provider=<name>`."
    )


class RetirementWatch:
    """`check()` posts what is due today; `post(channel, thread_ts, message)` is the
    bot's post, and `clock` gives the current aware datetime."""

    def __init__(
        self,
        store: Store,
        post: Callable[[str, str | None, render.Message], object],
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.store = store
        self.post = post
        self.clock = clock

    def check(self) -> int:
        """Post every notice due today; returns how many were posted."""
        today = self.clock().date()
        posted = 0
        for run in self.store.runs(status="succeeded", limit=None):
            model = RunResult.of(run).fine_tuned_model
            ends = retirement.serving_ends(model) if model else None
            days_left = (ends - today).days if ends else -1
            if retirement.notice_due(days_left, set()) is None:
                continue  # too early, or over: nothing to claim
            days = self._claim(run, days_left, ends)
            if days is None:
                continue
            self.post(run.channel, None, render.retirement_notice(run, model, ends, days))
            log.info("run %s: %d-day notice that %s stops serving on %s", run.id, days, model, ends)
            posted += 1
        return posted

    def _claim(self, run: Run, days_left: int, ends: dt.date) -> int | None:
        """The notice due for `run` now, recorded as sent; None when none is due."""
        with self.store.transaction():
            sent = {
                int((entry.detail_json or {}).get("days", -1))
                for entry in self.store.audit_log(run_id=run.id, limit=None)
                if entry.action == NOTICE
            }
            days = retirement.notice_due(days_left, sent)
            if days is not None:
                self.store.audit(
                    "tunebot", NOTICE, run_id=run.id,
                    detail={"days": days, "ends": ends.isoformat()},
                )  # fmt: skip
            return days
