"""Should we fine-tune at all? The decision tree, as pure rules.

Most teams that reach for fine-tuning should first try a better prompt,
few-shot examples, structured outputs or retrieval. Fine-tuning pays off for
a well-defined, high-volume, repeatable task: a consistent style at scale, a
specialised domain, or distillation of a strong model into a cheap one.
Rules are checked in order; the first that applies gives the advice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBLEMS = {
    "knowledge": "the model lacks knowledge (our docs, our data)",
    "format": "the output format is wrong or unreliable",
    "style": "the style or tone is off",
    "cost": "it is too expensive or too slow",
    "domain": "a specialised domain the model handles badly",
}
TRIED = {
    "prompting": "prompt engineering",
    "few_shot": "few-shot examples",
    "structured_outputs": "structured outputs / JSON mode",
    "rag": "retrieval (RAG)",
}
PATHS = (
    "prompt_engineering",
    "few_shot",
    "structured_outputs",
    "rag",
    "distillation",
    "fine_tuning",
)

HIGH_VOLUME_CALLS_PER_DAY = 1_000  # below this, a longer prompt costs little
ENOUGH_EXAMPLES = 50  # OpenAI trains on 10, but 50-100 good ones is where it shows
TARGET_EXAMPLES = (300, 500)
TOKENS_PER_EXAMPLE = 500  # a planning figure for the cost range
MAX_COUNT = 10**12  # calls a day or examples: anything above is a typo, not a situation


def parse_count(text: object) -> int:
    """A count typed by a person (calls a day, examples): a whole number, 0 to MAX_COUNT.

    Digits only, commas allowed as thousands separators. Anything else raises
    ValueError with a sentence to show next to the field: empty input, "nan", "inf",
    "1e309", "-5", "2.5", "lots", or a number past MAX_COUNT.
    """
    raw = str(text if text is not None else "").strip()
    if not raw:
        raise ValueError("Enter a whole number, 0 or more.")
    digits = raw.replace(",", "")
    shown = raw if len(raw) <= 20 else raw[:20] + "…"
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"Enter a whole number, 0 or more, not “{shown}”.")
    if len(digits.lstrip("0")) > len(str(MAX_COUNT)) or int(digits) > MAX_COUNT:
        raise ValueError(f"Enter a whole number up to {MAX_COUNT:,}, not “{shown}”.")
    return int(digits)


@dataclass(frozen=True)
class Situation:
    problems: frozenset[str]
    calls_per_day: int = 0
    good_examples: int = 0
    tried: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = set(self.problems) - set(PROBLEMS)
        if unknown:
            raise ValueError(
                f"unknown problem {sorted(unknown)[0]!r}; known: {', '.join(PROBLEMS)}"
            )
        unknown = set(self.tried) - set(TRIED)
        if unknown:
            raise ValueError(f"unknown approach {sorted(unknown)[0]!r}; known: {', '.join(TRIED)}")
        if not self.problems:
            raise ValueError("problems: name at least one thing that is wrong today")
        for name in ("calls_per_day", "good_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, not {value!r}")
        if self.calls_per_day < 0 or self.good_examples < 0:
            raise ValueError("calls_per_day and good_examples cannot be negative")


@dataclass(frozen=True)
class Advice:
    path: str
    why: str
    next_step: str
    data_target: str | None = None
    eval_holdout: str | None = None
    cost_range: str | None = None

    def lines(self) -> list[str]:
        out = [
            f"Recommended: {self.path.replace('_', ' ')}",
            f"Why: {self.why}",
            f"Next step: {self.next_step}",
        ]
        if self.data_target:
            out.append(f"Data: {self.data_target}")
        if self.eval_holdout:
            out.append(f"Evaluation: {self.eval_holdout}")
        if self.cost_range:
            out.append(f"Cost: {self.cost_range}")
        return out


def advise(s: Situation, *, price_per_1m: tuple[float, float] = (3.0, 25.0)) -> Advice:
    """The first rule that applies. `price_per_1m` is the cheapest and dearest training price."""
    tried = s.tried
    high_volume = s.calls_per_day >= HIGH_VOLUME_CALLS_PER_DAY

    if "knowledge" in s.problems:
        if "rag" not in tried:
            return Advice(
                "rag",
                "fine-tuning does not reliably teach facts, and your documents change: retrieve the "
                "relevant passages at query time instead",
                "embed your documents, retrieve the top passages for each question, and put them in the prompt",
            )
        return Advice(
            "rag",
            "retrieval already runs, so the gap is in what it finds: fine-tuning would not add the facts",
            "measure retrieval (is the answer in the retrieved passages?) and improve chunking, "
            "ranking and the prompt around it",
        )
    if "format" in s.problems and "structured_outputs" not in tried:
        return Advice(
            "structured_outputs",
            "a schema enforced by the API is exact; fine-tuning only makes the format likelier",
            "describe the output as a JSON schema and use structured outputs (JSON mode)",
        )
    if "prompting" not in tried and not ({"cost"} >= s.problems and high_volume):
        return Advice(
            "prompt_engineering",
            "nothing has been tried yet, and a clear system prompt with the rules written out fixes "
            "most problems in an afternoon",
            "write the conventions, tone and format into the system prompt, and check 20 real cases",
        )
    if "few_shot" not in tried and "cost" not in s.problems:
        return Advice(
            "few_shot",
            "showing the model three to five worked examples is the cheapest way to convey a "
            "style, format or domain convention",
            "add 3-5 of your best input/output pairs to the prompt and compare on the same 20 cases",
        )
    if "cost" in s.problems:
        if not high_volume:
            return Advice(
                "prompt_engineering",
                f"at {s.calls_per_day:,} calls a day a training project costs more than it saves; "
                "a shorter prompt or a smaller model with a good prompt is cheaper",
                "shorten the system prompt and try a cheaper model on the same 20 cases",
            )
        return _trained(
            "distillation",
            "at high volume, a strong teacher model can write the answers and a cheap student learn "
            "them: most of the quality at a fraction of the price (fine-tuning the expensive model "
            "would not make it cheaper)",
            "collect real prompts, let the teacher answer them with /finetune distill, and train a "
            "small student on the result",
            s,
            price_per_1m,
        )
    if not high_volume:
        return Advice(
            "few_shot",
            f"at {s.calls_per_day:,} calls a day the examples in the prompt cost little, and a "
            "training project needs upkeep",
            "keep improving the few-shot examples; revisit fine-tuning when volume grows",
        )
    if s.good_examples < ENOUGH_EXAMPLES:
        return Advice(
            "few_shot",
            f"fine-tuning would fit this high-volume task, but {s.good_examples} good examples are "
            f"too few to train on (aim for {TARGET_EXAMPLES[0]}-{TARGET_EXAMPLES[1]})",
            "keep few-shot in production and collect reviewed examples from real traffic",
            data_target=_data_target(s),
        )
    return _trained(
        "fine_tuning",
        "a well-defined, high-volume task where prompting and few-shot fall short: training bakes "
        "the behaviour in, and a short prompt is cheaper and faster on every call",
        "validate your examples here (drop the JSONL file in the channel), then /finetune train",
        s,
        price_per_1m,
    )


def _data_target(s: Situation) -> str:
    low, high = TARGET_EXAMPLES
    return (
        f"a few hundred excellent examples beat thousands of mediocre ones: aim for {low}-{high} "
        f"reviewed examples (you have {s.good_examples:,})"
    )


def _trained(path: str, why: str, step: str, s: Situation, prices: tuple[float, float]) -> Advice:
    low, high = TARGET_EXAMPLES
    cheapest = low * TOKENS_PER_EXAMPLE * 3 / 1e6 * prices[0]
    dearest = high * TOKENS_PER_EXAMPLE * 3 / 1e6 * prices[1]
    return Advice(
        path,
        why,
        step,
        data_target=_data_target(s),
        eval_holdout="hold out 10-20% of the examples (at least 30) and never train on them; "
        "compare base and tuned on them",
        cost_range=f"about ${cheapest:,.2f}-${dearest:,.2f} to train {low}-{high} examples of "
        f"~{TOKENS_PER_EXAMPLE} tokens for 3 epochs on OpenAI, or LoRA on your own GPU",
    )
