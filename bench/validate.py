"""Benchmark `tunebot validate` against the cookbook's tiktoken counter.

Every variant runs as a fresh subprocess and is timed by wall clock, so imports
and tokenizer loading count as they do for a user. Variants are interleaved per
repeat so machine noise hits all of them alike; the best run is reported.

Besides the text chat file, a vision file (image parts in user messages: low
detail URLs, and some high-detail PNG data URLs whose size the header gives)
and a preference (DPO) file of the same number of examples are measured
against cookbook-style counters written for those formats, which must agree
on the token totals (`--kinds` picks which).

    .venv/bin/python bench/validate.py [--examples 100000] [--big-gb 1.0] [--skip-big]
        [--kinds chat,vision,preference]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
GEN_VERSION = 1  # bump when the generator changes, so cached files are rebuilt

SYSTEM = (
    "You are Ava, the customer-support assistant for Brightline Home, an online store for "
    "kitchen and home goods. Answer politely and concisely. Help customers with orders, "
    "shipping, returns, refunds, account access and product questions. Never ask for a full "
    "card number or a password. If an order is over 30 days old, explain the return policy "
    "before offering a refund. If you cannot solve the problem, offer to open a ticket for a "
    "human agent and give the customer its number. Reply in the customer's language."
)
_VOCAB = (
    "password reset refund order account email shipping delivery tracking number invoice "
    "payment card charge cancel subscription return label package damaged missing address "
    "update login verify code support ticket agent follow-up please thanks help issue "
    "problem today yesterday week store item price discount coupon warranty exchange size "
    "color app website error message phone chat receipt balance credit "
    "café über naïve 日本 Größe"
)
WORDS = _VOCAB.split()

# Both baselines load tiktoken offline, as `trainers.tokens` does for tunebot.
_LOAD = """
import json, sys, time
t0 = time.perf_counter()
from trainers.tokens import tiktoken_encoding
enc = tiktoken_encoding("o200k_base")
t1 = time.perf_counter()
"""

# The cookbook's counter (OpenAI "How to count tokens with tiktoken"), fed the
# offline encoding: what a team would run before uploading.
COOKBOOK = (
    _LOAD
    + """with open(sys.argv[1], encoding="utf-8") as f:
    dataset = [json.loads(line) for line in f]
t2 = time.perf_counter()
total = 0
for ex in dataset:
    total += 3
    for message in ex["messages"]:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value))
            if key == "name":
                total += 1
t3 = time.perf_counter()
print(json.dumps({"total": total, "load_s": t1 - t0, "parse_s": t2 - t1, "count_s": t3 - t2}))
"""
)

# The floor for any counter: parse, then encode_ordinary every string value.
FLOOR = (
    _LOAD
    + """strings, examples, messages = [], 0, 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        examples += 1
        for m in json.loads(line)["messages"]:
            messages += 1
            strings.extend(v for v in m.values() if isinstance(v, str))
t2 = time.perf_counter()
total = sum(len(enc.encode_ordinary(s)) for s in strings)
t3 = time.perf_counter()
overhead = 3 * examples + 3 * messages  # no `name` keys in this data
print(json.dumps({"total": total, "with_formula": total + overhead,
                  "load_s": t1 - t0, "parse_s": t2 - t1, "count_s": t3 - t2}))
"""
)


def _sentence(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=n)
    if rng.random() < 0.3:  # order numbers make digits part of the mix
        words[rng.randrange(n)] = f"#{rng.randrange(10_000, 99_999)}"
    return " ".join(words).capitalize() + rng.choice(".?!")


def _example(rng: random.Random) -> str:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _sentence(rng, rng.randint(8, 40))},
        {"role": "assistant", "content": _sentence(rng, rng.randint(30, 200))},
    ]
    return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"


def make_file(path: Path, seed: int, examples: int = 0, min_bytes: int = 0) -> Path:
    """Write `examples` lines, or lines up to `min_bytes`; reuse the file when it exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")  # renamed only when complete, so reuse is safe
    done = written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while done < examples or written < min_bytes:
            batch = min(10_000, examples - done) if examples else 10_000
            written += f.write("".join(_example(rng) for _ in range(batch)))  # chars ~ bytes
            done += batch
    tmp.rename(path)
    return path


# The cookbook's loop, extended the obvious way for the other kinds: image parts by
# gpt-4o's published rule (85 at low detail; 85 + 170 per 512 px tile at high, the
# size read from the PNG header), and a preference row as its input messages plus
# both outputs (trainers.data's documented choice).
_IMAGE_COST = """
import base64, math
def image_cost(spec):
    if spec.get("detail") == "low":
        return 85
    head = base64.b64decode(spec["url"].split(",", 1)[1][:44])
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return 85 + 170 * math.ceil(round(w) / 512) * math.ceil(round(h) / 512)
"""

COOKBOOK_VISION = (
    _LOAD
    + _IMAGE_COST
    + """with open(sys.argv[1], encoding="utf-8") as f:
    dataset = [json.loads(line) for line in f]
t2 = time.perf_counter()
total = 0
for ex in dataset:
    total += 3
    for message in ex["messages"]:
        total += 3
        for key, value in message.items():
            if isinstance(value, str):
                total += len(enc.encode(value))
            else:
                for part in value:
                    if part["type"] == "text":
                        total += len(enc.encode(part["text"]))
                    else:
                        total += image_cost(part["image_url"])
            if key == "name":
                total += 1
t3 = time.perf_counter()
print(json.dumps({"total": total, "load_s": t1 - t0, "parse_s": t2 - t1, "count_s": t3 - t2}))
"""
)

COOKBOOK_PREFERENCE = (
    _LOAD
    + """with open(sys.argv[1], encoding="utf-8") as f:
    dataset = [json.loads(line) for line in f]
t2 = time.perf_counter()
total = 0
for ex in dataset:
    total += 3
    for message in ex["input"]["messages"] + ex["preferred_output"] + ex["non_preferred_output"]:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value))
            if key == "name":
                total += 1
t3 = time.perf_counter()
print(json.dumps({"total": total, "load_s": t1 - t0, "parse_s": t2 - t1, "count_s": t3 - t2}))
"""
)


def _png_data_url(width: int, height: int) -> str:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + ihdr + bytes(300)
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def _vision_example(rng: random.Random) -> str:
    if rng.random() < 0.1:  # a high-detail image whose size the data URL gives
        size = rng.choice([(512, 512), (1024, 768), (1600, 1200)])
        spec = {"url": _png_data_url(*size), "detail": "high"}
    else:
        spec = {"url": f"https://cdn.example.com/p/{rng.randrange(10**9)}.jpg", "detail": "low"}
    user = [
        {"type": "text", "text": _sentence(rng, rng.randint(8, 40))},
        {"type": "image_url", "image_url": spec},
    ]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": _sentence(rng, rng.randint(30, 200))},
    ]
    return json.dumps({"messages": messages}, ensure_ascii=False) + "\n"


def _preference_example(rng: random.Random) -> str:
    row = {
        "input": {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": _sentence(rng, rng.randint(8, 40))},
            ]
        },
        "preferred_output": [
            {"role": "assistant", "content": _sentence(rng, rng.randint(30, 200))}
        ],
        "non_preferred_output": [
            {"role": "assistant", "content": _sentence(rng, rng.randint(5, 60))}
        ],
    }
    return json.dumps(row, ensure_ascii=False) + "\n"


GENERATORS = {"chat": None, "vision": _vision_example, "preference": _preference_example}
BASELINES = {"vision": COOKBOOK_VISION, "preference": COOKBOOK_PREFERENCE}


def make_kind_file(path: Path, seed: int, examples: int, kind: str) -> Path:
    """`examples` lines of one kind; reused when the file exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for done in range(0, examples, 10_000):
            n = min(10_000, examples - done)
            f.write("".join(GENERATORS[kind](rng) for _ in range(n)))
    tmp.rename(path)
    return path


def bench_kind(args: argparse.Namespace, kind: str, tunebot: Path, python: Path) -> tuple:
    """tunebot against the cookbook-style counter for one non-chat kind."""
    t = time.perf_counter()
    name = f"{kind}-{args.examples}ex-seed{args.seed}-v{GEN_VERSION}.jsonl"
    path = make_kind_file(args.out / name, args.seed, args.examples, kind)
    mb = path.stat().st_size / 1e6
    print(
        f"\n{kind} file: {path} ({args.examples:,} examples, {mb:,.1f} MB, "
        f"{time.perf_counter() - t:.1f}s)"
    )
    variants = {
        "(a) tunebot validate --json": [str(tunebot), "validate", str(path), "--json"],
        f"(b) cookbook-style {kind} counter": [str(python), "-c", BASELINES[kind], str(path)],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    outs: dict[str, dict] = {}
    for _ in range(args.repeat):
        for label, cmd in variants.items():
            wall, out, _, _ = run(cmd, args.timeout)
            times[label].append(wall)
            outs[label] = json.loads(out)
    _, _, rss, pss = run(variants["(a) tunebot validate --json"], args.timeout, sample=True)
    a, b = outs.values()
    totals = [a["tokens"]["total"], b["total"]]
    a_s, b_s = (min(v) for v in times.values())
    print(f"{'variant':<36}{'best s':>8}  {'runs':<20}{'tokens':>14}")
    for (label, runs), total in zip(times.items(), totals, strict=True):
        print(f"{label:<36}{min(runs):>8.2f}  {_fmt_runs(runs):<20}{total:>14,}")
    verdict = "PASS" if b_s / a_s >= 2.5 else "FAIL"
    same = "IDENTICAL" if totals[0] == totals[1] else "DIFFERENT"
    print(f"(b)/(a) = {b_s / a_s:.2f}x   target >= 2.5x: {verdict}")
    print(f"token totals (a) vs (b): {same}; kind {a['kind']!r}, exact {a['tokens']['exact']}")
    print(f"(a) findings: {a['counts'] or 'none'}; images {a.get('images', 0):,}")
    label = f"{kind}: {args.examples:,} examples, {mb:,.0f} MB"
    row = (label, f"{a_s:.2f}", f"{b_s:.2f}", f"{b_s / a_s:.1f}x", f"{rss:,.0f}", f"{pss:,.0f}")
    return row, same


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from the kernel's per-thread children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for f in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):  # it may exit as we look
                todo.extend(map(int, f.read_text().split()))
    return out


def _field_kb(path: str, name: str) -> int:
    with contextlib.suppress(OSError, ValueError), open(path) as f:  # it may have exited
        for line in f:
            if line.startswith(name):
                return int(line.split()[1])
    return 0


def run(cmd: list[str], timeout: float, env: dict | None = None, sample: bool = False):
    """(wall seconds, stdout, peak summed RSS MiB, peak summed PSS MiB) of one subprocess."""
    peak = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # one process group: a timeout kills the workers too
    )

    def sampler() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peak[0] = max(peak[0], sum(_field_kb(f"/proc/{p}/status", "VmRSS:") for p in pids))
            peak[1] = max(peak[1], sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))
            time.sleep(0.02)

    thread = threading.Thread(target=sampler, daemon=True) if sample else None
    if thread:
        thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout or Ctrl-C: leave no workers behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"over {timeout:g}s, killed: {_show(cmd)}") from None
        raise
    wall = time.perf_counter() - start
    if thread:
        thread.join()
    if proc.returncode not in (0, 1):  # 1: the file has findings, still a result
        raise RuntimeError(f"exit {proc.returncode}: {_show(cmd)}\n{err.decode()[-2000:]}")
    return wall, out.decode(), peak[0] / 1024, peak[1] / 1024


def _show(cmd: list[str]) -> str:
    return " ".join("<script>" if "\n" in a else a for a in cmd)


def _fmt_runs(runs: list[float]) -> str:
    return " ".join(f"{r:.2f}" for r in runs)


def bench_small(args: argparse.Namespace, tunebot: Path, python: Path) -> tuple:
    t = time.perf_counter()
    name = f"chat-{args.examples}ex-seed{args.seed}-v{GEN_VERSION}.jsonl"
    path = make_file(args.out / name, args.seed, examples=args.examples)
    mb = path.stat().st_size / 1e6
    print(
        f"file: {path} ({args.examples:,} examples, {mb:,.1f} MB, {time.perf_counter() - t:.1f}s)"
    )
    variants = {
        "(a) tunebot validate --json": [str(tunebot), "validate", str(path), "--json"],
        "(b) cookbook: json.loads + encode": [str(python), "-c", COOKBOOK, str(path)],
        "(c) floor: encode_ordinary only": [str(python), "-c", FLOOR, str(path)],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    outs: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, cmd in variants.items():
            wall, out, _, _ = run(cmd, args.timeout)
            times[name].append(wall)
            outs[name] = json.loads(out)
    # Memory is sampled in a run of its own: the sampler's reads would skew the timings.
    _, _, rss, pss = run(variants["(a) tunebot validate --json"], args.timeout, sample=True)

    a, b, c = outs.values()
    totals = [a["tokens"]["total"], b["total"], c["total"]]
    a_s, b_s, c_s = (min(v) for v in times.values())
    print(f"\n{'variant':<36}{'best s':>8}  {'runs':<20}{'tokens':>14}")
    for (name, runs), total in zip(times.items(), totals, strict=True):
        print(f"{name:<36}{min(runs):>8.2f}  {_fmt_runs(runs):<20}{total:>14,}")
    verdict = "PASS" if b_s / a_s >= 2.5 else "FAIL"
    print(f"\n(b)/(a) = {b_s / a_s:.2f}x   target >= 2.5x: {verdict}")
    print(f"(c)/(a) = {c_s / a_s:.2f}x   (a bare tiktoken pass over the same strings)")
    same = "IDENTICAL" if totals[0] == totals[1] else "DIFFERENT"
    print(f"token totals (a) vs (b): {same} ({totals[0]:,} vs {totals[1]:,})")
    verdict = "matches" if c["with_formula"] == totals[0] else "differs from"
    print(f"(c) + chat-formula overhead = {c['with_formula']:,} ({verdict} (a))")
    for label, o in (("(b)", b), ("(c)", c)):
        print(
            f"{label} inside: load tokenizer {o['load_s']:.2f}s, parse {o['parse_s']:.2f}s, "
            f"count {o['count_s']:.2f}s"
        )
    print(
        f"(a) peak memory, whole process tree: RSS {rss:,.0f} MiB summed, "
        f"PSS {pss:,.0f} MiB summed (PSS splits pages shared after fork)"
    )
    row = (f"chat: {args.examples:,} examples, {mb:,.0f} MB", f"{a_s:.2f}", f"{b_s:.2f}")
    return (*row, f"{b_s / a_s:.1f}x", f"{rss:,.0f}", f"{pss:,.0f}"), same


def bench_big(args: argparse.Namespace, tunebot: Path) -> tuple:
    t = time.perf_counter()
    name = f"chat-{args.big_gb}gb-seed{args.seed}-v{GEN_VERSION}.jsonl"
    path = make_file(args.out / name, args.seed + 1, min_bytes=int(args.big_gb * 1e9))
    mb = path.stat().st_size / 1e6
    print(f"\nbig file: {path} ({mb:,.0f} MB, {time.perf_counter() - t:.1f}s)")
    print("only (a) runs on it: the cookbook baseline keeps every parsed example in memory (GBs)")
    env = {**os.environ, "TUNEBOT_MAX_FILE_MB": "4096"}  # past OpenAI's 512 MB cap on purpose
    cmd = [str(tunebot), "validate", str(path), "--json"]
    runs = [run(cmd, args.timeout, env)[0] for _ in range(args.repeat)]
    _, out, rss, pss = run(cmd, args.timeout, env, sample=True)
    report = json.loads(out)
    print(
        f"(a) best {min(runs):.2f}s (runs {_fmt_runs(runs)}), {report['valid_examples']:,} "
        f"valid examples, {report['tokens']['total']:,} tokens"
    )
    print(
        f"(a) peak memory, whole process tree: RSS {rss:,.0f} MiB summed "
        f"(target < 256: {'PASS' if rss < 256 else 'FAIL'}), PSS {pss:,.0f} MiB summed"
    )
    label = f"{report['examples']:,} examples, {mb:,.0f} MB"
    return (label, f"{min(runs):.2f}", "—", "—", f"{rss:,.0f}", f"{pss:,.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--big-gb", type=float, default=1.0)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument(
        "--kinds",
        default="chat,vision,preference",
        help="comma-separated: chat, vision, preference",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tunebot-bench")
    args = ap.parse_args()
    tunebot, python = BIN / "tunebot", BIN / "python"
    for exe in (tunebot, python):
        if not os.access(exe, os.X_OK):
            print(
                f"error: {exe} not found; create the venv first: "
                "python3.11 -m venv .venv && .venv/bin/pip install -e '.[dev]'",
                file=sys.stderr,
            )
            return 2
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        print("warning: no /proc/*/task/*/children here; peak memory counts the root process only")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(GENERATORS)
    if unknown:
        print(f"error: unknown kind(s) {sorted(unknown)}; known: {', '.join(GENERATORS)}")
        return 2
    try:
        rows, sames = [], []
        if "chat" in kinds:
            row, same = bench_small(args, tunebot, python)
            rows.append(row)
            sames.append(same)
        for kind in kinds:
            if kind != "chat":
                row, kind_same = bench_kind(args, kind, tunebot, python)
                rows.append(row)
                sames.append(kind_same)
        same = "IDENTICAL" if all(x == "IDENTICAL" for x in sames) else "DIFFERENT"
        if not args.skip_big:
            rows.append(bench_big(args, tunebot))
    except (RuntimeError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # run() has already killed the process group
        return 130

    nproc = len(os.sched_getaffinity(0))
    print(f"\n### `tunebot validate` benchmark ({datetime.date.today()}, nproc {nproc})\n")
    print(
        "| file | tunebot validate (s) | cookbook-style tiktoken (s) | speed-up "
        "| peak RSS, tree (MiB) | peak PSS, tree (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nBest of {args.repeat} fresh processes, imports and tokenizer loading included; "
        f"token totals {same.lower()}. Reproduce: `.venv/bin/python bench/validate.py`."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
