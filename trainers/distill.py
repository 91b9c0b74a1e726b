"""Distillation: a strong teacher model writes the answers a cheap student learns.

The input is a prompts file: chat examples ending in a user turn, or lines
with a `prompt` string. The teacher answers each through chat completions at
bounded concurrency; the result is a chat fine-tuning file. Prompts the
teacher failed on are returned with their line numbers, never dropped
silently.

Spend is bounded by construction: the estimate counts every answer at the
``max_tokens`` the requests allow (so it is the most the work can cost), and
`distill` takes ``max_usd``: before each chunk it prices the chunk's worst
case (exact input tokens, every answer at ``max_tokens``) and starts only the
prompts that fit. ``should_stop`` (checked before each chunk) lets a caller
cancel; what was answered by then is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.pricing import PriceTable, inference_cost
from trainers.tokens import TokenCounter, chat_tokens

if TYPE_CHECKING:
    import openai

DEFAULT_MAX_TOKENS = 1024  # the most a teacher may write per answer
CHUNK = 16  # prompts per chunk: the granularity of progress, cancel and the spend check


@dataclass(frozen=True)
class Prompt:
    line: int
    messages: list[dict]


@dataclass
class Prompts:
    items: list[Prompt] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)


def load_prompts(path: str | Path, *, system: str | None = None) -> Prompts:
    """Read a prompts file; `system` is added to prompts that have no system message."""
    out = Prompts()
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.problems.append((n, f"not valid JSON: {exc.msg}"))
                continue
            messages = _messages(row)
            if isinstance(messages, str):
                out.problems.append((n, messages))
                continue
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
            out.items.append(Prompt(n, messages))
    return out


def _messages(row: object) -> list[dict] | str:
    """The prompt's messages, or why the line is not a prompt."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        return 'expected {"messages": [...]} ending in a user turn, or {"prompt": "..."}'
    if messages[-1].get("role") != "user":
        return f"the last turn is the {messages[-1].get('role')!s}'s; a prompt ends with the user's turn"
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


@dataclass(frozen=True)
class DistillEstimate:
    prompts: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


def estimate(
    prompts: Sequence[Prompt],
    teacher: str,
    prices: PriceTable,
    counter: TokenCounter | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> DistillEstimate:
    """The most distilling can cost: input tokens counted exactly, every answer at
    ``max_tokens`` (the limit the requests carry). Raises ValueError when the
    teacher has no inference price."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    counter = counter or TokenCounter()
    tokens_in = sum(prompt_tokens(p, counter) for p in prompts)
    tokens_out = max_tokens * len(prompts)
    return DistillEstimate(
        len(prompts), tokens_in, tokens_out, inference_cost(teacher, tokens_in, tokens_out, prices)
    )


def prompt_tokens(prompt: Prompt, counter: TokenCounter) -> int:
    """Input tokens of one prompt by the chat formula."""
    return chat_tokens({"messages": prompt.messages}, counter)[0]


@dataclass
class DistillResult:
    examples: list[dict] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, error)
    input_tokens: int = 0
    output_tokens: int = 0
    answered: int = 0  # prompts sent to the teacher (answered or failed)
    stopped: str | None = None  # why it stopped early: "budget", or should_stop's reason

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for example in self.examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")


def distill(
    client: openai.OpenAI,
    teacher: str,
    prompts: Sequence[Prompt],
    *,
    concurrency: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    on_progress: Callable[[int, int], None] | None = None,
    max_usd: float | None = None,
    prices: PriceTable | None = None,
    counter: TokenCounter | None = None,
    should_stop: Callable[[DistillResult], str | None] | None = None,
    on_spend: Callable[[float], None] | None = None,
) -> DistillResult:
    """The teacher answers every prompt; each answer becomes a training example.

    ``max_usd`` (with ``prices``): no chunk starts unless its worst case fits
    what is left; the prompts that do not fit are left unanswered and
    ``stopped`` is "budget". ``should_stop(result)`` returning a reason stops
    before the next chunk. ``on_spend(usd)`` gets the actual cost so far after
    each chunk; ``on_progress(done, total)`` the count. An exception from a
    callback propagates: callers that must not stop wrap their own.
    """
    from trainers.evaluate import EvalExample, generate_openai

    if max_usd is not None and max_usd < 0:
        raise ValueError("max_usd must be 0 or more")
    if max_usd is not None and counter is None:
        counter = TokenCounter()
    result = DistillResult()
    position = 0
    while position < len(prompts):
        if should_stop is not None and (reason := should_stop(result)):
            result.stopped = reason
            break
        chunk = list(prompts[position : position + CHUNK])
        if max_usd is not None:
            spent = inference_cost(teacher, result.input_tokens, result.output_tokens, prices)
            chunk = _fitting(chunk, teacher, prices, counter, max_tokens, max_usd - spent)
            if not chunk:
                result.stopped = "budget"
                break
        examples = [EvalExample(p.line, p.messages, "") for p in chunk]
        answers = generate_openai(
            client, teacher, examples, concurrency=concurrency, max_tokens=max_tokens
        )
        for prompt, answer in zip(chunk, answers, strict=True):
            result.input_tokens += answer.input_tokens
            result.output_tokens += answer.output_tokens
            if answer.error or not answer.text.strip():
                result.failed.append(
                    (prompt.line, answer.error or "the teacher returned an empty answer")
                )
                continue
            result.examples.append(
                {"messages": [*prompt.messages, {"role": "assistant", "content": answer.text}]}
            )
        position += len(chunk)
        result.answered = position
        if on_spend is not None:
            on_spend(inference_cost(teacher, result.input_tokens, result.output_tokens, prices))
        if on_progress:
            on_progress(position, len(prompts))
    return result


def _fitting(
    chunk: list[Prompt],
    teacher: str,
    prices: PriceTable | None,
    counter: TokenCounter,
    max_tokens: int,
    left_usd: float,
) -> list[Prompt]:
    """The longest head of `chunk` whose worst case costs at most `left_usd`."""
    tokens_in = tokens_out = 0
    for n, prompt in enumerate(chunk):
        tokens_in += prompt_tokens(prompt, counter)
        tokens_out += max_tokens
        if inference_cost(teacher, tokens_in, tokens_out, prices) > left_usd + 1e-12:
            return chunk[:n]
    return chunk
