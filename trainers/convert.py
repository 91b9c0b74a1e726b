"""Turning common public dataset formats into OpenAI chat JSONL.

ShareGPT (`conversations` of `from`/`value` turns), Alpaca (`instruction`,
`input`, `output`) and CSV (a prompt and a completion column). Input may be a
JSON array or JSON Lines. A row that cannot be converted is reported with
where it was, never dropped silently.

Input is bounded: a CSV field over `MAX_CSV_FIELD_CHARS`, or JSON nested
deeper than Python's parser goes (about 1,000 levels), is a problem reported
with its line, not a crash.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("sharegpt", "alpaca", "csv")
MAX_CSV_FIELD_CHARS = 128 * 1024  # csv's own default, stated: one field, not one file

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
_CSV_COLUMNS = (
    ("prompt", "completion"),
    ("user", "assistant"),
    ("question", "answer"),
    ("input", "output"),
)


@dataclass
class Conversion:
    examples: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, what)

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for example in self.examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")


def convert(path: Path, fmt: str) -> Conversion:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    text = path.read_text(encoding="utf-8-sig")
    out = Conversion()
    if fmt == "csv":
        rows: Iterator[tuple[str, object]] = _csv_rows(text, out)
        make = _from_csv
    else:
        rows = _json_rows(text, out)
        make = _from_sharegpt if fmt == "sharegpt" else _from_alpaca
    for where, row in rows:
        try:
            out.examples.append(make(row))
        except ValueError as exc:
            out.problems.append((where, str(exc)))
    return out


def _json_rows(text: str, out: Conversion) -> Iterator[tuple[str, object]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            out.problems.append((f"line {exc.lineno}", f"not valid JSON: {exc.msg}"))
            return
        except RecursionError:
            line = _too_deep_line(text)
            out.problems.append((f"line {line}", _TOO_DEEP + "; the file was not converted"))
            return
        for i, item in enumerate(items, 1):
            yield f"item {i}", item
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            out.problems.append((f"line {n}", f"not valid JSON: {exc.msg}"))
            continue
        except RecursionError:
            out.problems.append((f"line {n}", _TOO_DEEP))
            continue
        yield f"line {n}", row


_TOO_DEEP = "JSON nested too deep to read (about 1,000 levels; a chat example needs under 20)"
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep_line(text: str) -> int:
    """The line where `text` first nests about as deep as the parser's limit (1 if never)."""
    deepest, depth = max(1, sys.getrecursionlimit() - 100), 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                return text.count("\n", 0, match.start()) + 1
        elif token in "]}":
            depth -= 1
    return 1


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is missing or empty")
    return value


def _from_sharegpt(row: object) -> dict:
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError('expected {"conversations": [{"from": ..., "value": ...}, ...]}')
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        speaker = str(turn.get("from", "")).lower()
        role = _SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise ValueError(
                f"turn {i} is from {speaker or 'nobody'!r}; known: {', '.join(_SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": _text(turn.get("value"), f"turn {i}'s value")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant (gpt) turn")
    return {"messages": messages}


def _from_alpaca(row: object) -> dict:
    if not isinstance(row, dict):
        raise ValueError('expected {"instruction": ..., "input": ..., "output": ...}')
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("input must be a string")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(row.get("output"), "output")},
    ]
    return {"messages": messages}


def _csv_rows(text: str, out: Conversion) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = 0
    header: list[str] | None = None
    limit = csv.field_size_limit(MAX_CSV_FIELD_CHARS)  # process-wide: put back after
    try:
        header = [h.strip().lower() for h in reader.fieldnames or []]
        pair = next(((p, c) for p, c in _CSV_COLUMNS if p in header and c in header), None)
        if pair is None:
            options = "; ".join(f"{p},{c}" for p, c in _CSV_COLUMNS)
            out.problems.append(
                ("line 1", f"the header needs a prompt and a completion column ({options})")
            )
            return
        reader.fieldnames = header
        for row in reader:
            rows += 1
            if None in row:
                out.problems.append((f"line {reader.line_num}", "more fields than the header has"))
                continue
            yield f"line {reader.line_num}", {"pair": pair, **row}
    except csv.Error as exc:  # an over-long field, a NUL byte: stop there, and say where
        reason = str(exc)
        if "field larger than field limit" in reason:
            reason = (
                f"a field is over {MAX_CSV_FIELD_CHARS // 1024:,} KiB "
                f"({MAX_CSV_FIELD_CHARS:,} characters); shorten or split it"
            )
        row_label = "the header" if header is None else f"row {rows + 1}"
        out.problems.append(
            (
                f"line {reader.reader.line_num} ({row_label})",  # DictReader's lags on errors
                f"{reason}; this row and the rest of the file were not read",
            )
        )
    finally:
        csv.field_size_limit(limit)


def _from_csv(row: dict) -> dict:
    prompt_col, completion_col = row["pair"]
    messages = []
    if (row.get("system") or "").strip():
        messages.append({"role": "system", "content": row["system"]})
    messages += [
        {"role": "user", "content": _text(row.get(prompt_col), prompt_col)},
        {"role": "assistant", "content": _text(row.get(completion_col), completion_col)},
    ]
    return {"messages": messages}
