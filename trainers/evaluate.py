"""Base model vs fine-tuned model on held-out examples: split, generate, score, summarise.

1. `split_file` holds out an evaluation set (deterministic for a file and a
   seed; an example never lands on both sides); `overlap` finds evaluation
   examples that also appear in a training file.
2. `examples_from_file` turns each chat line into a prompt (every message
   before the last assistant turn) and a reference (that turn).
3. `generate_openai` asks an OpenAI model, many requests at once, losing none
   to rate limits; `generate_local` runs a base model and its LoRA adapter,
   loading the model once.
4. `score` grades both sides with every scorer in `trainers.scorers`, counts
   win / tie / loss and keeps every row, for the summary, the worst examples
   and a CSV. A third model (the teacher of a distilled dataset) can be
   graded beside them, to show how much of its quality the student kept.

No Slack and no storage here: `EvalResult.to_dict` is what gets stored.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainers import scorers
from trainers.loading import MODEL_LOAD
from trainers.openai_ft import OpenAIError
from trainers.pricing import PriceTable, inference_cost
from trainers.scorers import (
    OUTER_ATTEMPTS,
    Judge,
    Score,
    Usage,
    Verdict,
    chat_with_retries,
    content_text,
    normalise,
    render_prompt,
)

if TYPE_CHECKING:
    import openai

RESULT_VERSION = 1
TIE_MARGIN = 0.02  # primary scores this close are a tie
ANSWER_MAX_TOKENS = 512  # what one generated answer may be at most (an estimate prices it)
CHAT_MAX_TOKENS = ANSWER_MAX_TOKENS
MIN_TRAIN = 10  # examples a split leaves for training, at least (OpenAI's minimum)
CHEAP_SCORERS = ("exact", "rouge_l", "chrf")


# -- examples ----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalExample:
    """One held-out example. ``index`` is its 1-based line number in the source file."""

    index: int
    prompt: list[dict]
    reference: str

    @property
    def prompt_text(self) -> str:
        return render_prompt(self.prompt)


def _messages(row: object) -> list[dict] | None:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return messages


def _split_example(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(prompt, reference) around the last assistant turn, or None when there is none."""
    last = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"),
        None,
    )
    if last is None or last == 0:
        return None
    reference = content_text(messages[last].get("content"))
    if not reference.strip():
        return None  # a tool call, say: nothing to compare text with
    # `weight` is a fine-tuning field that chat completions refuse.
    prompt = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:last]]
    return prompt, reference


def _lines(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, text) for each non-blank line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    # Split on "\n" only: str.splitlines would also break at U+2028 inside a JSON string.
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip()]


def _parse(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def examples_from_file(path: str | Path) -> list[EvalExample]:
    """Every line with an assistant turn, as an example; other lines are skipped.

    Raises ValueError for an unreadable file or a line that is not JSON.
    """
    examples: list[EvalExample] = []
    for number, line in _lines(path):
        row = _parse(line)
        if row is None:
            raise ValueError(f"{path}, line {number}: not valid JSON")
        messages = _messages(row)
        parts = _split_example(messages) if messages else None
        if parts is not None:
            examples.append(EvalExample(number, parts[0], parts[1]))
    return examples


def example_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """An example's identity for overlap checks: roles and normalised text."""
    return json.dumps(
        [[m.get("role"), normalise(content_text(m.get("content")))] for m in messages],
        ensure_ascii=False,
    )


# -- splitting -----------------------------------------------------------------------


@dataclass(frozen=True)
class SplitInfo:
    """What `split_file` did. ``eval_lines`` are 1-based line numbers in the source."""

    examples: int  # lines with an assistant turn
    train: int  # lines written to the training file (every line not held out)
    eval: int  # lines written to the evaluation file
    seed: int
    fraction: float
    eval_lines: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self) | {"eval_lines": list(self.eval_lines)}


def split_file(
    path: str | Path,
    out_train: str | Path,
    out_eval: str | Path,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    minimum: int = 5,
    maximum: int = 200,
) -> SplitInfo:
    """Hold out ``fraction`` of the examples (at least ``minimum``, at most ``maximum``).

    The same file and seed give the same split. Duplicate examples (same
    roles and normalised text) are kept together, so nothing held out is also
    trained on. Lines that are not examples (bad JSON, no assistant turn) stay
    in the training file for the validator to report. Raises ValueError when
    fewer than ``minimum`` + 10 examples are there to split.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, not {fraction}")
    if minimum < 1 or maximum < minimum:
        raise ValueError(f"need 1 <= minimum <= maximum, got minimum={minimum} maximum={maximum}")
    lines = _lines(path)
    groups: dict[str, list[int]] = {}  # example key -> positions in `lines`
    for position, (_, line) in enumerate(lines):
        messages = _messages(_parse(line))
        if messages and _split_example(messages) is not None:
            groups.setdefault(example_key(messages), []).append(position)
    count = sum(len(g) for g in groups.values())
    if count < minimum + MIN_TRAIN:
        raise ValueError(
            f"the data has {count} example(s); holding out an evaluation set needs at least "
            f"{minimum + MIN_TRAIN} ({minimum} to evaluate, {MIN_TRAIN} to train)"
        )
    want = min(max(round(count * fraction), minimum), maximum, count - MIN_TRAIN)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held: set[int] = set()
    for key in keys:
        if len(held) + len(groups[key]) <= want:
            held.update(groups[key])
        if len(held) >= want:
            break
    if len(held) < minimum:
        raise ValueError(
            f"the data has too few distinct examples to hold out {minimum} "
            f"(duplicates stay on one side)"
        )
    train_text = "".join(line + "\n" for i, (_, line) in enumerate(lines) if i not in held)
    eval_text = "".join(line + "\n" for i, (_, line) in enumerate(lines) if i in held)
    for out, text in ((out_train, train_text), (out_eval, eval_text)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
    return SplitInfo(
        examples=count,
        train=len(lines) - len(held),
        eval=len(held),
        seed=seed,
        fraction=fraction,
        eval_lines=tuple(lines[i][0] for i in sorted(held)),
    )


def overlap(train_path: str | Path, eval_path: str | Path) -> list[int]:
    """Line numbers of the evaluation file whose example also appears in the training file."""
    seen = set()
    for _, line in _lines(train_path):
        messages = _messages(_parse(line))
        if messages:
            seen.add(example_key(messages))
    found = []
    for number, line in _lines(eval_path):
        messages = _messages(_parse(line))
        if messages and example_key(messages) in seen:
            found.append(number)
    return found


# -- generation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One model answer. A request that finally failed has ``text=""`` and an ``error``."""

    text: str
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def generate_openai(
    client: openai.OpenAI,
    model: str,
    examples: Sequence[EvalExample],
    *,
    concurrency: int = 8,
    max_tokens: int = ANSWER_MAX_TOKENS,
    attempts: int = OUTER_ATTEMPTS,
) -> list[Generation]:
    """One answer per example, in order, with at most ``concurrency`` requests in flight.

    Temperature 0. Rate limits and server errors are retried (the SDK's
    retries, then `scorers.chat_with_retries`' backoff honouring Retry-After);
    a request that still fails gives a `Generation` with an error, and the
    others go on.
    """
    if not model:
        raise ValueError("model is empty")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")

    def one(example: EvalExample) -> Generation:
        params = {
            "model": model,
            "messages": example.prompt,
            "temperature": 0,
            "max_completion_tokens": max_tokens,
        }
        try:
            completion = chat_with_retries(client, params, attempts=attempts)
        except OpenAIError as err:
            return Generation("", str(err))
        except Exception as err:  # e.g. an answer the SDK cannot read; this row only
            return Generation("", f"{type(err).__name__}: {err}")
        usage = completion.usage
        tokens_in = usage.prompt_tokens if usage else 0
        tokens_out = usage.completion_tokens if usage else 0
        if not completion.choices:
            return Generation("", "OpenAI returned no choices", tokens_in, tokens_out)
        message = completion.choices[0].message
        if message.content is None and message.refusal:
            return Generation("", f"refused: {message.refusal}", tokens_in, tokens_out)
        return Generation(message.content or "", None, tokens_in, tokens_out)

    if not examples:
        return []
    with ThreadPoolExecutor(max_workers=min(concurrency, len(examples))) as pool:
        return list(pool.map(one, examples))


def generation_cost(
    model: str, generations: Sequence[Generation], prices: PriceTable | None = None
) -> float | None:
    """USD for these generations at ``model``'s inference price; None when it has none."""
    tokens_in = sum(g.input_tokens for g in generations)
    tokens_out = sum(g.output_tokens for g in generations)
    try:
        return inference_cost(model, tokens_in, tokens_out, prices)
    except ValueError:
        return None


def price_per_1k_calls(
    model: str, generations: Sequence[Generation], prices: PriceTable | None = None
) -> float | None:
    """USD for 1,000 calls like these answered ones at ``model``'s price; None when unknown."""
    answered = [g for g in generations if g.error is None]
    if not answered:
        return None
    cost = generation_cost(model, answered, prices)
    return None if cost is None else cost / len(answered) * 1000


def generate_local(
    base_model: str,
    adapter_dir: str | Path,
    examples: Sequence[EvalExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    device: str | None = None,
) -> tuple[list[str], list[str]]:
    """(base answers, tuned answers) from a base model and its LoRA adapter, loaded once.

    Greedy decoding, left padding, the tokenizer's chat template with the
    generation prompt. The tuned answers come with the adapter on, the base
    ones inside ``model.disable_adapter()``. The tokenizer is the adapter
    directory's when it has one (training may add tokens or a template), else
    the base model's.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter} has no adapter_config.json: not a saved LoRA adapter")
    if not examples:
        return [], []

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a terminal bar in the bot's log is noise

    source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {source} has no chat template")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    with MODEL_LOAD:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(adapter))
    model.to(device)
    model.eval()

    prompts = [
        tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
        for ex in examples
    ]
    # Longest first, so each batch pads little; answers go back in input order.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])

    def run() -> list[str]:
        answers = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = output[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(
                batch, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True
            ):
                answers[i] = text.strip()
        return answers

    tuned = run()
    with model.disable_adapter():
        base_answers = run()
    return base_answers, tuned


# -- scoring -------------------------------------------------------------------------


class Embedder(Protocol):
    def score_many(self, references: Sequence[str], candidates: Sequence[str]) -> list[Score]: ...


@dataclass(frozen=True)
class Row:
    """One example, both answers and every score. Scores are None where invalid."""

    index: int
    prompt: str
    reference: str
    base: str
    tuned: str
    base_scores: dict[str, float | None] = field(default_factory=dict)
    tuned_scores: dict[str, float | None] = field(default_factory=dict)
    base_reason: str = ""  # the judge's rubric reasons, when it ran
    tuned_reason: str = ""
    verdict: str | None = None  # pairwise: "base", "tuned", "tie"; None if not run or invalid
    verdict_reason: str = ""
    swapped: bool | None = None  # pairwise: the tuned answer was shown first
    base_error: str | None = None  # the generation failed
    tuned_error: str | None = None
    teacher: str | None = None  # the third model's answer, when one was compared
    teacher_scores: dict[str, float | None] = field(default_factory=dict)
    teacher_reason: str = ""
    teacher_error: str | None = None


@dataclass(frozen=True)
class ScorerSummary:
    """Means over the rows where both sides have a valid score (``n`` of them).

    ``teacher`` is the third model's mean over the rows where it has a valid
    score, when one was compared.
    """

    name: str
    base: float | None
    tuned: float | None
    delta: float | None
    n: int
    teacher: float | None = None


@dataclass(frozen=True)
class Worst:
    index: int
    prompt: str
    expected: str
    actual: str
    score: float
    reason: str
    base: str  # what the base model said, for contrast


@dataclass(frozen=True)
class EvalResult:
    rows: tuple[Row, ...]
    scorers: tuple[str, ...]  # score columns, in order
    primary: str  # "judge", "embedding" or "rouge_l"
    summaries: tuple[ScorerSummary, ...]
    wins: int  # tuned better
    ties: int
    losses: int  # base better
    outcome_source: str  # "pairwise" or the primary scorer's name
    undecided: int = 0  # rows without an outcome (invalid verdict or score)
    invalid_judge: int = 0  # judge answers that were unparseable or failed
    judge_model: str | None = None
    judge_calls: int = 0
    judge_prompt_tokens: int = 0
    judge_completion_tokens: int = 0
    judge_cost_usd: float | None = None
    base_errors: int = 0  # generations that failed
    tuned_errors: int = 0
    teacher_model: str | None = None  # the third model, when one was compared
    teacher_errors: int = 0

    def summary(self, name: str | None = None) -> ScorerSummary:
        """The summary of one scorer (the primary one by default)."""
        wanted = name or self.primary
        for s in self.summaries:
            if s.name == wanted:
                return s
        raise ValueError(f"no scorer {wanted!r}; scorers: {', '.join(self.scorers)}")

    def kept(self, name: str | None = None) -> float | None:
        """The tuned student's mean score as a share of the teacher's (the primary scorer's by default).

        None without a teacher, or when the teacher's mean is missing or zero.
        """
        s = self.summary(name)
        if self.teacher_model is None or s.tuned is None or not s.teacher:
            return None
        return s.tuned / s.teacher

    def worst(self, n: int = 5) -> list[Worst]:
        """The ``n`` rows with the lowest tuned primary score (rows without one left out)."""
        if n < 0:
            raise ValueError("n must be 0 or more")
        scored = [r for r in self.rows if r.tuned_scores.get(self.primary) is not None]

        def key(r: Row) -> tuple[float, float, int]:
            tuned = r.tuned_scores[self.primary] or 0.0
            base = r.base_scores.get(self.primary)
            return tuned, -((base or 0.0) - tuned), r.index

        out = []
        for r in sorted(scored, key=key)[:n]:
            value = r.tuned_scores[self.primary] or 0.0
            if r.tuned_error:
                reason = f"generation failed: {r.tuned_error}"
            elif self.primary == "judge":
                reason = r.tuned_reason
            else:
                base = r.base_scores.get(self.primary)
                versus = f" (base {base:.2f})" if base is not None else ""
                reason = f"{self.primary} {value:.2f}{versus}"
            out.append(Worst(r.index, r.prompt, r.reference, r.tuned, value, reason, r.base))
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = RESULT_VERSION
        data["rows"] = [asdict(r) for r in self.rows]
        data["summaries"] = [asdict(s) for s in self.summaries]
        data["scorers"] = list(self.scorers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        if not isinstance(data, Mapping) or data.get("version") != RESULT_VERSION:
            raise ValueError(f"not a version {RESULT_VERSION} evaluation result")
        try:
            fields = {k: v for k, v in data.items() if k != "version"}
            fields["rows"] = tuple(Row(**r) for r in data["rows"])
            fields["summaries"] = tuple(ScorerSummary(**s) for s in data["summaries"])
            fields["scorers"] = tuple(data["scorers"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed evaluation result: {exc}") from exc

    def rows_csv(self) -> bytes:
        """Every row as UTF-8 CSV: texts, one column per scorer and model, reasons.

        The teacher's columns are there only when a teacher was compared. A text
        cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a
        leading `'` (OWASP's rule against CSV injection), so a spreadsheet shows
        it instead of running it as a formula; the scores are numbers and stay so.
        """

        def text(value: str | None) -> str:
            value = value or ""
            return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value

        out = io.StringIO()
        writer = csv.writer(out)
        teacher = self.teacher_model is not None
        sides = ("base", "tuned", "teacher") if teacher else ("base", "tuned")
        score_columns = [f"{name}_{side}" for name in self.scorers for side in sides]
        writer.writerow(
            [
                *("index", "prompt", "reference", "base", "tuned"),
                *(("teacher",) if teacher else ()),
                *score_columns,
                *("judge_base_reason", "judge_tuned_reason"),
                *(("judge_teacher_reason",) if teacher else ()),
                *("verdict", "verdict_reason", "swapped", "base_error", "tuned_error"),
                *(("teacher_error",) if teacher else ()),
            ]
        )
        for r in self.rows:
            scores = []
            for name in self.scorers:
                for side in sides:
                    value = getattr(r, f"{side}_scores").get(name)
                    scores.append("" if value is None else f"{value:.4f}")
            writer.writerow(
                [
                    r.index,
                    *(text(v) for v in (r.prompt, r.reference, r.base, r.tuned)),
                    *((text(r.teacher),) if teacher else ()),
                    *scores,
                    *(text(r.base_reason), text(r.tuned_reason)),
                    *((text(r.teacher_reason),) if teacher else ()),
                    *(r.verdict or "", text(r.verdict_reason)),
                    "" if r.swapped is None else str(r.swapped).lower(),
                    *(text(r.base_error), text(r.tuned_error)),
                    *((text(r.teacher_error),) if teacher else ()),
                ]
            )
        return out.getvalue().encode("utf-8")


def _texts(outputs: Sequence[str | Generation]) -> tuple[list[str], list[str | None]]:
    texts, errors = [], []
    for o in outputs:
        if isinstance(o, Generation):
            texts.append(o.text)
            errors.append(o.error)
        elif isinstance(o, str):
            texts.append(o)
            errors.append(None)
        else:
            raise ValueError(f"an output must be a str or a Generation, not {type(o).__name__}")
    return texts, errors


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pairwise_rng(seed: int, position: int) -> random.Random:
    """The generator that orders example ``position``'s two answers: the same every run."""
    return random.Random(f"tunebot-pairwise:{seed}:{position}")


def score(
    examples: Sequence[EvalExample],
    base_outputs: Sequence[str | Generation],
    tuned_outputs: Sequence[str | Generation],
    *,
    judge: Judge | None = None,
    embedder: Embedder | None = None,
    pairwise: bool = True,
    tie_margin: float = TIE_MARGIN,
    teacher_outputs: Sequence[str | Generation] | None = None,
    teacher_model: str | None = None,
) -> EvalResult:
    """Grade both sides of every example and summarise.

    Always: exact, ROUGE-L, chrF. With ``embedder``: embedding similarity.
    With ``judge``: rubric scores for both answers and, when ``pairwise``, a
    verdict with the answers' order drawn per example. The primary score is
    the judge's, else the embedding's, else ROUGE-L; win / tie / loss comes
    from the pairwise verdicts when they ran, else from the primary score
    (within ``tie_margin`` is a tie).

    ``teacher_outputs`` (with ``teacher_model``, its name) are graded by the
    same scorers, rubric included, as a third column; they take no part in
    win / tie / loss, which stays tuned against base.
    """
    if not len(examples) == len(base_outputs) == len(tuned_outputs):
        raise ValueError(
            f"{len(examples)} examples, {len(base_outputs)} base and "
            f"{len(tuned_outputs)} tuned outputs: need one of each per example"
        )
    if (teacher_outputs is None) != (teacher_model is None):
        raise ValueError("teacher_outputs and teacher_model go together")
    if teacher_outputs is not None and len(teacher_outputs) != len(examples):
        raise ValueError(
            f"{len(examples)} examples and {len(teacher_outputs)} teacher outputs: "
            "need one per example"
        )
    base, base_errors = _texts(base_outputs)
    tuned, tuned_errors = _texts(tuned_outputs)
    sides = [base, tuned]
    teacher_errors: list[str | None] = [None] * len(examples)
    if teacher_outputs is not None:
        teacher, teacher_errors = _texts(teacher_outputs)
        sides.append(teacher)
    refs = [ex.reference for ex in examples]
    n = len(examples)

    # grades[name][side][i]: side 0 base, 1 tuned, 2 teacher (when compared)
    names = list(CHEAP_SCORERS)
    grades: dict[str, list[list[Score]]] = {}
    for name in CHEAP_SCORERS:
        fn = getattr(scorers, name)
        grades[name] = [[fn(r, a) for r, a in zip(refs, side, strict=True)] for side in sides]
    if embedder is not None:
        names.append("embedding")
        grades["embedding"] = [embedder.score_many(refs, side) for side in sides]

    verdicts: list[Verdict | None] = [None] * n
    before = Usage()
    if judge is not None:
        names.append("judge")
        before = judge.usage
        with ThreadPoolExecutor(max_workers=judge.concurrency) as pool:
            jobs_rubric = [
                [
                    pool.submit(judge.rubric, ex.prompt, ex.reference, answer)
                    for ex, answer in zip(examples, side, strict=True)
                ]
                for side in sides
            ]
            jobs_pair = []
            if pairwise:
                jobs_pair = [
                    pool.submit(
                        judge.pairwise, ex.prompt, ex.reference, b, t, pairwise_rng(judge.seed, i)
                    )
                    for i, (ex, b, t) in enumerate(zip(examples, base, tuned, strict=True))
                ]
            grades["judge"] = [[j.result() for j in jobs] for jobs in jobs_rubric]
            if jobs_pair:
                verdicts = [j.result() for j in jobs_pair]

    primary = "judge" if judge is not None else "embedding" if embedder is not None else "rouge_l"
    compared = teacher_outputs is not None
    rows = []
    for i, ex in enumerate(examples):
        verdict = verdicts[i]
        teacher_fields: dict[str, Any] = {}
        if compared:
            teacher_fields = {
                "teacher": sides[2][i],
                "teacher_scores": {name: grades[name][2][i].value for name in names},
                "teacher_reason": grades["judge"][2][i].reason if judge is not None else "",
                "teacher_error": teacher_errors[i],
            }
        rows.append(
            Row(
                index=ex.index,
                prompt=ex.prompt_text,
                reference=ex.reference,
                base=base[i],
                tuned=tuned[i],
                base_scores={name: grades[name][0][i].value for name in names},
                tuned_scores={name: grades[name][1][i].value for name in names},
                base_reason=grades["judge"][0][i].reason if judge is not None else "",
                tuned_reason=grades["judge"][1][i].reason if judge is not None else "",
                verdict=verdict.winner if verdict else None,
                verdict_reason=verdict.reason if verdict else "",
                swapped=verdict.swapped if verdict else None,
                base_error=base_errors[i],
                tuned_error=tuned_errors[i],
                **teacher_fields,
            )
        )

    summaries = []
    for name in names:
        pairs = [
            (r.base_scores[name], r.tuned_scores[name])
            for r in rows
            if r.base_scores[name] is not None and r.tuned_scores[name] is not None
        ]
        b_mean = _mean([b for b, _ in pairs])  # type: ignore[misc]
        t_mean = _mean([t for _, t in pairs])  # type: ignore[misc]
        delta = t_mean - b_mean if b_mean is not None and t_mean is not None else None
        teacher_mean = None
        if compared:
            teacher_mean = _mean([v for r in rows if (v := r.teacher_scores[name]) is not None])
        summaries.append(ScorerSummary(name, b_mean, t_mean, delta, len(pairs), teacher_mean))

    wins = ties = losses = undecided = 0
    use_pairwise = judge is not None and pairwise
    for r in rows:
        if use_pairwise:
            outcome = r.verdict
        else:
            b, t = r.base_scores[primary], r.tuned_scores[primary]
            if b is None or t is None:
                outcome = None
            elif abs(t - b) <= tie_margin:
                outcome = "tie"
            else:
                outcome = "tuned" if t > b else "base"
        if outcome == "tuned":
            wins += 1
        elif outcome == "base":
            losses += 1
        elif outcome == "tie":
            ties += 1
        else:
            undecided += 1

    invalid = 0
    judge_fields: dict[str, Any] = {}
    if judge is not None:
        invalid = sum(not s.valid for side in grades["judge"] for s in side)
        invalid += sum(1 for v in verdicts if v is not None and not v.valid)
        after = judge.usage
        used_in = after.prompt_tokens - before.prompt_tokens
        used_out = after.completion_tokens - before.completion_tokens
        try:
            cost = inference_cost(judge.model, used_in, used_out, judge.prices)
        except ValueError:
            cost = None
        judge_fields = {
            "judge_model": judge.model,
            "judge_calls": after.calls - before.calls,
            "judge_prompt_tokens": used_in,
            "judge_completion_tokens": used_out,
            "judge_cost_usd": cost,
        }
    return EvalResult(
        rows=tuple(rows),
        scorers=tuple(names),
        primary=primary,
        summaries=tuple(summaries),
        wins=wins,
        ties=ties,
        losses=losses,
        outcome_source="pairwise" if use_pairwise else primary,
        undecided=undecided,
        invalid_judge=invalid,
        base_errors=sum(e is not None for e in base_errors),
        tuned_errors=sum(e is not None for e in tuned_errors),
        teacher_model=teacher_model,
        teacher_errors=sum(e is not None for e in teacher_errors),
        **judge_fields,
    )
