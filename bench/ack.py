"""Ack latency of `/finetune` while the bot validates a 100,000-example file.

Starts a fake Slack Web API on 127.0.0.1, runs `tunebot serve --http` as its
own process, and sends signed slash commands at a fixed concurrency: first
with the bot idle (the baseline), then right after dropping a large training
file, so the validation runs during the burst. Prints p50 / p99 of both and
their ratio. Slack gives up on an ack after 3,000 ms; the target is p99 under
300 ms while validating.

    .venv/bin/python bench/ack.py [--requests 200] [--concurrency 20] [--examples 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.signing import (  # noqa: E402 (the path is set just above)
    event_body,
    file_share_message_event,
    post_signed,
    slash_command_body,
)
from tests.fakes.slack_api import FakeSlack  # noqa: E402

SECRET = "bench-signing-secret"
WORDS = [
    "refund",
    "order",
    "account",
    "shipping",
    "invoice",
    "password",
    "reset",
    "login",
    "billing",
    "plan",
    "cancel",
]


def training_file(n: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are a concise, friendly support assistant."}
    lines = []
    for _ in range(n):
        user = " ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(30, 200))) + "."
        messages = [
            system,
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def start_bot(slack: FakeSlack, home: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEBOT_"))}
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=slack.base_url,
        TUNEBOT_HOME=str(home),
    )
    tunebot = Path(sys.executable).with_name("tunebot")
    cmd = [str(tunebot), "serve", "--http", "--port", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if match := re.search(r"listening on (http://\S+)", line):
            return proc, match.group(1) + "/slack/events"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"tunebot serve did not start (exit {proc.poll()})")


def burst(url: str, requests: int, concurrency: int) -> list[float]:
    def one(i: int) -> float:
        status, _, elapsed = post_signed(url, slash_command_body("help", user_id=f"U{i}"), SECRET)
        if status != 200:
            raise RuntimeError(f"ack {i} answered HTTP {status}")
        return elapsed * 1000

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(requests)))


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-p * len(ordered) // 100) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--examples", type=int, default=100_000)
    args = parser.parse_args()

    data = training_file(args.examples)
    with FakeSlack() as slack, tempfile.TemporaryDirectory() as home:
        proc, url = start_bot(slack, Path(home))
        try:
            burst(url, 20, args.concurrency)  # warm up: imports, first connections
            idle = burst(url, args.requests, args.concurrency)

            file = slack.add_file(data, name="big.jsonl")
            started = time.monotonic()
            post_signed(url, event_body(file_share_message_event(file), event_id="EvBench"), SECRET)
            slack.wait_for("download", timeout=30)
            busy = burst(url, args.requests, args.concurrency)
            burst_done = time.monotonic() - started
            slack.wait_for("chat.postMessage", timeout=600)
            validated = time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    mb = len(data) / 1e6
    print(
        f"file: {args.examples:,} examples ({mb:,.0f} MB), validated in {validated:.1f} s after the drop"
    )
    print(f"burst: {args.requests} signed /finetune help at concurrency {args.concurrency}")
    print(f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, values in (("bot idle", idle), ("while validating", busy)):
        print(f"{name:24}{pct(values, 50):9.1f}{pct(values, 99):9.1f}{max(values):9.1f}")
    ratio = pct(busy, 99) / pct(idle, 99)
    overlap = "yes" if burst_done < validated else "NO (validation finished first)"
    print(f"p99 while validating / idle = {ratio:.2f}x; burst overlapped validation: {overlap}")
    verdict = "PASS" if pct(busy, 99) < 300 else "FAIL"
    print(f"target p99 < 300 ms while validating: {verdict} (Slack's limit is 3,000 ms)")
    print(f"mean while validating: {statistics.fmean(busy):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
