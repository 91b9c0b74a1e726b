"""What a Together AI fine-tuning job is expected to cost before anything is uploaded.

Together prices fine-tuning per token processed (epochs x training tokens,
plus n_evals x validation tokens) at a rate set by the model's size bracket,
the method (SFT here) and LoRA or full training
(https://docs.together.ai/docs/fine-tuning/pricing). Its docs give the
formula, not the rates; the rates are on https://www.together.ai/pricing.
`DEFAULT_RATES` holds the SFT rates Together published there in 2025 (USD per
1M tokens: up to 16B LoRA 0.48 / full 0.54, 16.1-69B 1.50 / 1.65, 69.1-100B
2.90 / 3.20), not re-read since: a team that reads newer ones puts them in
the price file (``TUNEBOT_PRICES``) with the day it read them:

    {"together": {"read": "2026-11-30", "source": "https://www.together.ai/pricing",
                  "sizes": [{"up_to_billions": 16, "lora_per_1m": 0.48, "full_per_1m": 0.54,
                             "inference_per_1m": 0.2}, ...]}}

``inference_per_1m`` (optional; the built-in table has none) prices the
evaluation of a tuned model through Together's chat completions: without it
that evaluation is refused, since it could not be checked against the budget.

Together's own estimate (``POST /v1/fine-tunes/estimate-price``) needs the
training file uploaded and validated first, which would send the data before
anyone approved the run, so the plan is priced from this table; the bot asks
Together's estimate after the approval, before the job (bot/runs.py,
``QUOTE_TOLERANCE``), and the job's own ``total_price`` (what Together bills)
settles the spend at the end.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SOURCE = "https://www.together.ai/pricing"


@dataclass(frozen=True)
class SizeRate:
    """SFT rates for models of at most `up_to_billions` parameters, USD per 1M tokens;
    `inference_per_1m` (in and out alike) prices evaluation calls, None when not known."""

    up_to_billions: float
    lora_per_1m: float
    full_per_1m: float
    inference_per_1m: float | None = None


@dataclass(frozen=True)
class TogetherRates:
    """A table of `SizeRate`s (smallest bracket first), when it was read and from where.

    `read` is the day (ISO date) or the period the rates were read in."""

    sizes: tuple[SizeRate, ...]
    read: str
    source: str = SOURCE

    def rate(self, params_billions: float, *, lora: bool) -> float:
        """USD per 1M tokens for a model of this size; ValueError above the largest bracket."""
        for size in self.sizes:
            if params_billions <= size.up_to_billions:
                return size.lora_per_1m if lora else size.full_per_1m
        largest = self.sizes[-1].up_to_billions if self.sizes else 0
        raise ValueError(
            f"no Together price for a {params_billions:g}B model (the table, read {self.read}, "
            f"goes up to {largest:g}B); add a bracket to the price file's together.sizes"
        )

    def inference(self, params_billions: float) -> float | None:
        """USD per 1M tokens in or out for a model of this size, None when the table has none."""
        for size in self.sizes:
            if params_billions <= size.up_to_billions:
                return size.inference_per_1m
        return None

    @classmethod
    def from_json(cls, data: Any, where: str) -> TogetherRates:
        """The price file's ``together`` object; ValueError naming `where` and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: together must be an object with read, source and sizes")
        read, source, sizes = data.get("read"), data.get("source", SOURCE), data.get("sizes")
        if not isinstance(read, str) or not read.strip():
            raise ValueError(f"{where}: together.read must say when the prices were read")
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{where}: together.source must say where the prices come from")
        if not isinstance(sizes, list) or not sizes:
            raise ValueError(f"{where}: together.sizes must be a list of size brackets")
        rows = []
        for i, row in enumerate(sizes):
            at = f"{where}: together.sizes[{i}]"
            needed = {"up_to_billions", "lora_per_1m", "full_per_1m"}
            if not isinstance(row, Mapping) or not needed <= set(row) <= needed | {
                "inference_per_1m"
            }:
                raise ValueError(
                    f"{at} needs up_to_billions, lora_per_1m, full_per_1m (and may have "
                    "inference_per_1m)"
                )
            values = [row["up_to_billions"], row["lora_per_1m"], row["full_per_1m"]]
            values += [row["inference_per_1m"]] if "inference_per_1m" in row else []
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ) or not (values[0] > 0 and values[1] >= 0 and values[2] >= 0):
                raise ValueError(f"{at}: sizes above 0 and prices of 0 or more, in numbers")
            rows.append(SizeRate(*(float(v) for v in values)))  # type: ignore[arg-type]
        rows.sort(key=lambda r: r.up_to_billions)
        return cls(tuple(rows), read.strip(), source.strip())


DEFAULT_RATES = TogetherRates(
    sizes=(
        SizeRate(16.0, 0.48, 0.54),
        SizeRate(69.0, 1.50, 1.65),
        SizeRate(100.0, 2.90, 3.20),
    ),
    read="2025 (as Together published them; not re-read since)",
)


@dataclass(frozen=True)
class TogetherEstimate:
    """Billed tokens (epochs x the training tokens, tunebot's count) and USD at `rate_per_1m`."""

    billed_tokens: int
    rate_per_1m: float
    cost_usd: float
    params_billions: float


def estimate(
    token_counts: Iterable[int],
    params_billions: float,
    *,
    epochs: int,
    lora: bool,
    rates: TogetherRates = DEFAULT_RATES,
) -> TogetherEstimate:
    """The table's price for training these examples `epochs` times.

    Token counts are tunebot's (tiktoken), not Together's tokenizer: an
    estimate, which the card labels with the table's date and source."""
    if epochs < 1:
        raise ValueError("epochs must be 1 or more")
    rate = rates.rate(params_billions, lora=lora)
    billed = epochs * sum(token_counts)
    return TogetherEstimate(billed, rate, billed / 1e6 * rate, params_billions)


def params_billions(model: str) -> float | None:
    """A model's size from its name (``Qwen/Qwen3-32B`` -> 32, ``Llama-3.1-8B`` -> 8,
    ``Mixtral-8x7B`` -> 56), or None when the name says nothing."""
    name = model.lower().replace("_", "-")
    found = re.search(r"(\d+)x(\d+(?:\.\d+)?)b\b", name)
    if found:
        return float(found.group(1)) * float(found.group(2))
    found = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bm])\b", name)
    if not found:
        return None
    size = float(found.group(1))
    return size / 1000 if found.group(2) == "m" else size
