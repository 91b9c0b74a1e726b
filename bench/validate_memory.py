"""Benchmark `tunebot validate` on hostile 1 GB files: memory must stay bounded.

Two generated files: one of blank lines (with an example every MiB, so it is
not an empty file), one of mostly invalid lines (broken JSON, wrong shapes,
wrong keys; 1 in 100 lines a valid example). Each is validated by `tunebot
validate --json` in a fresh process, as a user runs it, worker processes
included; peak RSS is summed over the whole process tree.

Same-run baselines: a small clean file (what the tree costs with nothing to
remember: imports, tokenizer, workers) and `cat FILE > /dev/null` (what just
reading the file costs). The ratios say whether memory grows with the file
(it must not: target peak < 256 MiB summed) and how close to disk speed the
scan runs. Best of --repeat runs for time; memory sampled in a run of its own.

    .venv/bin/python bench/validate_memory.py [--gb 1.0] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
GEN_VERSION = 1  # bump when a generator changes, so cached files are rebuilt
TARGET_MIB = 256
MiB = 1 << 20

SYSTEM = "You are Ava, the support assistant for Brightline Home. Answer politely and briefly."


def _example(i: int) -> str:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Where is my order #{i}?"},
        {"role": "assistant", "content": f"Order #{i} left our warehouse today; it arrives soon."},
    ]
    return json.dumps({"messages": messages}) + "\n"


# Lines people really produce by mistake; every one is some finding's case.
_INVALID = (
    '{{"messages": [{{"role": "user", "content": "q{i}"}}\n',  # truncated: invalid_json
    "not json at all, row {i}\n",  # invalid_json
    '{{"prompt": "q{i}", "completion": "a{i}"}}\n',  # missing_messages, unknown_key x2
    "[{i}, {i}, {i}]\n",  # not_an_object
    '{{"messages": "hello {i}"}}\n',  # messages_not_list
    '{{"messages": [{{"role": "bot", "content": "hi {i}"}}]}}\n',  # invalid_role, no_assistant
    '{{"messages": [{{"role": "user", "content": {i}}}]}}\n',  # invalid_content, no_assistant
    '{{"messages": []}}\n',  # empty_messages
)


def make_blank(path: Path, size: int) -> Path:
    """Runs of blank lines ("\\n", "\\r\\n", " \\n" in turn), a valid example every MiB."""
    if path.exists():
        return path
    patterns = (b"\n", b"\r\n", b" \n")
    tmp = path.with_suffix(".partial")  # renamed only when complete, so reuse is safe
    written = 0
    with open(tmp, "wb") as f:
        for block in range(size // MiB + 1):
            example = _example(block).encode()
            pattern = patterns[block % len(patterns)]
            fill = pattern * ((min(MiB, size - written) - len(example)) // len(pattern))
            written += f.write(example + fill)
            if written >= size:
                break
    tmp.rename(path)
    return path


def make_invalid(path: Path, size: int, seed: int) -> Path:
    """Mostly invalid lines of every common kind; 1 in 100 lines a unique valid example."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    written = i = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            lines = []
            for _ in range(10_000):
                i += 1
                if i % 100 == 0:
                    lines.append(_example(i))
                else:
                    lines.append(rng.choice(_INVALID).format(i=i))
            written += f.write("".join(lines))  # ASCII: characters are bytes
    tmp.rename(path)
    return path


def make_small(path: Path) -> Path:
    if not path.exists():
        path.write_text("".join(_example(i) for i in range(100)))
    return path


# --- measuring a process tree ------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from the kernel's per-thread children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError, ValueError):  # it may exit as we look
            for f in Path(f"/proc/{p}/task").glob("*/children"):
                with contextlib.suppress(OSError, ValueError):
                    todo.extend(map(int, f.read_text().split()))
    return out


def _status_kb(pid: int, *names: str) -> list[int]:
    found = dict.fromkeys(names, 0)
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    return [found[n] for n in names]


def run(cmd: list[str], timeout: float, env: dict | None = None, sample: bool = False) -> dict:
    """Wall seconds, stdout, and (sampled) peak memory of one subprocess tree.

    rss: the largest sum of VmRSS over the tree seen at one moment (every 10 ms).
    hwm: the sum over every process of its own peak (VmHWM): an upper bound on
    the summed peak that no sampling gap can miss a spike in.
    """
    peak_sum = [0]
    hwm: dict[int, int] = {}
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
            total = 0
            for pid in _tree(proc.pid):
                rss, peak = _status_kb(pid, "VmRSS", "VmHWM")
                total += rss
                if peak:
                    hwm[pid] = max(hwm.get(pid, 0), peak)
            peak_sum[0] = max(peak_sum[0], total)
            time.sleep(0.01)

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
            raise RuntimeError(f"over {timeout:g}s, killed: {' '.join(cmd)}") from None
        raise
    wall = time.perf_counter() - start
    if thread:
        thread.join()
    if proc.returncode not in (0, 1):  # 1: the file has findings, still a result
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {
        "wall": wall,
        "out": out.decode(),
        "rss": peak_sum[0] / 1024,
        "hwm": sum(hwm.values()) / 1024,
        "procs": len(hwm),
    }


def _largest_child_maxrss_mib() -> float:
    """The kernel's own peak RSS of the largest process waited for so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bench_file(label: str, path: Path, args: argparse.Namespace, env: dict) -> dict:
    tunebot = str(BIN / "tunebot")
    cmd = [tunebot, "validate", str(path), "--json"]
    times, cats = [], []
    for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
        cats.append(_cat(path, args))
        times.append(run(cmd, args.timeout, env)["wall"])
    sampled = run(cmd, args.timeout, env, sample=True)
    report = json.loads(sampled["out"])
    stored = len(report["findings"])
    counted = sum(report["counts"].values())
    print(f"\n{label}: {path.name} ({path.stat().st_size / 1e9:.2f} GB)")
    print(f"  validate: best {min(times):.2f}s (runs {' '.join(f'{t:.2f}' for t in times)})")
    print(
        f"  cat > /dev/null: best {min(cats):.2f}s; validate / cat = {min(times) / min(cats):.1f}x"
    )
    print(
        f"  findings: {counted:,} counted, {stored:,} stored, "
        f"{len(sampled['out']) / 1e3:,.0f} kB of --json; "
        f"{report['examples']:,} examples, {report['valid_examples']:,} valid"
    )
    for line in report["summary"][:4]:
        print(f"    {line[:110]}")
    print(
        f"  peak memory, {sampled['procs']} processes: RSS {sampled['rss']:,.0f} MiB summed "
        f"(sampled), {sampled['hwm']:,.0f} MiB sum of each process's own peak "
        f"(target < {TARGET_MIB}: {'PASS' if sampled['hwm'] < TARGET_MIB else 'FAIL'})"
    )
    return {"label": label, "gb": path.stat().st_size / 1e9, "time": min(times),
            "cat": min(cats), **{k: sampled[k] for k in ("rss", "hwm")},
            "counted": counted, "stored": stored}  # fmt: skip


def _cat(path: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        subprocess.run(["cat", str(path)], stdout=sink, check=True, timeout=args.timeout)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of each hostile file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    ap.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "tunebot-bench-memory"
    )
    args = ap.parse_args()
    if not os.access(BIN / "tunebot", os.X_OK):
        print(f"error: {BIN / 'tunebot'} not found; create the venv first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    size = int(args.gb * 1e9)
    t = time.perf_counter()
    blank = make_blank(args.out / f"blank-{args.gb}gb-v{GEN_VERSION}.jsonl", size)
    invalid = make_invalid(
        args.out / f"invalid-{args.gb}gb-seed{args.seed}-v{GEN_VERSION}.jsonl", size, args.seed
    )
    small = make_small(args.out / f"small-v{GEN_VERSION}.jsonl")
    print(f"files in {args.out} ({time.perf_counter() - t:.1f}s to make or find)")
    env = {**os.environ, "TUNEBOT_MAX_FILE_MB": "4096"}  # past OpenAI's 512 MB cap on purpose

    try:
        base = run([str(BIN / "tunebot"), "validate", str(small), "--json"], args.timeout, env,
                   sample=True)  # fmt: skip
        print(
            f"baseline: 100 clean examples, {base['wall']:.2f}s, RSS {base['rss']:,.0f} MiB "
            f"summed, {base['hwm']:,.0f} MiB sum of peaks ({base['procs']} process)"
        )
        rows = [
            bench_file("blank lines", blank, args, env),
            bench_file("mostly invalid lines", invalid, args, env),
        ]
    except (RuntimeError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # run() has already killed the process group
        return 130

    nproc = len(os.sched_getaffinity(0))
    print(f"\n### `tunebot validate` on hostile files ({datetime.date.today()}, nproc {nproc})\n")
    print(
        "| file | GB | validate (s) | cat (s) | validate / cat | findings counted / stored "
        "| peak RSS summed (MiB) | sum of per-process peaks (MiB) | vs clean baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['label']} | {r['gb']:.2f} | {r['time']:.2f} | {r['cat']:.2f} "
            f"| {r['time'] / r['cat']:.1f}x | {r['counted']:,} / {r['stored']:,} "
            f"| {r['rss']:,.0f} | {r['hwm']:,.0f} | {r['hwm'] / base['hwm']:.2f}x |"
        )
    print(
        f"\nClean baseline (100 examples): {base['hwm']:,.0f} MiB. Largest single process "
        f"seen by the kernel: {_largest_child_maxrss_mib():,.0f} MiB. Best of {args.repeat} "
        "fresh processes. Reproduce: `.venv/bin/python bench/validate_memory.py`."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
