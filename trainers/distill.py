"""Distillation: a strong teacher model writes the answers a cheap student learns.

The input is a prompts file: chat examples ending in a user turn, or lines
with a `prompt` string. The teacher answers each through chat completions at
bounded concurrency; the result is a chat fine-tuning file. Prompts the
teacher failed on are returned with their line numbers, never dropped
silently.
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

# A planning figure for the estimate: the teacher's answers are not known yet.
EXPECTED_ANSWER_TOKENS = 300
CHUNK = 50  # prompts per progress report


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
    prompts: Sequence[Prompt], teacher: str, prices: PriceTable, counter: TokenCounter | None = None
) -> DistillEstimate:
    """The teacher's input tokens counted exactly; its answers at a planning size."""
    counter = counter or TokenCounter()
    tokens_in = sum(chat_tokens({"messages": p.messages}, counter)[0] for p in prompts)
    tokens_out = EXPECTED_ANSWER_TOKENS * len(prompts)
    return DistillEstimate(
        len(prompts), tokens_in, tokens_out, inference_cost(teacher, tokens_in, tokens_out, prices)
    )


@dataclass
class DistillResult:
    examples: list[dict] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, error)
    input_tokens: int = 0
    output_tokens: int = 0

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
    max_tokens: int = 1024,
    on_progress: Callable[[int, int], None] | None = None,
) -> DistillResult:
    """The teacher answers every prompt; each answer becomes a training example."""
    from trainers.evaluate import EvalExample, generate_openai

    result = DistillResult()
    for start in range(0, len(prompts), CHUNK):
        chunk = prompts[start : start + CHUNK]
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
        if on_progress:
            on_progress(min(start + CHUNK, len(prompts)), len(prompts))
    return result
