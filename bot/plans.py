"""The plan of a training run: what approvers sign off on, frozen as data.

`/finetune train` turns a dataset, its report and the command's options into
a plan (`Planner`): the dataset by id and sha256, the provider and model, the
hyper-parameters and the estimate. A plan never changes after it is made; the
run stores `plan.to_json()` in `runs.plan_json` and its `plan_hash`
(bot.approvals) is computed from that stored dict.

Plans are frozen dataclasses in the style of trl's configs: every field has
`help` metadata, and `__post_init__` raises a ValueError naming the bad field.
They are a backstop: the Planner refuses bad options first, with a usage
message naming the option as the user wrote it.

`to_json()` gives the stored dict with `"version": 1`; `from_json()` reads it
back, and reads the unversioned dicts stored before the version existed.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from bot import egress, render, retirement
from bot.errors import UserError
from trainers import pricing, together_pricing

if TYPE_CHECKING:
    from pathlib import Path

    from bot.config import Settings
    from storage import Dataset, Store
    from trainers.providers import Provider

VERSION = 1
SPLIT_DEFAULT = 0.1  # the held-out share when neither eval= nor split= is given
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _known(cls: type, d: Mapping[str, Any] | None) -> dict[str, Any]:
    """The items of a stored dict that are fields of the dataclass `cls` (others left out)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


def _bad(owner: object, name: str, why: str, value: object) -> ValueError:
    return ValueError(f"{type(owner).__name__}.{name} {why}, not {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive(owner: object, name: str, kind: type, *, optional: bool) -> None:
    value = getattr(owner, name)
    if value is None and optional:
        return
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _bad(owner, name, "must be a whole number above 0", value)
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise _bad(owner, name, "must be a finite number above 0", value)


def _check_text(owner: object, name: str, *, optional: bool = False) -> None:
    value = getattr(owner, name)
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise _bad(owner, name, "must be a non-empty string", value)


def _check_bool(owner: object, name: str, *, optional: bool = False) -> None:
    value = getattr(owner, name)
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _bad(owner, name, "must be true or false", value)


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """What a run is expected to cost: billed tokens and dollars; GPU time for local runs."""

    billed_tokens: int = field(default=0, metadata={"help": "Tokens the provider bills."})
    cost_usd: float = field(default=0.0, metadata={"help": "Estimated cost in USD (4 decimals)."})
    price_per_1m: float = field(
        default=0.0, metadata={"help": "Training price per 1M tokens, USD (0 for local runs)."}
    )
    tokens: int | None = field(
        default=None, metadata={"help": "Local runs: tokens trained (epochs x truncated counts)."}
    )
    gpu_hours: float | None = field(
        default=None, metadata={"help": "Local runs: estimated GPU-hours (4 decimals)."}
    )
    params_billions: float | None = field(
        default=None, metadata={"help": "Local runs: the model's size in billions of parameters."}
    )

    def __post_init__(self) -> None:
        for name in ("billed_tokens", "cost_usd", "price_per_1m", "tokens", "gpu_hours"):
            value = getattr(self, name)
            if value is None and name in ("tokens", "gpu_hours"):
                continue
            if not _number(value) or not math.isfinite(value) or value < 0:
                raise _bad(self, name, "must be a finite number, 0 or more", value)
        _check_positive(self, "params_billions", float, optional=True)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "billed_tokens": self.billed_tokens,
            "cost_usd": self.cost_usd,
            "price_per_1m": self.price_per_1m,
        }
        for name in ("tokens", "gpu_hours", "params_billions"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Estimate:
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """The fields every training plan has, whatever its provider.

    Use `TrainingPlan.from_json(d)` to read a stored plan: it answers the
    subclass for the plan's provider (`OpenAIPlan`, `LocalPlan`, `TogetherPlan`; a
    providers-file provider's by the stored ``kind``: `CompatiblePlan`, `TogetherPlan`).
    """

    PROVIDER: ClassVar[str | None] = None

    dataset_id: str = field(metadata={"help": "The training dataset's id (d3)."})
    dataset_sha256: str = field(metadata={"help": "The sha256 of its bytes: what is trained."})
    provider: str = field(
        metadata={"help": "Who trains: openai, local, together or a providers-file name."}
    )
    model: str = field(metadata={"help": "The base model: a provider's name, hub id or path."})
    epochs: int = field(metadata={"help": "Passes over the training data (1..25)."})
    epochs_auto: bool = field(
        default=False, metadata={"help": "True when epochs were left to the provider's rule."}
    )
    eval_dataset_id: str | None = field(
        default=None, metadata={"help": "A dataset held out for evaluation (eval=), or None."}
    )
    split: float | None = field(
        default=None,
        metadata={"help": "The share held out of the training data (0 < split < 0.5), or None."},
    )
    secret_hold: bool = field(
        default=False,
        metadata={"help": "True when the data may hold secrets: approvers must override."},
    )
    estimate: Estimate = field(
        default_factory=Estimate, metadata={"help": "What the run is expected to cost."}
    )

    def __post_init__(self) -> None:
        for name in ("dataset_id", "dataset_sha256", "provider", "model"):
            _check_text(self, name)
        if self.PROVIDER is not None and self.provider != self.PROVIDER:
            raise _bad(self, "provider", f"must be {self.PROVIDER}", self.provider)
        _check_positive(self, "epochs", int, optional=False)
        _check_bool(self, "epochs_auto")
        _check_text(self, "eval_dataset_id", optional=True)
        if self.split is not None and (not _number(self.split) or not 0 < self.split < 0.5):
            raise _bad(self, "split", "must be a fraction between 0 and 0.5", self.split)
        if self.split is not None and self.eval_dataset_id is not None:
            raise _bad(self, "split", "must be None when eval_dataset_id is given", self.split)
        _check_bool(self, "secret_hold")
        if not isinstance(self.estimate, Estimate):
            raise _bad(self, "estimate", "must be an Estimate", self.estimate)

    # --- the stored form -------------------------------------------------------------

    def _specific(self) -> dict[str, Any]:
        """The provider's own fields, in their stored order."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The dict stored in runs.plan_json (and hashed into the run's plan_hash)."""
        return {
            "version": VERSION,
            "dataset_id": self.dataset_id,
            "dataset_sha256": self.dataset_sha256,
            "provider": self.provider,
            "model": self.model,
            "epochs": self.epochs,
            "epochs_auto": self.epochs_auto,
            **self._specific(),
            "eval_dataset_id": self.eval_dataset_id,
            "split": self.split,
            "secret_hold": self.secret_hold,
            "estimate": self.estimate.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrainingPlan:
        """A stored plan, versioned or from before versions (no "version" key).

        Called on TrainingPlan, answers the subclass for d["provider"]; keys a
        plan does not know are left out; missing ones take their defaults.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a dict, not {type(d).__name__}")
        version = d.get("version", VERSION)
        if version != VERSION:
            raise ValueError(f"TrainingPlan.version {version!r} is not one tunebot reads")
        kind = cls
        if cls is TrainingPlan:  # a providers-file name: its plan says which kind it is
            kind = PLANS.get(d.get("provider")) or KINDS.get(d.get("kind"), TrainingPlan)  # type: ignore[arg-type]
        args = _known(kind, d)
        args["estimate"] = Estimate.from_json(d.get("estimate"))
        return kind(**args)

    def hyperparameters(self) -> dict[str, Any]:
        """What the runner gets as TrainingSpec.hyperparameters."""
        return {"epochs": self.epochs}


@dataclass(frozen=True, kw_only=True)
class OpenAIPlan(TrainingPlan):
    """A run on OpenAI's fine-tuning API (or another host of the same API)."""

    PROVIDER: ClassVar[str | None] = "openai"

    provider: str = field(default="openai", metadata={"help": "Who trains: openai."})
    lr_mult: float | None = field(
        default=None, metadata={"help": "learning_rate_multiplier (0 < lr_mult <= 10), or auto."}
    )
    batch: int | None = field(default=None, metadata={"help": "batch_size (1..256), or auto."})
    suffix: str | None = field(
        default=None, metadata={"help": "Up to 40 of A-Z a-z 0-9 - _ in the model's name."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "lr_mult", float, optional=True)
        _check_positive(self, "batch", int, optional=True)
        if self.suffix is not None and not (
            isinstance(self.suffix, str) and SUFFIX.fullmatch(self.suffix)
        ):
            raise _bad(self, "suffix", "must be up to 40 of A-Z a-z 0-9 - _", self.suffix)

    def _specific(self) -> dict[str, Any]:
        return {"lr_mult": self.lr_mult, "batch": self.batch, "suffix": self.suffix}

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "epochs": None if self.epochs_auto else self.epochs,
            "batch": self.batch,
            "lr_mult": self.lr_mult,
        }


@dataclass(frozen=True, kw_only=True)
class LocalPlan(TrainingPlan):
    """A LoRA / QLoRA run on the local GPU worker (trainers/lora)."""

    PROVIDER: ClassVar[str | None] = "local"

    provider: str = field(default="local", metadata={"help": "Who trains: local."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate (0 < lr <= 1)."})
    batch: int = field(default=4, metadata={"help": "Per-device batch size (1..4096)."})
    r: int = field(default=16, metadata={"help": "LoRA rank (1..1024)."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (1..8192)."})
    targets: str = field(
        default="all-linear",
        metadata={"help": "all-linear, or the module names LoRA adapts: q,k,v,o."},
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per example, at most."})
    qlora: bool | None = field(
        default=None, metadata={"help": "4-bit base weights (QLoRA); None when not asked."}
    )
    merge: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into the base model."}
    )
    gpus: int | None = field(
        default=None,
        metadata={"help": "GPUs, one data-parallel worker each (Ray runner); None: the default."},
    )
    nodes: int | None = field(
        default=None,
        metadata={"help": "Nodes the workers spread over (Ray runner); None: wherever they fit."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "lr", float, optional=False)
        for name in ("gpus", "nodes"):
            _check_positive(self, name, int, optional=True)
        for name in ("batch", "r", "alpha", "max_length"):
            _check_positive(self, name, int, optional=False)
        _check_text(self, "targets")
        if self.targets != "all-linear" and not all(t.strip() for t in self.targets.split(",")):
            raise _bad(self, "targets", "must be all-linear or module names", self.targets)
        _check_bool(self, "qlora", optional=True)
        _check_bool(self, "merge")

    def _specific(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "batch": self.batch,
            "r": self.r,
            "alpha": self.alpha,
            "targets": self.targets,
            "max_length": self.max_length,
            "qlora": self.qlora,
            "merge": self.merge,
            # Only when asked: plans from before these options keep their JSON and hash.
            **{name: getattr(self, name) for name in ("gpus", "nodes") if getattr(self, name)},
        }

    def hyperparameters(self) -> dict[str, Any]:
        """The worker's hyperparameters; gpus= / nodes= become the Ray runner's resources:
        ``num_workers`` (the larger of the two), ``num_gpus`` per worker, ``spread``."""
        params = {"epochs": self.epochs, **self._specific(), "qlora": bool(self.qlora)}
        gpus, nodes = params.pop("gpus", None), params.pop("nodes", None)
        if gpus or nodes:
            params["num_workers"] = max(gpus or 1, nodes or 1)
            if gpus:
                params["num_gpus"] = 1
            if nodes and nodes > 1:
                params["spread"] = True
        return params


def _check_hosted(owner: object) -> None:
    """The fields a plan for a named hosted provider carries: its kind, where its prices
    came from and when they were read."""
    if owner.kind not in KINDS:  # type: ignore[attr-defined]
        raise _bad(owner, "kind", f"must be one of {', '.join(KINDS)}", owner.kind)  # type: ignore[attr-defined]
    _check_text(owner, "prices_read", optional=True)
    _check_text(owner, "prices_source", optional=True)


@dataclass(frozen=True, kw_only=True)
class CompatiblePlan(OpenAIPlan):
    """A run on a providers-file host of OpenAI's fine-tuning API (kind ``openai`` or
    ``openai-compatible``): OpenAI's runner at the provider's URL, priced from the file."""

    PROVIDER: ClassVar[str | None] = None

    provider: str = field(metadata={"help": "The provider's name in the providers file."})
    kind: str = field(
        default="openai-compatible", metadata={"help": "openai or openai-compatible."}
    )
    prices_read: str | None = field(
        default=None, metadata={"help": "When the providers file's prices were read (ISO date)."}
    )
    prices_source: str | None = field(
        default=None, metadata={"help": "Where the providers file's prices come from."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_hosted(self)
        if self.kind == "together":
            raise _bad(self, "kind", "must be openai or openai-compatible", self.kind)

    def _specific(self) -> dict[str, Any]:
        return {
            **super()._specific(),
            "kind": self.kind,
            "prices_read": self.prices_read,
            "prices_source": self.prices_source,
        }


@dataclass(frozen=True, kw_only=True)
class TogetherPlan(TrainingPlan):
    """A run on Together AI's fine-tuning API (trainers/together_ft.py): LoRA unless
    `lora` is False. None for a hyper-parameter means Together's default."""

    PROVIDER: ClassVar[str | None] = None  # "together", or a providers-file name of that kind

    provider: str = field(default="together", metadata={"help": "Who trains: together."})
    kind: str = field(default="together", metadata={"help": "The provider's kind: together."})
    lora: bool = field(default=True, metadata={"help": "LoRA (True) or full fine-tuning."})
    lr: float | None = field(default=None, metadata={"help": "learning_rate (0 < lr <= 1)."})
    batch: int | None = field(default=None, metadata={"help": "batch_size (1..4096)."})
    r: int | None = field(default=None, metadata={"help": "LoRA rank, lora_r (1..1024)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha, lora_alpha."})
    dropout: float | None = field(
        default=None, metadata={"help": "LoRA dropout, lora_dropout (0 <= x < 1)."}
    )
    suffix: str | None = field(
        default=None, metadata={"help": "Up to 40 of A-Z a-z 0-9 - _ in the output model's name."}
    )
    prices_read: str | None = field(
        default=None, metadata={"help": "When the price table was read (a date or a period)."}
    )
    prices_source: str | None = field(
        default=None, metadata={"help": "Where the price table comes from (a URL or a file)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_hosted(self)
        if self.kind != "together":
            raise _bad(self, "kind", "must be together", self.kind)
        _check_bool(self, "lora")
        _check_positive(self, "lr", float, optional=True)
        _check_positive(self, "batch", int, optional=True)
        _check_positive(self, "r", int, optional=True)
        _check_positive(self, "alpha", float, optional=True)
        if self.dropout is not None and not (_number(self.dropout) and 0 <= self.dropout < 1):
            raise _bad(self, "dropout", "must be a number in [0, 1)", self.dropout)
        if not self.lora:
            for name in ("r", "alpha", "dropout"):
                if getattr(self, name) is not None:
                    raise _bad(
                        self, name, "applies to LoRA only (lora is False)", getattr(self, name)
                    )
        if self.suffix is not None and not (
            isinstance(self.suffix, str) and SUFFIX.fullmatch(self.suffix)
        ):
            raise _bad(self, "suffix", "must be up to 40 of A-Z a-z 0-9 - _", self.suffix)

    def _specific(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lora": self.lora,
            "lr": self.lr,
            "batch": self.batch,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "suffix": self.suffix,
            "prices_read": self.prices_read,
            "prices_source": self.prices_source,
        }

    def hyperparameters(self) -> dict[str, Any]:
        """TrainingSpec.hyperparameters by trainers.together_ft's names (None: Together's default)."""
        return {
            "epochs": self.epochs,
            "lora": self.lora,
            "lr": self.lr,
            "batch": self.batch,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
        }


PLANS: dict[str, type[TrainingPlan]] = {
    "openai": OpenAIPlan,
    "local": LocalPlan,
    "together": TogetherPlan,
}
# A providers-file provider's plan, by the provider's kind (trainers/providers.py).
KINDS: dict[str, type[TrainingPlan]] = {
    "openai": CompatiblePlan,
    "openai-compatible": CompatiblePlan,
    "together": TogetherPlan,
}


class Planner:
    """Turns `/finetune train` options into a frozen plan, or a usage error naming the option.

    `find_dataset(channel, ref)` finds a dataset as the workflow does (for eval=);
    `prices` is the workflow's pricing.PriceTable; `providers` the providers file's
    (trainers.providers.Provider by name; named in the refusal of OpenAI runs after its cutoff).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        prices: pricing.PriceTable,
        find_dataset: Callable[[str, str | None], Dataset],
        clock: Callable[[], dt.datetime],
        *,
        providers: Mapping[str, Provider] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.prices = prices
        self.find_dataset = find_dataset
        self.clock = clock
        self.providers = dict(providers or {})

    def _cutoff_refusal(self) -> str | None:
        """The sentence refusing a new run on OpenAI's fine-tuning API after its cutoff
        (bot.retirement.cutoff_refusal: it names where else this installation trains)."""
        return retirement.cutoff_refusal(
            self.clock().date(),
            self.providers,
            local=retirement.local_available(),
            together_key=bool(self.settings.together_api_key),
        )

    def names(self) -> tuple[str, ...]:
        """Every provider name `plan` takes: the built-in ones, then the providers file's."""
        return ("openai", "local", "together", *sorted(set(self.providers) - set(PLANS)))

    def plan(self, provider: str, dataset: Dataset, report, opts: dict[str, str], channel: str):
        """The frozen plan for `provider` (a built-in name or a providers-file name);
        UserError naming the option or the provider when it cannot be planned."""
        if provider == "local":
            return self.local(dataset, report, opts, channel)
        if provider == "openai":
            return self.openai(dataset, report, opts, channel)
        if provider == "together":
            return self.together(dataset, report, opts, channel)
        configured = self.providers.get(provider)
        if configured is None:
            raise UserError(
                f"provider must be one of {', '.join(self.names())}, not "
                f"`{render.escape(provider)}` (`/finetune providers` lists them)."
            )
        if configured.kind == "together":
            return self.together(dataset, report, opts, channel, configured)
        return self.compatible(configured, dataset, report, opts, channel)

    def openai(self, dataset: Dataset, report, opts: dict[str, str], channel: str) -> OpenAIPlan:
        try:
            model = self.prices.resolve(opts.get("model", self.settings.default_model))
            epochs = pricing.parse_epochs(opts.get("epochs"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not model.trainable:
            raise UserError(model.retired or f"{model.name} cannot be fine-tuned.")
        refusal = self._cutoff_refusal()
        if refusal:
            raise UserError(refusal)
        lr_mult = positive(opts, "lr_mult", float, most=10.0)
        batch = positive(opts, "batch", int, most=256)  # OpenAI's range
        suffix = opts.get("suffix")
        if suffix is not None and not SUFFIX.fullmatch(suffix):
            raise UserError("suffix= takes up to 40 ASCII letters, digits, - and _.")
        eval_id, split = self.eval_choice(opts, channel, dataset)
        counts = training_share(report.token_counts, split)
        estimate = pricing.estimate(counts, model, epochs, today=self.clock().date())
        return OpenAIPlan(
            dataset_id=dataset.id,
            dataset_sha256=dataset.sha256,
            model=model.name,
            epochs=estimate.epochs,
            epochs_auto=epochs is None,
            lr_mult=lr_mult,
            batch=batch,
            suffix=suffix,
            eval_dataset_id=eval_id,
            split=split,
            secret_hold=bool(
                egress.secret_findings(dataset)
                or (eval_id and egress.secret_findings(self.store.get_dataset(eval_id)))
            ),
            estimate=Estimate(
                billed_tokens=estimate.billed_tokens,
                cost_usd=round(estimate.cost_usd, 4),
                price_per_1m=model.training_per_1m,
            ),
        )

    def local(self, dataset: Dataset, report, opts: dict[str, str], channel: str) -> LocalPlan:
        unknown = sorted(set(opts) & {"lr_mult", "suffix"})
        if unknown:
            raise UserError(
                f"`{unknown[0]}=` is for provider=openai; local runs take lr=, r=, alpha=, …"
            )
        try:
            epochs = pricing.parse_epochs(opts.get("epochs")) or pricing.DEFAULT_EPOCHS
        except ValueError as exc:
            raise UserError(str(exc)) from None
        from bot.local_models import LocalModels

        # Checked here and again at launch: see bot/local_models.py for what is allowed.
        source = LocalModels(self.settings, self.store).check(opts.get("model"), channel)
        model = source.ref
        targets = opts.get("targets", "all-linear")
        if targets != "all-linear" and not all(t.strip() for t in targets.split(",")):
            raise UserError("targets= takes all-linear, or module names like q,k,v,o.")
        max_length = positive(opts, "max_length", int, most=1_048_576) or 2048
        eval_id, split = self.eval_choice(opts, channel, dataset)
        params = source.params_billions or params_billions(model)
        qlora = flag(opts, "qlora")
        gpus = positive(opts, "gpus", int, most=1024)
        nodes = positive(opts, "nodes", int, most=1024)
        if (gpus or nodes) and self.settings.local_runner != "ray":
            raise UserError(
                "`gpus=` and `nodes=` are for a Ray cluster (TUNEBOT_LOCAL_RUNNER=ray); "
                "this bot trains local runs in one process here."
            )
        local = pricing.local_estimate(
            training_share(report.token_counts, split),
            params_billions=params,
            epochs=epochs,
            max_length=max_length,
            qlora=bool(qlora),
        )
        return LocalPlan(
            dataset_id=dataset.id,
            dataset_sha256=dataset.sha256,
            model=model,
            epochs=epochs,
            epochs_auto=False,
            lr=positive(opts, "lr", float, most=1.0) or 2e-4,
            batch=positive(opts, "batch", int, most=4096) or 4,
            r=positive(opts, "r", int, most=1024) or 16,
            alpha=positive(opts, "alpha", int, most=8192) or 32,
            targets=targets,
            max_length=max_length,
            qlora=qlora,
            merge=bool(flag(opts, "merge")),
            gpus=gpus,
            nodes=nodes,
            eval_dataset_id=eval_id,
            split=split,
            secret_hold=False,  # the data stays on our machines
            estimate=Estimate(
                billed_tokens=0,
                cost_usd=0.0,
                price_per_1m=0.0,
                tokens=local.tokens,
                gpu_hours=round(local.gpu_hours, 4),
                params_billions=params,
            ),
        )

    def together(
        self,
        dataset: Dataset,
        report,
        opts: dict[str, str],
        channel: str,
        configured: Provider | None = None,
    ) -> TogetherPlan:
        """A Together AI plan. Priced from the price table per model size
        (trainers/together_pricing.py), or from the providers file's model list for
        a provider of kind together there (a model it does not list is refused)."""
        name = configured.name if configured else "together"
        unknown = sorted(set(opts) & {"lr_mult", "targets", "max_length", "qlora", "merge"})
        if unknown:
            raise UserError(
                f"`{unknown[0]}=` is not a provider={name} option; it takes epochs=, "
                "batch_size=, learning_rate=, lora=, lora_r=, lora_alpha=, lora_dropout=, suffix=."
            )
        model = (opts.get("model") or "").strip()
        if not model:
            raise UserError(
                f"provider={name} needs model=<Together model>, e.g. "
                "model=meta-llama/Meta-Llama-3.1-8B-Instruct-Reference."
            )
        try:
            epochs = pricing.parse_epochs(opts.get("epochs")) or pricing.DEFAULT_EPOCHS
        except ValueError as exc:
            raise UserError(str(exc)) from None
        lora = flag(opts, "lora")
        lora = True if lora is None else lora
        lr = _one_of(opts, "learning_rate", "lr", float, most=1.0)
        batch = _one_of(opts, "batch_size", "batch", int, most=4096)
        r = _one_of(opts, "lora_r", "r", int, most=1024)
        alpha = _one_of(opts, "lora_alpha", "alpha", float, most=8192)
        dropout = None
        if "lora_dropout" in opts:
            try:
                dropout = float(opts["lora_dropout"])
            except ValueError:
                dropout = math.nan
            if not (math.isfinite(dropout) and 0 <= dropout < 1):
                raise UserError(
                    "lora_dropout= takes a number from 0 up to (not including) 1, not "
                    f"`{render.escape(opts['lora_dropout'])}`."
                )
        if not lora:
            given = [k for k in ("lora_r", "r", "lora_alpha", "alpha", "lora_dropout") if k in opts]
            if given:
                raise UserError(f"`{given[0]}=` is for LoRA; lora=false trains every weight.")
        suffix = opts.get("suffix")
        if suffix is not None and not SUFFIX.fullmatch(suffix):
            raise UserError("suffix= takes up to 40 ASCII letters, digits, - and _.")
        eval_id, split = self.eval_choice(opts, channel, dataset)
        counts = training_share(report.token_counts, split)
        if configured is not None:
            listed = configured.model(model)
            if listed is None:
                raise UserError(_unlisted(configured, model))
            model, rate = listed.name, listed.training_per_1m
            size = params_billions(model)
            read = configured.prices_read.isoformat() if configured.prices_read else None
            source = configured.prices_source or f"the providers file ({name})"
        else:
            rates = self.prices.together
            size = together_pricing.params_billions(model)
            if size is None:
                raise UserError(
                    f"tunebot cannot tell {render.escape(model)}'s size from its name, so "
                    "Together's per-size price cannot be looked up; name the model as Together "
                    "lists it (…-8B-…)."
                )
            try:
                rate = rates.rate(size, lora=lora)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            read, source = rates.read, rates.source
        billed = epochs * sum(counts)
        return TogetherPlan(
            dataset_id=dataset.id,
            dataset_sha256=dataset.sha256,
            provider=name,
            model=model,
            epochs=epochs,
            lora=lora,
            lr=lr,
            batch=batch,
            r=r,
            alpha=alpha,
            dropout=dropout,
            suffix=suffix,
            prices_read=read,
            prices_source=source,
            eval_dataset_id=eval_id,
            split=split,
            secret_hold=self._secret_hold(dataset, eval_id),
            estimate=Estimate(
                billed_tokens=billed,
                cost_usd=round(billed / 1e6 * rate, 4),
                price_per_1m=rate,
                params_billions=size,
            ),
        )

    def compatible(
        self, configured: Provider, dataset: Dataset, report, opts: dict[str, str], channel: str
    ) -> CompatiblePlan:
        """A plan for a providers-file host of OpenAI's fine-tuning API, priced from the
        file; a model the file does not list is refused."""
        name = configured.name
        unknown = sorted(
            set(opts) & {"lr", "r", "alpha", "targets", "max_length", "qlora", "merge"}
        )
        if unknown:
            raise UserError(
                f"`{unknown[0]}=` is not a provider={name} option; it takes model=, epochs=, "
                "batch=, lr_mult=, suffix=."
            )
        model = configured.model(opts.get("model") or "")
        if model is None:
            raise UserError(_unlisted(configured, opts.get("model") or ""))
        if configured.kind == "openai" and (refusal := self._cutoff_refusal()):
            raise UserError(refusal)
        try:
            epochs = pricing.parse_epochs(opts.get("epochs"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        lr_mult = positive(opts, "lr_mult", float, most=10.0)
        batch = positive(opts, "batch", int, most=256)
        suffix = opts.get("suffix")
        if suffix is not None and not SUFFIX.fullmatch(suffix):
            raise UserError("suffix= takes up to 40 ASCII letters, digits, - and _.")
        eval_id, split = self.eval_choice(opts, channel, dataset)
        counts = training_share(report.token_counts, split)
        estimate = pricing.estimate(counts, model, epochs, today=self.clock().date())
        return CompatiblePlan(
            dataset_id=dataset.id,
            dataset_sha256=dataset.sha256,
            provider=name,
            kind=configured.kind,
            model=model.name,
            epochs=estimate.epochs,
            epochs_auto=epochs is None,
            lr_mult=lr_mult,
            batch=batch,
            suffix=suffix,
            prices_read=configured.prices_read.isoformat() if configured.prices_read else None,
            prices_source=configured.prices_source or f"the providers file ({name})",
            eval_dataset_id=eval_id,
            split=split,
            secret_hold=self._secret_hold(dataset, eval_id),
            estimate=Estimate(
                billed_tokens=estimate.billed_tokens,
                cost_usd=round(estimate.cost_usd, 4),
                price_per_1m=model.training_per_1m,
            ),
        )

    def _secret_hold(self, dataset: Dataset, eval_id: str | None) -> bool:
        return bool(
            egress.secret_findings(dataset)
            or (eval_id and egress.secret_findings(self.store.get_dataset(eval_id)))
        )

    def eval_choice(
        self, opts: dict[str, str], channel: str, dataset: Dataset
    ) -> tuple[str | None, float | None]:
        """(the eval dataset's id, None) for eval=, else (None, the held-out share)."""
        if "eval" in opts and "split" in opts:
            raise UserError("Give eval=<dataset> or split=<fraction>, not both.")
        if "eval" in opts:
            held_out = self.find_dataset(channel, opts["eval"])
            if held_out.id == dataset.id:
                raise UserError("The eval set must be another dataset than the training set.")
            if (held_out.errors or 0) > 0:
                raise UserError(f"{held_out.id} has errors and cannot be the eval set.")
            return held_out.id, None
        split = positive(opts, "split", float)
        if split is not None and not 0 < split < 0.5:
            raise UserError("split= takes a fraction between 0 and 0.5, e.g. split=0.1.")
        return None, split if split is not None else SPLIT_DEFAULT


def together_refusal(path: Path, dataset_id: str, provider: str) -> str | None:
    """Why Together would refuse the file at `path` (trainers/together_data.py), in one
    sentence naming the first line and rule, or None when it would take it."""
    findings = together_findings(path)
    if not findings:
        return None
    first = findings[0]
    more = f" ({len(findings) - 1:,} more finding(s) like it)" if len(findings) > 1 else ""
    return (
        f"{dataset_id} cannot be trained on provider={provider}: Together would refuse "
        f"line {first.line}: {render.escape(first.message)} ({first.code}){more}."
    )


def together_findings(path: Path, limit: int = 100) -> list:
    """Together's data findings (trainers/together_data.py) for a chat JSONL file, at most
    `limit`; lines that are not JSON are the validator's business and skipped here."""
    import json

    from trainers.together_data import check_example

    findings: list = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            findings.extend(check_example(row, line=number))
            if len(findings) >= limit:
                break
    return findings[:limit]


def _unlisted(configured: Provider, model: str) -> str:
    listed = ", ".join(m.name for m in configured.models) or "none"
    return (
        f"provider={configured.name} does not list model `{render.escape(model) or '(none)'}` "
        f"in the providers file; it lists: {listed}."
    )


def _one_of(opts: dict[str, str], key: str, short: str, kind: type, *, most: float) -> Any:
    """A value given as `key=` or its short name `short=` (not both)."""
    if key in opts and short in opts:
        raise UserError(f"Give {key}= or {short}=, not both.")
    return positive(opts, key if key in opts else short, kind, most=most)


def positive(opts: dict[str, str], key: str, kind: type, *, most: float | None = None) -> Any:
    """A hyper-parameter given as `key=`: a finite number above 0 and at most `most`,
    or a usage error naming it.

    nan, inf, negatives, zero, absurd sizes and non-numbers are refused when
    the run is requested, never discovered by a provider or a worker later.
    """
    if key not in opts:
        return None
    raw = opts[key].strip()
    what = "a whole number" if kind is int else "a number"
    try:
        value = int(raw) if kind is int else float(raw)
    except ValueError:
        raise UserError(
            f"{key}= must be {what} above 0, not `{render.escape(opts[key])}`."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}= must be {what} above 0, not `{render.escape(opts[key])}`.")
    if most is not None and value > most:
        raise UserError(f"{key}= must be at most {most:,g}, not `{render.escape(opts[key])}`.")
    return value


def flag(opts: dict[str, str], key: str) -> bool | None:
    """A `key=true|false` option (yes/no, on/off, 1/0), None when not given."""
    if key not in opts:
        return None
    value = opts[key].lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise UserError(f"{key}= takes true or false, not `{opts[key]}`.")


def params_billions(model: str) -> float:
    """A size guess from the name (Llama-3.1-8B -> 8), for the GPU-time estimate."""
    if model.lower() == "smollm2":
        return 0.135
    found = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", model.lower().replace("_", "-"))
    if not found:
        return 1.0
    size = float(found.group(1))
    return size / 1000 if found.group(2) == "m" else size


MIN_HELD_OUT, MAX_HELD_OUT, MIN_TRAIN = 5, 200, 10  # the split's bounds, in examples


def held_out_count(valid_examples: int, fraction: float) -> int:
    """How many examples the split holds out (the same rule as trainers.evaluate.split_file)."""
    if valid_examples < MIN_HELD_OUT + MIN_TRAIN:
        return 0
    wanted = max(round(valid_examples * fraction), MIN_HELD_OUT)
    return min(wanted, MAX_HELD_OUT, valid_examples - MIN_TRAIN)


def training_share(counts, split: float | None) -> list[int]:
    """The token counts the run trains on: the held-out share is left out.

    The split itself is made later, from the frozen plan; which examples it
    holds out is seeded, so this takes the same number of the mean-sized
    examples off: an estimate, labelled as such.
    """
    counts = list(counts)
    held = held_out_count(len(counts), split) if split else 0
    if not held:
        return counts
    mean = sum(counts) / len(counts)
    ordered = sorted(counts, key=lambda c: abs(c - mean))
    return ordered[held:]


# --- distillation and evaluation plans ------------------------------------------------


def _check_count(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not (isinstance(value, int) and not isinstance(value, bool)) or value < 0:
        raise _bad(owner, name, "must be a whole number, 0 or more", value)


def _check_usd(owner: object, name: str) -> None:
    value = getattr(owner, name)
    if not _number(value) or not math.isfinite(value) or value < 0:
        raise _bad(owner, name, "must be a finite number, 0 or more", value)


def _read_version(cls: type, d: object) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"a plan must be a dict, not {type(d).__name__}")
    version = d.get("version", VERSION)
    if version != VERSION:
        raise ValueError(f"{cls.__name__}.version {version!r} is not one tunebot reads")
    return d


@dataclass(frozen=True, kw_only=True)
class DistillEstimate:
    """The most a distillation may cost: every prompt answered at max_tokens."""

    input_tokens: int = field(default=0, metadata={"help": "Prompt tokens, all prompts."})
    output_tokens: int = field(
        default=0, metadata={"help": "Answer tokens at most: prompts x max_tokens."}
    )
    cost_usd: float = field(
        default=0.0, metadata={"help": "The teacher's price for them, USD (4 decimals)."}
    )

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens"):
            _check_count(self, name)
        _check_usd(self, "cost_usd")

    def to_json(self) -> dict[str, Any]:
        return {
            "billed_tokens": self.input_tokens + self.output_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "price_per_1m": 0.0,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> DistillEstimate:
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class DistillPlan:
    """`/finetune distill`: a teacher model answers a dataset's prompts (bot/distillation.py).

    Stored like a training plan (`to_json()` with `"version": 1`, hashed into
    the run's plan_hash); `from_json()` reads the dicts stored before versions.
    """

    dataset_id: str = field(metadata={"help": "The prompts' dataset id (d3)."})
    dataset_sha256: str = field(metadata={"help": "The sha256 of its bytes: what is sent."})
    model: str = field(metadata={"help": "The teacher: a model with an inference price."})
    system: str | None = field(
        default=None, metadata={"help": "A system message put before every prompt (system=)."}
    )
    prompts: int = field(default=0, metadata={"help": "Prompts the teacher is asked."})
    max_tokens: int = field(default=1024, metadata={"help": "Answer tokens at most, per prompt."})
    skipped_lines: tuple[int, ...] = field(
        default=(), metadata={"help": "Lines of the file that hold no prompt (1-based)."}
    )
    secret_hold: bool = field(
        default=False,
        metadata={"help": "True when the prompts may hold secrets: approvers must override."},
    )
    estimate: DistillEstimate = field(
        default_factory=DistillEstimate, metadata={"help": "What it may cost at most."}
    )

    def __post_init__(self) -> None:
        for name in ("dataset_id", "dataset_sha256", "model"):
            _check_text(self, name)
        if self.system is not None and not isinstance(self.system, str):
            raise _bad(self, "system", "must be a string or None", self.system)
        _check_count(self, "prompts")
        _check_positive(self, "max_tokens", int, optional=False)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in self.skipped_lines):
            raise _bad(self, "skipped_lines", "must be line numbers", self.skipped_lines)
        _check_bool(self, "secret_hold")
        if not isinstance(self.estimate, DistillEstimate):
            raise _bad(self, "estimate", "must be a DistillEstimate", self.estimate)

    def to_json(self) -> dict[str, Any]:
        """The dict stored in runs.plan_json (and hashed into the run's plan_hash)."""
        return {
            "version": VERSION,
            "kind": "distill",
            "dataset_id": self.dataset_id,
            "dataset_sha256": self.dataset_sha256,
            "provider": "distill",
            "model": self.model,
            "system": self.system,
            "prompts": self.prompts,
            "max_tokens": self.max_tokens,
            "skipped_lines": list(self.skipped_lines),
            "secret_hold": self.secret_hold,
            "estimate": self.estimate.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DistillPlan:
        """A stored distillation plan, versioned or not; unknown keys left out."""
        d = _read_version(cls, d)
        args = _known(cls, d)
        args["skipped_lines"] = tuple(d.get("skipped_lines") or ())
        args["estimate"] = DistillEstimate.from_json(d.get("estimate"))
        return cls(**args)


@dataclass(frozen=True, kw_only=True)
class EvalEstimate:
    """The most an evaluation may cost, by part (bot/evaluation.py, `EvalCost`)."""

    cost_usd: float = field(default=0.0, metadata={"help": "All parts, USD (4 decimals)."})
    generation_usd: float = field(
        default=0.0, metadata={"help": "The base and tuned models' answers, USD."}
    )
    teacher_usd: float = field(
        default=0.0, metadata={"help": "The teacher's answers (distilled runs), USD."}
    )
    judge_usd: float = field(default=0.0, metadata={"help": "The judge model's grades, USD."})

    def __post_init__(self) -> None:
        for name in ("cost_usd", "generation_usd", "teacher_usd", "judge_usd"):
            _check_usd(self, name)

    def to_json(self) -> dict[str, Any]:
        return {
            "cost_usd": self.cost_usd,
            "generation_usd": self.generation_usd,
            "teacher_usd": self.teacher_usd,
            "judge_usd": self.judge_usd,
            "billed_tokens": 0,
            "price_per_1m": 0.0,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> EvalEstimate:
        return cls(**_known(cls, d))


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """An evaluation of a finished run on held-out examples (bot/evaluation.py).

    Stored like a training plan (`to_json()` with `"version": 1`, hashed into
    the evaluation run's plan_hash); `from_json()` reads older dicts too.
    """

    dataset_id: str = field(metadata={"help": "The evaluated run's training dataset (d3)."})
    dataset_sha256: str | None = field(
        default=None, metadata={"help": "The sha256 of that dataset's bytes."}
    )
    model: str = field(metadata={"help": "The evaluated run's base model."})
    target_run: str = field(metadata={"help": "The run evaluated (r4)."})
    eval_sha256: str = field(metadata={"help": "The sha256 of the held-out examples' file."})
    eval_dataset_id: str | None = field(
        default=None, metadata={"help": "The held-out dataset when named (eval=), or None."}
    )
    examples: int = field(default=0, metadata={"help": "Held-out examples answered and scored."})
    teacher: str | None = field(
        default=None, metadata={"help": "The teacher also answering (distilled runs), or None."}
    )
    judge: bool = field(default=False, metadata={"help": "True when a judge model grades."})
    secret_hold: bool = field(
        default=False, metadata={"help": "Always False: the data left once with its run."}
    )
    estimate: EvalEstimate = field(
        default_factory=EvalEstimate, metadata={"help": "What it may cost at most."}
    )

    def __post_init__(self) -> None:
        for name in ("dataset_id", "model", "target_run", "eval_sha256"):
            _check_text(self, name)
        for name in ("dataset_sha256", "eval_dataset_id", "teacher"):
            _check_text(self, name, optional=True)
        _check_count(self, "examples")
        _check_bool(self, "judge")
        _check_bool(self, "secret_hold")
        if not isinstance(self.estimate, EvalEstimate):
            raise _bad(self, "estimate", "must be an EvalEstimate", self.estimate)

    def to_json(self) -> dict[str, Any]:
        """The dict stored in runs.plan_json (and hashed into the run's plan_hash)."""
        return {
            "version": VERSION,
            "kind": "eval",
            "dataset_id": self.dataset_id,
            "dataset_sha256": self.dataset_sha256,
            "provider": "eval",
            "model": self.model,
            "target_run": self.target_run,
            "eval_sha256": self.eval_sha256,
            "eval_dataset_id": self.eval_dataset_id,
            "examples": self.examples,
            "teacher": self.teacher,
            "judge": self.judge,
            "secret_hold": self.secret_hold,
            "estimate": self.estimate.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalPlan:
        """A stored evaluation plan, versioned or not; unknown keys left out."""
        d = _read_version(cls, d)
        args = _known(cls, d)
        args["estimate"] = EvalEstimate.from_json(d.get("estimate"))
        return cls(**args)
