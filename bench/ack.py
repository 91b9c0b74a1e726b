"""Ack latency of `/finetune` and of button clicks while the bot validates a 100,000-example file.

Starts a fake Slack Web API and a fake OpenAI on 127.0.0.1, runs `tunebot
serve --http` as its own process, and sends signed requests at a fixed
concurrency: `/finetune help` first with the bot idle (the baseline), then
four bursts, each right after dropping a large training file so that its
validation runs during the burst:

- `/finetune help`;
- `/finetune train d1 provider=openai` (the plan and a read-only budget
  check in the ack, the request recorded under its run id; the run, its
  reservation and its card on a job thread), one paid run per request;
- Reject clicks on those pending runs (each opens the reason modal, whose
  trigger lasts 3 s: the one Slack call an ack makes);
- Approve clicks on the same runs (recorded before the 200, counted on a job
  thread; each approval submits a job to the fake OpenAI).

Approvers are a Slack user group, resolved at start. Prints p50 / p99 / max
of each and whether each burst overlapped the validation. Slack gives up on
an ack after 3,000 ms; the target is p99 under 300 ms while validating.

    .venv/bin/python bench/ack.py [--requests 200] [--concurrency 20] [--examples 100000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.openai_api import FakeOpenAI  # noqa: E402 (the path is set just above)
from tests.fakes.signing import (  # noqa: E402
    button_click_payload,
    event_body,
    file_share_message_event,
    interaction_body,
    post_signed,
    slash_command_body,
)
from tests.fakes.slack_api import FakeSlack  # noqa: E402

SECRET = "bench-signing-secret"
LOG: list[str] = []  # the bot's stderr
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


def start_bot(slack: FakeSlack, openai: FakeOpenAI, home: Path) -> tuple[subprocess.Popen, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "TUNEBOT_", "OPENAI_"))
    }
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SECRET,
        SLACK_API_URL=slack.base_url,
        TUNEBOT_HOME=str(home),
        TUNEBOT_APPROVERS="S1",
        OPENAI_API_KEY=openai.api_key,
        OPENAI_BASE_URL=openai.base_url,
    )
    tunebot = Path(sys.executable).with_name("tunebot")
    cmd = [str(tunebot), "serve", "--http", "--port", "0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        LOG.append(line)
        if match := re.search(r"listening on (http://\S+)", line):
            # Keep reading its log: a full pipe would block the bot mid-burst.
            threading.Thread(target=lambda: LOG.extend(proc.stderr), daemon=True).start()
            return proc, match.group(1) + "/slack/events"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"tunebot serve did not start (exit {proc.poll()})")


def command(text: str, user: str = "UR") -> Callable[[int], str]:
    return lambda i: slash_command_body(text, user_id=user if text != "help" else f"U{i}")


def click(action_id: str, user: str) -> Callable[[int], str]:
    """A button on run r<i+1>'s approval card."""

    def body(i: int) -> str:
        payload = button_click_payload(user, action_id, f"r{i + 1}", trigger_id=f"trigger-{i}")
        return interaction_body(payload)

    return body


def burst(
    url: str, requests: int, concurrency: int, body: Callable[[int], str] | None = None
) -> tuple[list[float], list[str]]:
    """(ack milliseconds, answer texts) of `requests` signed requests at `concurrency`.

    Sent from a process of their own: the fakes in this one get busy while the
    bot works (cards, Home tabs, uploads), and must not slow the clock's readers.
    """
    body = body or command("help")
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as client:
        return client.submit(_send, url, [body(i) for i in range(requests)], concurrency).result()


def _send(url: str, bodies: list[str], concurrency: int) -> tuple[list[float], list[str]]:
    def one(body: str) -> tuple[float, str]:
        status, text, elapsed = post_signed(url, body, SECRET)
        if status != 200:
            raise RuntimeError(f"ack answered HTTP {status}")
        return elapsed * 1000, text

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, bodies))
    return [ms for ms, _ in results], [text for _, text in results]


def approvals(home: Path) -> int:
    """Approvals the bot has counted so far (read from its database)."""
    import sqlite3
    from contextlib import closing

    uri = f"file:{home / 'tunebot.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        return db.execute("SELECT COUNT(*) FROM approvals WHERE decision = 'approve'").fetchone()[0]


def wait_report(slack: FakeSlack, file: dict, timeout: float = 600) -> None:
    """Until the file's validation report is in its thread."""
    ts = file["shares"]["public"]["C1"][0]["ts"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(" examples" in m["text"] for m in slack.messages(channel="C1", thread_ts=ts)):
            return
        time.sleep(0.05)
    sys.exit(f"no report for {file['name']} within {timeout:.0f} s")


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-p * len(ordered) // 100) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument(
        "--train-examples", type=int, default=1_000, help="size of the dataset `train` names"
    )
    args = parser.parse_args()
    n, c = args.requests, args.concurrency

    data = training_file(args.examples)
    rows: list[tuple[str, list[float], bool]] = []
    with (
        FakeSlack(usergroups={"S1": ["UA", "UB"]}) as slack,
        FakeOpenAI(api_key="sk-bench") as openai,
        tempfile.TemporaryDirectory() as home,
    ):
        proc, url = start_bot(slack, openai, Path(home))
        drops = 0

        def validating(name: str, body: Callable[[int], str]) -> list[str]:
            """A burst right after a big file is dropped, so that it runs during the validation."""
            nonlocal drops
            drops += 1
            file = slack.add_file(data, name=f"big{drops}.jsonl")
            started = time.monotonic()
            event = event_body(file_share_message_event(file), event_id=f"EvBig{drops}")
            post_signed(url, event, SECRET)
            slack.wait_for("download", count=drops + 1, timeout=60)
            values, texts = burst(url, n, c, body)
            burst_done = time.monotonic() - started
            wait_report(slack, file)
            rows.append((name, values, burst_done < time.monotonic() - started))
            return texts

        try:
            small = slack.add_file(training_file(args.train_examples, seed=3), name="d1.jsonl")
            post_signed(url, event_body(file_share_message_event(small), event_id="EvD1"), SECRET)
            wait_report(slack, small)
            burst(url, 20, c)  # warm up: imports, first connections
            idle, _ = burst(url, n, c)
            rows.append(("/finetune help, bot idle", idle, True))

            validating("/finetune help", command("help"))
            acks = validating("/finetune train", command("train d1 provider=openai"))
            failed = [json.loads(t)["text"] for t in acks if "needs approval" not in t]
            validating("Reject click (opens a modal)", click("reject_run", "UB"))
            validating("Approve click", click("approve_run", "UA"))
            modals = len(slack.opened_views)
            accepted = n - len(failed)
            settled = time.monotonic()
            while approvals(Path(home)) < accepted and time.monotonic() - settled < 300:
                time.sleep(0.5)
            counted, settled = approvals(Path(home)), time.monotonic() - settled
            jobs = len(openai.jobs())
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    mb = len(data) / 1e6
    print(
        f"big file: {args.examples:,} examples ({mb:,.0f} MB), dropped before each burst; "
        f"train names d1 ({args.train_examples:,} examples)"
    )
    print(
        f"each burst: {n} signed requests at concurrency {c}; {modals} reject modals opened; "
        f"{counted} approvals counted {settled:.0f} s after the last burst, {jobs} jobs "
        "submitted to OpenAI by then (the rest wait for a long-job thread)"
    )
    print(f"{'':32}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  overlapped validation")
    for name, values, overlapped in rows:
        label = name if "idle" in name else f"{name}, validating"
        print(
            f"{label:32}{pct(values, 50):9.1f}{pct(values, 99):9.1f}{max(values):9.1f}  "
            f"{'yes' if overlapped else 'NO (validation finished first)'}"
        )
    if failed:
        print(f"{len(failed)} of {n} train acks were not accepted, e.g.: {failed[0]!r}")
        print("bot log errors:", *{line.split(" ", 3)[-1] for line in LOG if "ERROR" in line})
    busy = [values for name, values, _ in rows if "idle" not in name]
    worst = max(pct(values, 99) for values in busy)
    verdict = "PASS" if worst < 300 else "FAIL"
    print(f"target p99 < 300 ms while validating, every kind: {verdict} (worst {worst:.1f} ms;")
    print("Slack's limit is 3,000 ms)")
    print(
        f"mean while validating, all kinds: {statistics.fmean(v for b in busy for v in b):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
