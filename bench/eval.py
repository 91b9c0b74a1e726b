"""Generation time of an evaluation: the article's one-call-at-a-time loop vs tunebot.

Starts the fake OpenAI API on 127.0.0.1 with a fixed latency per chat call,
then generates answers for N held-out examples with two models (the base and
a fine-tuned id), three ways, in one run:

  a. sequential: the article's loop, one ``chat.completions.create`` after another;
  b. tunebot: `trainers.evaluate.generate_openai` at the given concurrency;
  c. tunebot again while the fake answers a burst of 429s (small Retry-After).

Prints the times, the speed-up of (b) over (a) (target: at least 6x at
concurrency 8), the most requests the fake saw at once, and how many answers
were lost (missing or wrong), then a Markdown line for the README. Exits 1
when the target is missed or an answer is lost.

    .venv/bin/python bench/eval.py [--examples 200] [--latency 0.2] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402 (the path is set just above)

from tests.fakes.openai_api import FakeOpenAI  # noqa: E402
from trainers.evaluate import EvalExample, generate_openai  # noqa: E402

BASE = "gpt-4o-mini-2024-07-18"
TUNED = "ft:gpt-4o-mini-2024-07-18:org-tunebot:support:bench01"
TARGET = 6.0


def examples(n: int) -> list[EvalExample]:
    system = {"role": "system", "content": "You are a concise support assistant."}
    return [
        EvalExample(i + 1, [system, {"role": "user", "content": f"How do I reset device {i}?"}], "")
        for i in range(n)
    ]


def expected(model: str, example: EvalExample) -> str:
    """What the fake's default script answers: the model and the last user message."""
    return f"[{model}] {example.prompt[-1]['content']}"


def sequential(client: openai.OpenAI, items: list[EvalExample]) -> tuple[float, int]:
    """(seconds, answers lost) for the article's loop over both models."""
    lost = 0
    start = time.perf_counter()
    for model in (BASE, TUNED):
        for ex in items:
            try:
                response = client.chat.completions.create(
                    model=model, messages=ex.prompt, temperature=0
                )
                actual = response.choices[0].message.content
            except openai.APIError:
                actual = None
            lost += actual != expected(model, ex)
    return time.perf_counter() - start, lost


def concurrent(
    client: openai.OpenAI, items: list[EvalExample], concurrency: int
) -> tuple[float, int]:
    """(seconds, answers lost) for tunebot's generate_openai over both models."""
    lost = 0
    start = time.perf_counter()
    for model in (BASE, TUNED):
        out = generate_openai(client, model, items, concurrency=concurrency)
        lost += sum(
            g.error is not None or g.text != expected(model, ex)
            for g, ex in zip(out, items, strict=True)
        )
    return time.perf_counter() - start, lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per chat call")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate-limits", type=int, default=60, help="429s injected in run (c)")
    parser.add_argument("--retry-after", type=float, default=0.05, help="seconds, on each 429")
    args = parser.parse_args(argv)

    items = examples(args.examples)
    calls = 2 * len(items)
    with FakeOpenAI() as fake:
        fake.latency = args.latency
        client = openai.OpenAI(api_key=fake.api_key, base_url=fake.base_url, max_retries=2)
        print(
            f"{len(items)} examples x 2 models = {calls} chat calls, "
            f"{args.latency * 1000:.0f} ms each, concurrency {args.concurrency}"
        )

        seq_s, seq_lost = sequential(client, items)
        print(f"a. sequential (article's loop): {seq_s:7.2f} s   lost {seq_lost}")

        fake.reset_in_flight()
        con_s, con_lost = concurrent(client, items, args.concurrency)
        peak = fake.max_in_flight
        ratio = seq_s / con_s
        print(
            f"b. tunebot generate_openai:     {con_s:7.2f} s   lost {con_lost}   "
            f"{ratio:.1f}x faster   at most {peak} in flight"
        )

        before = len(fake.chat_calls())
        fake.inject(
            "POST",
            "/chat/completions",
            429,
            times=args.rate_limits,
            retry_after=args.retry_after,
        )
        rl_s, rl_lost = concurrent(client, items, args.concurrency)
        statuses = [c.status for c in fake.chat_calls()[before:]]
        refused, answered = statuses.count(429), statuses.count(200)
        print(
            f"c. (b) with {refused} x 429 (Retry-After {args.retry_after:g} s): "
            f"{rl_s:7.2f} s   lost {rl_lost}   {answered} of {calls} answered"
        )

    ok = ratio >= TARGET and seq_lost == con_lost == rl_lost == 0 and answered == calls
    print(
        f"\n| eval generation, {len(items)} examples x 2 models, "
        f"{args.latency * 1000:.0f} ms/call | sequential {seq_s:.1f} s | "
        f"tunebot (concurrency {args.concurrency}) {con_s:.1f} s | **{ratio:.1f}x** | "
        f"with {refused} injected 429s: {rl_s:.1f} s, {rl_lost} of {calls} lost |"
    )
    if not ok:
        print(f"FAILED: target {TARGET:g}x and no lost answers", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
