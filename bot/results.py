"""What a run recorded about itself as it went: a frozen record, stored as JSON.

`runs.result_json` holds one `RunResult`: the provider's answers (the
fine-tuned model, the trained tokens, the uploaded training file), the
poller's bookkeeping (the event cursor, when progress was last edited, a
result Slack has not taken yet), the held-out split an evaluation uses
(`data`), a local run's output folders, and a distillation's counts.

Like the plans (bot/plans.py) it is a frozen dataclass in the style of
trl's configs: every field has `help` metadata and `__post_init__` raises a
ValueError naming the bad field. `to_json()` gives the stored dict: the
fields that are set, under the same keys as before the record existed, with
`"version": 1`; `from_json()` reads any stored dict back, old rows too: a
missing key takes its default, and a key this version does not know is kept
(`extra`) and written back as it was.

Storage holds the dict and knows nothing of this record (storage/ imports
nothing of bot/); the bot reads a run's record with `RunResult.of(run)` and
writes `record.to_json()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

VERSION = 1


class _HasResult(Protocol):
    result_json: Any


def _bad(name: str, why: str, value: object) -> ValueError:
    return ValueError(f"RunResult.{name} {why}, not {value!r}")


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """A run's result record (`runs.result_json`); every field optional."""

    # What the provider answered.
    fine_tuned_model: str | None = field(
        default=None, metadata={"help": "The provider's id of the trained model (OpenAI: ft:…)."}
    )
    trained_tokens: int | None = field(
        default=None, metadata={"help": "Tokens the provider says it trained (and bills)."}
    )
    training_file: str | None = field(
        default=None,
        metadata={"help": "The provider's id of the training file uploaded for the run."},
    )
    # The submitter's and the poller's bookkeeping.
    submit_attempts: int = field(
        default=0,
        metadata={"help": "Retryable submission failures so far (the back-off doubles each)."},
    )
    last_event_id: str | None = field(
        default=None, metadata={"help": "The provider's last event already recorded (a cursor)."}
    )
    last_event: str | None = field(
        default=None,
        metadata={"help": "Hosted runs: the provider's newest event, shown on the progress line."},
    )
    progress_edited_at: float = field(
        default=0.0,
        metadata={"help": "When the progress message was last edited, Unix seconds (0: never)."},
    )
    unposted: bool = field(
        default=False,
        metadata={"help": "The result message was not taken by Slack: the poller posts it."},
    )
    unreachable_since: float | None = field(
        default=None,
        metadata={
            "help": "Local runs on a Ray cluster: since when (Unix seconds) every poll of its "
            "job has failed; null once one answers."
        },
    )
    unreachable_said: bool = field(
        default=False,
        metadata={"help": "The run's thread was told its job has not answered for a while."},
    )
    # The evaluation's data (bot/evaluation.py, Evaluations.prepare).
    data: Mapping[str, Any] | None = field(
        default=None,
        metadata={
            "help": "The data trained and held out: train_sha256, eval_sha256, and split "
            "(the held-out set's sizes) or overlap (with eval=) or note (why none)."
        },
    )
    # A local run's output (trainers/local.py).
    adapter_dir: str | None = field(
        default=None, metadata={"help": "Local runs: the folder of the trained LoRA adapter."}
    )
    merged_dir: str | None = field(
        default=None, metadata={"help": "Local runs: the folder of the merged model, if any."}
    )
    metrics: Mapping[str, Any] | None = field(
        default=None, metadata={"help": "Local runs: the worker's final metrics (loss, ...)."}
    )
    log_tail: str | None = field(
        default=None, metadata={"help": "Local runs: the last lines of the worker's log."}
    )
    attempt: int = field(
        default=1,
        metadata={
            "help": "Local runs: which job this is, 1 and then one more per /finetune resume "
            "(on a Ray cluster each attempt is a job of its own: bot/ray_runs.py)."
        },
    )
    # A distillation's counts (bot/distillation.py).
    dataset_id: str | None = field(
        default=None, metadata={"help": "Distillations: the dataset made of the answers (d7)."}
    )
    failed: Sequence[Any] | None = field(
        default=None,
        metadata={
            "help": "Distillations: [line, error] of each prompt the teacher did not answer."
        },
    )
    answered: int | None = field(
        default=None, metadata={"help": "Distillations: prompts the teacher answered."}
    )
    input_tokens: int | None = field(
        default=None, metadata={"help": "Distillations: prompt tokens billed."}
    )
    output_tokens: int | None = field(
        default=None, metadata={"help": "Distillations: completion tokens billed."}
    )
    stopped: str | None = field(
        default=None,
        metadata={"help": "Distillations: why it stopped early (cancelled, budget), or None."},
    )
    migration: Mapping[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Migrations: the comparison with the run this one migrates (bot/migrate.py)."
        },
    )
    together_quote: Mapping[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Together runs: Together's own estimate after the upload (available, "
            "usd, tokens, reason), checked against the approved one."
        },
    )
    downloads: Mapping[str, str] | None = field(
        default=None,
        metadata={
            "help": "Together runs: each kind fetched (adapter, merged, model) -> its folder "
            "under tunebot's home (bot/weights.py)."
        },
    )
    extra: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Keys this version does not know, kept and written back as they were."},
    )

    def __post_init__(self) -> None:
        for name in ("fine_tuned_model", "training_file", "last_event_id", "last_event", "adapter_dir",
                     "merged_dir", "log_tail", "dataset_id", "stopped"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise _bad(name, "must be a string or null", value)
        for name in ("trained_tokens", "answered", "input_tokens", "output_tokens"):
            value = getattr(self, name)
            if value is not None and not _count(value):
                raise _bad(name, "must be a whole number, 0 or more, or null", value)
        if not _count(self.attempt) or self.attempt < 1:
            raise _bad("attempt", "must be a whole number, 1 or more", self.attempt)
        if not _count(self.submit_attempts):
            raise _bad("submit_attempts", "must be a whole number, 0 or more", self.submit_attempts)
        value = self.progress_edited_at
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _bad("progress_edited_at", "must be a finite number", value)
        for name in ("unposted", "unreachable_said"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be true or false", getattr(self, name))
        since = self.unreachable_since
        if since is not None and (
            isinstance(since, bool)
            or not isinstance(since, int | float)
            or not math.isfinite(since)
        ):
            raise _bad("unreachable_since", "must be a finite number or null", since)
        if self.failed is not None and not isinstance(self.failed, list | tuple):
            raise _bad("failed", "must be a list or null", self.failed)
        for name in ("data", "metrics", "migration", "together_quote", "downloads", "extra"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise _bad(name, "must be an object or null", value)

    @classmethod
    def of(cls, run: _HasResult) -> RunResult:
        """The record a run (storage.Run) holds; an empty one when it holds none."""
        return cls.from_json(run.result_json)

    @classmethod
    def from_json(cls, record: Mapping[str, Any] | None) -> RunResult:
        """Read a stored dict of any version: missing keys default, unknown ones go to
        `extra`. ValueError (naming the field) for a known key with a bad value."""
        record = dict(record or {})
        record.pop("version", None)
        known = {f.name for f in fields(cls)} - {"extra"}
        given = {k: record.pop(k) for k in list(record) if k in known}
        for name in (
            "submit_attempts",
            "progress_edited_at",
            "unposted",
            "unreachable_said",
            "attempt",
        ):
            if given.get(name, 0) is None:  # never stored as null, but read as the default
                given.pop(name)
        return cls(**given, extra=record)

    def to_json(self) -> dict[str, Any]:
        """The dict stored in `runs.result_json`: the fields that are set, then `extra`."""
        out: dict[str, Any] = {"version": VERSION, **self.extra}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            default = f.default
            if value is None or value == default:
                continue
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def with_(self, **changes: Any) -> RunResult:
        """A copy with `changes` (field names); checked like a new record."""
        return replace(self, **changes)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
