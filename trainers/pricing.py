"""What a fine-tuning run will cost: OpenAI's price table, epochs, local GPU time.

Billed tokens = epochs x sum over valid examples of min(tokens, context): an
example longer than the model's training context is truncated and billed at
the limit. Prices are USD per 1M training tokens.

Inference prices (USD per 1M input / output tokens, for the base model and
for a model fine-tuned from it) price evaluation runs: generation with both
models and the LLM judge. See `inference_cost`.

Kinds of file (`trainers.data`): the same per-token rule prices each kind
OpenAI trains. A preference (DPO) row's tokens are its input plus both
outputs, the input counted once (`trainers.data`'s choice, documented there);
billed at the model's training rate like supervised tokens. Image tokens are
in the counts by the gpt-4o rule. `trainable_by` says which providers and
methods can train a kind at all.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainers.errors import TrainerError
from trainers.together_pricing import DEFAULT_RATES, TogetherRates

# OpenAI stops accepting new self-serve fine-tuning jobs on this day.
OPENAI_FINE_TUNING_CUTOFF = dt.date(2027, 1, 6)

DEFAULT_EPOCHS = 3
MIN_EXAMPLE_PASSES = 100
MAX_EXAMPLE_PASSES = 25_000
MAX_EPOCHS = 25


@dataclass(frozen=True)
class ModelPrice:
    name: str
    training_per_1m: float
    context: int
    encoding: str = "o200k_base"
    aliases: tuple[str, ...] = ()
    retired: str | None = None  # why it can no longer be trained, when it cannot
    # Inference, USD per 1M tokens; None where unknown. ft_* price a model
    # fine-tuned from this one (an ``ft:<this model>:...`` id).
    input_per_1m: float | None = None
    output_per_1m: float | None = None
    ft_input_per_1m: float | None = None
    ft_output_per_1m: float | None = None

    @property
    def trainable(self) -> bool:
        return self.retired is None


DEFAULT_PRICES: tuple[ModelPrice, ...] = (
    ModelPrice(
        "gpt-4o-mini-2024-07-18",
        3.00,
        65_536,
        aliases=("gpt-4o-mini",),
        input_per_1m=0.15,
        output_per_1m=0.60,
        ft_input_per_1m=0.30,
        ft_output_per_1m=1.20,
    ),
    ModelPrice(
        "gpt-4.1-mini-2025-04-14",
        5.00,
        65_536,
        aliases=("gpt-4.1-mini",),
        input_per_1m=0.40,
        output_per_1m=1.60,
        ft_input_per_1m=0.80,
        ft_output_per_1m=3.20,
    ),
    ModelPrice(
        "gpt-4.1-2025-04-14",
        25.00,
        65_536,
        aliases=("gpt-4.1",),
        input_per_1m=2.00,
        output_per_1m=8.00,
        ft_input_per_1m=3.00,
        ft_output_per_1m=12.00,
    ),
    ModelPrice(
        "gpt-4o-2024-08-06",
        25.00,
        65_536,
        aliases=("gpt-4o",),
        input_per_1m=2.50,
        output_per_1m=10.00,
        ft_input_per_1m=3.75,
        ft_output_per_1m=15.00,
    ),
    ModelPrice(
        "gpt-4.1-nano-2025-04-14",
        1.50,
        65_536,
        aliases=("gpt-4.1-nano",),
        retired="gpt-4.1-nano fine-tuning is retired; use gpt-4o-mini-2024-07-18",
        input_per_1m=0.10,
        output_per_1m=0.40,
        ft_input_per_1m=0.20,
        ft_output_per_1m=0.80,
    ),
    ModelPrice(
        "gpt-3.5-turbo-0125",
        8.00,
        16_385,
        encoding="cl100k_base",
        aliases=("gpt-3.5-turbo", "gpt-3.5-turbo-1106", "gpt-3.5-turbo-0613"),
        retired="gpt-3.5-turbo fine-tuning is retired; use gpt-4o-mini-2024-07-18",
    ),
)

DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"


class UnknownModel(TrainerError, ValueError):
    """A model name that is not in the price table."""


class RetiredModel(TrainerError, ValueError):
    """A model that OpenAI no longer fine-tunes."""


@dataclass(frozen=True)
class PriceTable:
    models: tuple[ModelPrice, ...] = DEFAULT_PRICES
    # Together AI's rates per model size (trainers/together_pricing.py), with their date.
    together: TogetherRates = field(default=DEFAULT_RATES)

    def resolve(self, name: str) -> ModelPrice:
        """The model for a dated snapshot or a short name (`gpt-4o-mini`)."""
        key = name.strip().lower()
        for model in self.models:
            if key == model.name or key in model.aliases:
                return model
        known = ", ".join(m.name for m in self.trainable())
        raise UnknownModel(f"unknown model {name!r}; trainable models: {known}")

    def trainable(self) -> list[ModelPrice]:
        return [m for m in self.models if m.trainable]

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """Defaults overridden (or extended) by a JSON file.

        Format: {"models": {"<name>": {"training_per_1m": 3.0, "context": 65536,
        "aliases": ["short"], "encoding": "o200k_base", "retired": null,
        "input_per_1m": 0.15, "output_per_1m": 0.6, "ft_input_per_1m": 0.3,
        "ft_output_per_1m": 1.2}}}, and optionally {"together": {"read", "source",
        "sizes"}} (see trainers/together_pricing.py). "models" may be left out when
        "together" is given.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read price file {path}: {exc}") from exc
        entries = data.get("models") if isinstance(data, dict) else None
        together = DEFAULT_RATES
        if isinstance(data, dict) and "together" in data:
            together = TogetherRates.from_json(data["together"], f"price file {path}")
            entries = {} if entries is None else entries
        if not isinstance(entries, dict):
            raise ValueError(f"price file {path} needs an object {{'models': {{name: {{...}}}}}}")
        models = {m.name: m for m in DEFAULT_PRICES}
        for name, fields in entries.items():
            if not isinstance(fields, dict):
                raise ValueError(f"price file {path}: {name!r} must map to an object")
            base = models.get(name) or ModelPrice(name, 0.0, 65_536)
            models[name] = _override(base, fields, f"price file {path}: {name}")
        return cls(tuple(models.values()), together)


_INFERENCE_FIELDS = ("input_per_1m", "output_per_1m", "ft_input_per_1m", "ft_output_per_1m")


def _override(base: ModelPrice, fields: Mapping[str, object], where: str) -> ModelPrice:
    allowed = {"training_per_1m", "context", "encoding", "aliases", "retired", *_INFERENCE_FIELDS}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}; known: {sorted(allowed)}")
    changes: dict[str, object] = dict(fields)
    for name in _INFERENCE_FIELDS:
        if name in changes and changes[name] is not None:
            price = changes[name]
            if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
                raise ValueError(f"{where}: {name} must be a number >= 0 or null")
            changes[name] = float(price)
    if "training_per_1m" in changes:
        price = changes["training_per_1m"]
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise ValueError(f"{where}: training_per_1m must be a number >= 0")
        changes["training_per_1m"] = float(price)
    context = changes.get("context", 1)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"{where}: context must be a positive integer")
    if "aliases" in changes:
        aliases = changes["aliases"]
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{where}: aliases must be a list of strings")
        changes["aliases"] = tuple(a.lower() for a in aliases)
    if "encoding" in changes:
        from trainers.tokens import ENCODING_NAMES

        if changes["encoding"] not in ENCODING_NAMES:
            raise ValueError(f"{where}: encoding must be one of {', '.join(ENCODING_NAMES)}")
    if "retired" in changes and not isinstance(changes["retired"], str | None):
        raise ValueError(f"{where}: retired must be a reason (a string) or null")
    return replace(base, **changes)  # type: ignore[arg-type]


def base_of(model_name_or_ft_id: str) -> tuple[str, bool]:
    """(base model, fine-tuned?) for a model name or an ``ft:<base>:<org>:<suffix>:<id>`` id."""
    name = model_name_or_ft_id.strip()
    if not name.lower().startswith("ft:"):
        return name, False
    base = name.split(":")[1]
    if not base:
        raise ValueError(f"fine-tuned model id {model_name_or_ft_id!r} names no base model")
    return base, True


def inference_cost(
    model_name_or_ft_id: str,
    input_tokens: int,
    output_tokens: int,
    table: PriceTable | None = None,
) -> float:
    """USD for ``input_tokens`` in and ``output_tokens`` out of a model.

    An ``ft:<base>:...`` id is priced at its base model's fine-tuned rates.
    Raises UnknownModel for a model not in the table and ValueError when the
    table has no inference price for it or a token count is negative.
    """
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError("token counts must be 0 or more")
    base, tuned = base_of(model_name_or_ft_id)
    model = (table or PriceTable()).resolve(base)
    if tuned:
        rates = (model.ft_input_per_1m, model.ft_output_per_1m)
    else:
        rates = (model.input_per_1m, model.output_per_1m)
    if rates[0] is None or rates[1] is None:
        kind = "fine-tuned " if tuned else ""
        raise ValueError(f"no {kind}inference price for {model.name} in the price table")
    return (input_tokens * rates[0] + output_tokens * rates[1]) / 1_000_000


def auto_epochs(n_examples: int) -> int:
    """OpenAI's default: 3 epochs, kept within 100..25,000 example passes."""
    if n_examples <= 0:
        return DEFAULT_EPOCHS
    if DEFAULT_EPOCHS * n_examples < MIN_EXAMPLE_PASSES:
        return min(MAX_EPOCHS, MIN_EXAMPLE_PASSES // n_examples)
    if DEFAULT_EPOCHS * n_examples > MAX_EXAMPLE_PASSES:
        return max(1, MAX_EXAMPLE_PASSES // n_examples)
    return DEFAULT_EPOCHS


def parse_epochs(value: str | int | None) -> int | None:
    """`auto` (or None) -> None; otherwise an integer 1..25, or ValueError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        epochs = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"epochs must be a whole number 1..{MAX_EPOCHS} or 'auto', not {value!r}"
        ) from None
    if not 1 <= epochs <= MAX_EPOCHS:
        raise ValueError(f"epochs must be between 1 and {MAX_EPOCHS}, not {epochs}")
    return epochs


@dataclass(frozen=True)
class Estimate:
    model: str
    epochs: int
    epochs_auto: bool
    billed_tokens: int
    cost_usd: float
    truncated_examples: int
    notices: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "epochs": self.epochs,
            "billed_tokens": self.billed_tokens,
            "cost_usd": round(self.cost_usd, 4),
        }


# --- who can train which kind of file --------------------------------------------

# OpenAI's guides, as read 2026-11: vision fine-tuning "use with gpt-4o-2024-08-06";
# DPO lists gpt-4.1-2025-04-14 and gpt-4.1-mini-2025-04-14 (gpt-4.1-nano is retired),
# and launched on gpt-4o-2024-08-06.
OPENAI_VISION_MODELS = ("gpt-4o-2024-08-06",)
OPENAI_DPO_MODELS = ("gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14", "gpt-4o-2024-08-06")


@dataclass(frozen=True)
class Trainer:
    """A provider and method that can train a kind of file."""

    provider: str  # "openai" or "local"
    method: str  # "supervised" or "dpo"
    until: dt.date | None = None  # the day it stops taking new jobs, when known
    models: tuple[str, ...] = ()  # the only models that take it; empty: any trainable one

    @property
    def label(self) -> str:
        name = {"openai": "OpenAI", "local": "local LoRA"}.get(self.provider, self.provider)
        method = {"dpo": "DPO"}.get(self.method, self.method)
        extra = [f"until {self.until}"] if self.until else []
        if self.models:
            extra.append(" / ".join(self.models) + " only")
        return f"{name} {method}" + (f" ({'; '.join(extra)})" if extra else "")

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "method": self.method,
            "until": self.until.isoformat() if self.until else None,
            "models": list(self.models),
        }


def trainable_by(kind: str, *, images: bool = False, today: dt.date | None = None) -> list[Trainer]:
    """Who trains a file of this kind (`trainers.data` kinds): OpenAI until its cutoff,
    local LoRA for supervised text (its models are text-only; local DPO comes later)."""
    today = today or dt.datetime.now(dt.UTC).date()
    openai_open = today < OPENAI_FINE_TUNING_CUTOFF
    cutoff = OPENAI_FINE_TUNING_CUTOFF
    out: list[Trainer] = []
    if kind == "supervised":
        if openai_open:
            models = OPENAI_VISION_MODELS if images else ()
            out.append(Trainer("openai", "supervised", cutoff, models))
        if not images:
            out.append(Trainer("local", "supervised"))
    elif kind == "preference" and openai_open:
        out.append(Trainer("openai", "dpo", cutoff, OPENAI_DPO_MODELS))
    return out


def openai_notices(today: dt.date) -> list[str]:
    days = (OPENAI_FINE_TUNING_CUTOFF - today).days
    if days > 0:
        return [
            f"OpenAI stops accepting new fine-tuning jobs on {OPENAI_FINE_TUNING_CUTOFF} "
            f"({days} day{'s' if days != 1 else ''} from today); "
            "provider=local (your own GPUs) or provider=together (Together AI) trains open "
            "models instead."
        ]
    return [
        f"OpenAI no longer accepts new fine-tuning jobs (since {OPENAI_FINE_TUNING_CUTOFF}); "
        "train with provider=local or provider=together instead."
    ]


def estimate(
    token_counts: Iterable[int],
    model: ModelPrice,
    epochs: int | None = None,
    *,
    today: dt.date | None = None,
) -> Estimate:
    """The cost of training `model` on examples with these token counts.

    `epochs=None` means auto (OpenAI's rule). `today` is injectable so the
    cutoff notice can be tested; it defaults to the UTC date.
    """
    counts = list(token_counts)
    chosen = auto_epochs(len(counts)) if epochs is None else epochs
    clipped = sum(min(c, model.context) for c in counts)
    truncated = sum(1 for c in counts if c > model.context)
    billed = chosen * clipped
    notices = openai_notices(today or dt.datetime.now(dt.UTC).date())
    if model.retired:
        notices.insert(0, model.retired)
    if truncated:
        notices.append(
            f"{truncated} example(s) exceed {model.name}'s {model.context:,}-token context: "
            "truncated, and billed at the limit."
        )
    return Estimate(
        model=model.name,
        epochs=chosen,
        epochs_auto=epochs is None,
        billed_tokens=billed,
        cost_usd=billed / 1_000_000 * model.training_per_1m,
        truncated_examples=truncated,
        notices=tuple(notices),
    )


# --- local GPU time ---------------------------------------------------------

# Training throughput (tokens per second, forward + backward) for LoRA in bf16
# on one 80 GB data-centre GPU (A100/H100 class), batch 4 x grad-accum 2, no
# packing. Rough planning figures: about 6 x params FLOPs per token at 25-35 %
# utilisation of ~300 TFLOPs, rounded down. QLoRA (4-bit base) runs at about
# 60 % of that, for the dequantisation work.
_LOCAL_THROUGHPUT = (  # (max params in billions, tokens/s)
    (0.5, 30_000.0),
    (1.5, 14_000.0),
    (4.0, 6_000.0),
    (9.0, 2_800.0),
    (15.0, 1_500.0),
    (35.0, 650.0),
    (80.0, 280.0),
)
QLORA_SPEED = 0.6


@dataclass(frozen=True)
class LocalEstimate:
    params_billions: float
    epochs: int
    tokens: int
    tokens_per_second: float
    gpu_hours: float
    qlora: bool

    def to_dict(self) -> dict:
        return {
            "params_billions": self.params_billions,
            "qlora": self.qlora,
            "epochs": self.epochs,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "gpu_hours": round(self.gpu_hours, 4),
        }


def local_estimate(
    token_counts: Iterable[int],
    *,
    params_billions: float = 1.0,
    epochs: int = DEFAULT_EPOCHS,
    max_length: int = 2048,
    qlora: bool = False,
) -> LocalEstimate:
    """GPU-hours for a LoRA run: tokens x epochs / an assumed throughput."""
    if params_billions <= 0:
        raise ValueError("params_billions must be positive")
    tokens = sum(min(c, max_length) for c in token_counts) * epochs
    speed = next((s for limit, s in _LOCAL_THROUGHPUT if params_billions <= limit), 120.0)
    if qlora:
        speed *= QLORA_SPEED
    return LocalEstimate(
        params_billions=params_billions,
        epochs=epochs,
        tokens=tokens,
        tokens_per_second=speed,
        gpu_hours=tokens / speed / 3600,
        qlora=qlora,
    )


@dataclass(frozen=True)
class CostTable:
    """The chosen model's estimate, the same for every trainable model, and notices."""

    selected: Estimate
    estimates: tuple[Estimate, ...]
    notices: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "estimate": self.selected.to_dict(),
            "estimates": [e.to_dict() for e in self.estimates],
            "notices": list(self.notices),
        }


def cost_table(
    token_counts: Iterable[int],
    prices: PriceTable,
    model: str,
    epochs: int | None = None,
    *,
    today: dt.date | None = None,
) -> CostTable:
    """Estimates for `model` and every trainable model; raises UnknownModel."""
    counts = list(token_counts)
    chosen = prices.resolve(model)
    selected = estimate(counts, chosen, epochs, today=today)
    others = tuple(
        selected if m.name == chosen.name else estimate(counts, m, epochs, today=today)
        for m in prices.trainable()
    )
    return CostTable(selected, others, selected.notices)


# Sizes shown in reports: a small model, a typical 8B, and 70B in 4-bit.
REPORT_SIZES = ((1.0, False), (8.0, False), (70.0, True))


def local_estimates(
    token_counts: Iterable[int], epochs: int = DEFAULT_EPOCHS, max_length: int = 2048
) -> list[LocalEstimate]:
    counts = list(token_counts)
    return [
        local_estimate(counts, params_billions=p, epochs=epochs, max_length=max_length, qlora=q)
        for p, q in REPORT_SIZES
    ]
