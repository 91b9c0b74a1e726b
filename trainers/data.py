"""Streaming validation of OpenAI chat fine-tuning JSONL.

`validate(path)` reads the file line by line (memory stays flat whatever its
size), records every problem as a `Finding` with its 1-based line number, and
counts tokens of the valid examples by OpenAI's chat formula. One bad line
never stops the scan, and a `Report` is always produced.

Memory is bounded by design: past the first `MAX_FINDINGS_PER_CODE` findings
of one code they are counted, not stored (`Report.counts` has the true number
per code), and runs of blank lines are skipped in bulk, so a file of a billion
blank or broken lines costs what a file of a thousand does.

Large files are split at line boundaries and scanned by two processes (JSON
parsing and tokenising are CPU-bound; threads would fight over the GIL). The
cross-line checks (duplicates, the dominant system prompt) run afterwards on
compact per-example arrays.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

from trainers import secrets
from trainers.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter, message_strings

ERROR = "error"
WARNING = "warning"

# Every finding code, its severity, and what it means. Codes are stable: tools
# and tests match on them.
CODES: dict[str, tuple[str, str]] = {
    "invalid_json": (ERROR, "the line is not valid JSON"),
    "invalid_utf8": (ERROR, "the line is not valid UTF-8"),
    "line_too_long": (ERROR, "the line is longer than the scanner reads at once"),
    "not_an_object": (ERROR, "the line is JSON but not an object"),
    "missing_messages": (ERROR, "the example has no 'messages'"),
    "messages_not_list": (ERROR, "'messages' is not a list"),
    "empty_messages": (ERROR, "'messages' is empty"),
    "message_not_object": (ERROR, "a message is not an object"),
    "missing_role": (ERROR, "a message has no role"),
    "invalid_role": (ERROR, "a message's role is not system, user, assistant, tool or function"),
    "unknown_message_key": (ERROR, "a message has a key OpenAI does not accept"),
    "missing_content": (ERROR, "a message has no content"),
    "invalid_content": (ERROR, "content is neither a string nor a list of text parts"),
    "invalid_name": (ERROR, "a message's name is not a string"),
    "no_assistant": (ERROR, "no assistant message to learn from"),
    "invalid_weight": (ERROR, "weight is not 0 or 1, or is not on an assistant message"),
    "invalid_tool_call": (ERROR, "a tool call or tool message is malformed"),
    "invalid_tools": (ERROR, "the example's tools / parallel_tool_calls are malformed"),
    "too_few_examples": (ERROR, "fewer than 10 valid examples"),
    "file_too_large": (ERROR, "the file is over the upload limit"),
    "not_jsonl": (ERROR, "the file is binary, or no line parses as JSON"),
    "empty_file": (ERROR, "the file is empty, or holds only whitespace"),
    "blank_line": (WARNING, "a blank line"),
    "unknown_key": (WARNING, "the example has a top-level key OpenAI ignores"),
    "missing_system": (WARNING, "no system message"),
    "missing_user": (WARNING, "no user message"),
    "short_assistant": (WARNING, "an assistant reply under 10 characters"),
    "long_assistant": (WARNING, "an assistant reply over 2,000 characters"),
    "last_not_assistant": (WARNING, "turns after the last assistant message are never learned"),
    "duplicate_example": (WARNING, "the same example appears earlier"),
    "inconsistent_system": (WARNING, "the system prompt differs from the file's dominant one"),
    "over_token_limit": (WARNING, "longer than the model's training context"),
    "possible_secret": (WARNING, "content looks like a credential"),
}

ROLES = ("system", "user", "assistant", "tool", "function")
_PLAIN_ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}
)
EXAMPLE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})

MIN_EXAMPLES = 10
SHORT_ASSISTANT_CHARS = 10
LONG_ASSISTANT_CHARS = 2_000
OPENAI_MAX_FILE_BYTES = 512 * 1024 * 1024
DEFAULT_CONTEXT_TOKENS = 65_536
MAX_LINE_BYTES = 8 * 1024 * 1024  # beyond any trainable example; bounds memory
PARALLEL_MIN_BYTES = 4 * 1024 * 1024  # below this, a second process costs more than it saves
_COUNT_BATCH = 4_096  # strings per tokenizer call
MAX_FINDINGS_PER_CODE = 1_000  # stored per code; the rest are only counted
_BLANK = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Finding:
    line: int  # 1-based; 0 for findings about the whole file
    severity: str
    code: str
    message: str
    duplicate_of: int | None = None

    def to_dict(self) -> dict:
        d = {"line": self.line, "severity": self.severity, "code": self.code}
        d["message"] = self.message
        if self.duplicate_of is not None:
            d["duplicate_of"] = self.duplicate_of
        return d


@dataclass(frozen=True)
class TokenStats:
    total: int = 0
    min: int = 0
    max: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    exact: bool = True

    @classmethod
    def of(cls, counts: array, exact: bool) -> TokenStats:
        if not counts:
            return cls(exact=exact)
        import numpy as np

        ordered = np.sort(np.frombuffer(counts, dtype=np.int64))
        total = int(ordered.sum())
        return cls(
            total=total,
            min=int(ordered[0]),
            max=int(ordered[-1]),
            mean=total / len(ordered),
            p50=_nearest_rank(ordered, 50),
            p95=_nearest_rank(ordered, 95),
            exact=exact,
        )

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "mean": round(self.mean, 2),
            "p50": self.p50,
            "p95": self.p95,
            "exact": self.exact,
        }


def _nearest_rank(ordered, pct: int) -> int:
    rank = max(1, -(-pct * len(ordered) // 100))  # ceil(pct/100 * n)
    return int(ordered[rank - 1])


@dataclass
class Report:
    """What `validate` found.

    `findings` holds at most `MAX_FINDINGS_PER_CODE` findings of each code (the
    first ones, in line order); `counts` holds how many of each code there were
    in all. Count with `error_count`, `warning_count` and `counts`, never with
    `len(findings)`: a million blank lines are 1,000 findings and a count.
    """

    path: str
    size_bytes: int
    examples: int  # non-blank lines, valid or not
    valid_examples: int
    findings: list[Finding]
    tokens: TokenStats
    token_counts: array = field(repr=False)  # per valid example, in file order
    encoding: str = "o200k_base"
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    counts: dict[str, int] | None = None  # code -> findings in all; None: len of the stored ones

    def __post_init__(self) -> None:
        stored: dict[str, int] = {}
        self._severity = {c: sev for c, (sev, _) in CODES.items()}
        for f in self.findings:
            stored[f.code] = stored.get(f.code, 0) + 1
            self._severity[f.code] = f.severity
        # Never below what is stored: a report built from findings alone stays right.
        given = {c: n for c, n in (self.counts or {}).items() if n > 0}
        self.counts = {c: max(given.get(c, 0), stored.get(c, 0)) for c in sorted({*given, *stored})}

    @property
    def errors(self) -> list[Finding]:
        """The stored error findings (capped per code; `error_count` is the true number)."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """The stored warning findings (capped per code; see `warning_count`)."""
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def error_count(self) -> int:
        return sum(n for c, n in self.counts.items() if self._severity.get(c) == ERROR)

    @property
    def warning_count(self) -> int:
        return sum(n for c, n in self.counts.items() if self._severity.get(c) != ERROR)

    @property
    def truncated(self) -> bool:
        """Whether some findings were counted but not stored."""
        return sum(self.counts.values()) > len(self.findings)

    @property
    def has_errors(self) -> bool:
        return self.error_count > 0

    def codes(self) -> set[str]:
        return set(self.counts)

    def counts_by_code(self) -> dict[str, int]:
        """How many findings of each code, errors first, then the most frequent."""
        severity = self._severity
        return dict(
            sorted(self.counts.items(), key=lambda kv: (severity.get(kv[0]) != ERROR, -kv[1]))
        )

    def by_code(self) -> dict[str, list[Finding]]:
        """Stored findings grouped by code, in the order of `counts_by_code()`."""
        groups: dict[str, list[Finding]] = {}
        for f in self.findings:
            groups.setdefault(f.code, []).append(f)
        return {code: groups[code] for code in self.counts_by_code() if code in groups}

    def summary(self, shown: int = 5) -> list[str]:
        """One line per code, errors first: its count, its first lines, its first message.

        E.g. "blank_line ×1,000,000 — lines 1, 2, 3, 4, 5 and 999,995 more: blank line; …".
        """
        out = []
        for code, group in self.by_code().items():
            total = self.counts[code]
            lines = [f.line for f in group if f.line > 0]
            where = ""
            if lines:
                total_lines = total - (len(group) - len(lines))  # file-level ones have no line
                word = "line" if total_lines == 1 else "lines"
                more = f" and {total_lines - shown:,} more" if total_lines > shown else ""
                where = f" — {word} {', '.join(map(str, lines[:shown]))}{more}"
            out.append(f"{code} ×{total:,}{where}: {group[0].message}")
        return out

    def to_dict(self) -> dict:
        return {
            "file": self.path,
            "size_bytes": self.size_bytes,
            "examples": self.examples,
            "valid_examples": self.valid_examples,
            "counts": self.counts_by_code(),
            "findings": [f.to_dict() for f in self.findings],
            "tokens": self.tokens.to_dict(),
        }


# --- scanning one range of lines -------------------------------------------------


@dataclass
class _Chunk:
    """What one scanner saw. Line numbers are local to the chunk (1-based)."""

    lines: int = 0
    examples: int = 0
    parsed: int = 0  # lines that were JSON at all
    findings: list[tuple[int, str, str]] = field(default_factory=list)  # capped per code
    counts: dict[str, int] = field(default_factory=dict)  # code -> findings in all
    ex_lines: array = field(default_factory=lambda: array("q"))
    ex_tokens: array = field(default_factory=lambda: array("q"))
    ex_hash: array = field(default_factory=lambda: array("q"))
    ex_system: array = field(default_factory=lambda: array("q"))  # 0: no system message
    exact: bool = True


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True) | 1


class _Scanner:
    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.out = _Chunk()
        self._strings: list[str] = []
        self._pending: list[tuple[int, int, int, int]] = []  # slot, fixed, start, end
        self._system_ids: dict[str, int] = {}
        self._errors = 0  # error findings so far, to tell whether a line had any

    def scan(self, lines: Iterator[bytes | int]) -> _Chunk:
        for raw in lines:
            if type(raw) is int:  # a run of `raw` blank lines, read in bulk
                self._blank_run(raw)
                continue
            self.out.lines += 1
            self._line(raw, self.out.lines)
        self._flush()
        return self.out

    def _flag(self, line: int, code: str, message: str) -> None:
        counts = self.out.counts
        seen = counts[code] = counts.get(code, 0) + 1
        if seen <= MAX_FINDINGS_PER_CODE:
            self.out.findings.append((line, code, message))
        if CODES[code][0] == ERROR:
            self._errors += 1

    def _full(self, code: str) -> bool:
        """Whether findings of `code` are only counted from now on (skip the wording)."""
        return self.out.counts.get(code, 0) >= MAX_FINDINGS_PER_CODE

    def _blank_run(self, n: int) -> None:
        out = self.out
        stored = max(0, min(n, MAX_FINDINGS_PER_CODE - out.counts.get("blank_line", 0)))
        for k in range(1, stored + 1):
            self._flag(out.lines + k, "blank_line", _BLANK_MESSAGE)
        out.counts["blank_line"] = out.counts.get("blank_line", 0) + n - stored
        out.lines += n

    def _line(self, raw: bytes, n: int) -> None:
        if raw is _TOO_LONG:
            self.out.examples += 1
            self._flag(n, "line_too_long", f"line is over {MAX_LINE_BYTES // 2**20} MiB; skipped")
            return
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            self._flag(n, "blank_line", _BLANK_MESSAGE)
            return
        self.out.examples += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._bad_line(raw, n, exc)
            return
        self.out.parsed += 1
        if not isinstance(obj, dict):
            self._flag(
                n,
                "not_an_object",
                f'each line must be a JSON object like {{"messages": [...]}}, '
                f"not {_json_type(obj)}",
            )
            return
        errors_before = self._errors
        messages = self._check_example(obj, n)
        if secrets.might_contain_secret(raw):
            self._check_secrets(obj, n)  # rare: say which message, if any
        if messages is None or self._errors > errors_before:
            return
        self._add_valid(obj, raw, n)

    def _bad_line(self, raw: bytes, n: int, exc: orjson.JSONDecodeError) -> None:
        if self._full("invalid_utf8") and self._full("invalid_json"):
            code = "invalid_json" if raw.isascii() or _is_utf8(raw) else "invalid_utf8"
            self._flag(n, code, "")  # counted only: the wording would never be shown
            return
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            self._flag(
                n,
                "invalid_utf8",
                f"byte {uexc.start + 1} is not valid UTF-8; save the file as UTF-8",
            )
            return
        where = f" (column {exc.colno})" if getattr(exc, "colno", None) else ""
        reason = str(exc.msg if hasattr(exc, "msg") else exc).split(": line")[0]
        self._flag(n, "invalid_json", f"not valid JSON{where}: {reason}")

    def _check_example(self, obj: dict, n: int) -> list | None:
        flag = self._flag
        for key in obj:
            if key not in EXAMPLE_KEYS:
                flag(n, "unknown_key", f"top-level key {key!r} is ignored; only 'messages' trains")
        if "messages" not in obj:
            flag(n, "missing_messages", 'no "messages" key; expected {"messages": [...]}')
            return None
        messages = obj["messages"]
        if not isinstance(messages, list):
            flag(n, "messages_not_list", f'"messages" must be a list, not {_json_type(messages)}')
            return None
        if not messages:
            flag(n, "empty_messages", '"messages" is empty; add a conversation')
            return None
        self._check_tools(obj, n)

        roles: list[str] = []
        call_ids: set[str] = set()
        trainable = 0
        # Gathered in the same pass, for counting tokens if the example is valid.
        self._ex_strings = strings = []
        self._ex_fixed = REPLY_PRIMING
        self._ex_exact = True
        self._ex_system = None
        for i, msg in enumerate(messages, 1):
            # Fast path for the common {"role": ..., "content": "..."} message.
            if type(msg) is dict and len(msg) == 2:
                role = msg.get("role")
                text = msg.get("content")
                if type(text) is str and type(role) is str and role in _PLAIN_ROLES:
                    roles.append(role)
                    strings.append(role)
                    strings.append(text)
                    self._ex_fixed += TOKENS_PER_MESSAGE
                    if role == "assistant":
                        trainable += 1
                        self._check_reply_length(text, i, n)
                    elif role == "system" and self._ex_system is None:
                        self._ex_system = text
                    continue
            if not isinstance(msg, dict):
                flag(n, "message_not_object", f"message {i} is {_json_type(msg)}, not an object")
                continue
            role = msg.get("role")
            if role is None:
                flag(n, "missing_role", f"message {i} has no role")
                continue
            if role not in ROLES:
                flag(
                    n,
                    "invalid_role",
                    f"message {i} has role {role!r}; use one of {', '.join(ROLES)}",
                )
                continue
            roles.append(role)
            for key in msg:
                if key not in MESSAGE_KEYS:
                    flag(
                        n,
                        "unknown_message_key",
                        f"message {i} ({role}) has unknown key {key!r}; "
                        f"allowed: {', '.join(sorted(MESSAGE_KEYS))}",
                    )
            if "name" in msg and not isinstance(msg["name"], str):
                flag(n, "invalid_name", f"message {i} ({role}): name must be a string")
            self._check_weight(msg, role, i, n)
            self._check_calls(msg, role, i, n, call_ids)
            text = self._check_content(msg, role, i, n)
            ms, fixed, exact = message_strings(msg)
            strings.extend(ms)
            self._ex_fixed += fixed
            self._ex_exact = self._ex_exact and exact
            if role == "system" and self._ex_system is None:
                self._ex_system = text or ""
            if role == "assistant" and msg.get("weight", 1) != 0:
                trainable += 1
                if text is not None and not msg.get("tool_calls"):
                    self._check_reply_length(text, i, n)

        if "assistant" not in roles:
            flag(n, "no_assistant", "no assistant message: there is nothing to learn")
        elif trainable == 0:
            flag(n, "no_assistant", "every assistant message has weight 0: nothing to learn")
        if "system" not in roles and roles:
            flag(
                n, "missing_system", "no system message; give the prompt you will use in production"
            )
        if "user" not in roles and roles:
            flag(n, "missing_user", "no user message")
        if roles and roles[-1] != "assistant" and "assistant" in roles:
            flag(
                n,
                "last_not_assistant",
                f"the last message is {roles[-1]}: turns after the last assistant reply are "
                "never learned",
            )
        return messages

    def _check_tools(self, obj: dict, n: int) -> None:
        if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
            self._flag(n, "invalid_tools", "parallel_tool_calls must be true or false")
        tools = obj.get("tools")
        if tools is None:
            return
        if not isinstance(tools, list):
            self._flag(n, "invalid_tools", f"tools must be a list, not {_json_type(tools)}")
            return
        for j, tool in enumerate(tools, 1):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not fn["name"]
            ):
                self._flag(
                    n,
                    "invalid_tools",
                    f'tool {j} must be {{"type": "function", "function": {{"name": ..., '
                    '"parameters": {...}}}',
                )

    def _check_weight(self, msg: dict, role: str, i: int, n: int) -> None:
        if "weight" not in msg:
            return
        weight = msg["weight"]
        if role != "assistant":
            self._flag(
                n, "invalid_weight", f"message {i} ({role}): weight is only for assistant messages"
            )
        elif isinstance(weight, bool) or weight not in (0, 1):
            self._flag(n, "invalid_weight", f"message {i}: weight must be 0 or 1, not {weight!r}")

    def _check_calls(self, msg: dict, role: str, i: int, n: int, call_ids: set[str]) -> None:
        flag = self._flag
        if "tool_calls" in msg:
            calls = msg["tool_calls"]
            if role != "assistant":
                flag(
                    n,
                    "invalid_tool_call",
                    f"message {i} ({role}): only assistant messages make tool calls",
                )
            elif not isinstance(calls, list) or not calls:
                flag(n, "invalid_tool_call", f"message {i}: tool_calls must be a non-empty list")
            else:
                for j, call in enumerate(calls, 1):
                    problem = _tool_call_problem(call)
                    if problem:
                        flag(n, "invalid_tool_call", f"message {i}, tool call {j}: {problem}")
                    else:
                        call_ids.add(call["id"])
        if "function_call" in msg:
            fc = msg["function_call"]
            if role != "assistant":
                flag(
                    n,
                    "invalid_tool_call",
                    f"message {i} ({role}): only assistant messages call functions",
                )
            elif not (
                isinstance(fc, dict)
                and isinstance(fc.get("name"), str)
                and isinstance(fc.get("arguments"), str)
            ):
                flag(
                    n,
                    "invalid_tool_call",
                    f'message {i}: function_call needs "name" and "arguments" strings',
                )
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                flag(
                    n,
                    "invalid_tool_call",
                    f"message {i}: a tool message needs the tool_call_id it answers",
                )
            elif call_ids and call_id not in call_ids:
                flag(
                    n,
                    "invalid_tool_call",
                    f"message {i}: tool_call_id {call_id!r} answers no earlier call",
                )
        elif "tool_call_id" in msg:
            flag(
                n,
                "invalid_tool_call",
                f"message {i} ({role}): tool_call_id belongs on tool messages",
            )

    def _check_content(self, msg: dict, role: str, i: int, n: int) -> str | None:
        """Validates content; returns its text (parts joined), or None."""
        content = msg.get("content")
        if content is None:
            calls = msg.get("tool_calls") or msg.get("function_call")
            if not (role == "assistant" and calls):
                what = "null content" if "content" in msg else "no content"
                self._flag(n, "missing_content", f"message {i} ({role}) has {what}")
            return None
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content, 1):
                if (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    texts.append(part["text"])
                else:
                    self._flag(
                        n,
                        "invalid_content",
                        f'message {i}, content part {j}: expected {{"type": "text", "text": "..."}}',
                    )
                    return None
            return "".join(texts)
        self._flag(
            n,
            "invalid_content",
            f"message {i} ({role}): content must be a string or a list of text parts, "
            f"not {_json_type(content)}",
        )
        return None

    def _check_reply_length(self, text: str, i: int, n: int) -> None:
        size = len(text)
        if SHORT_ASSISTANT_CHARS <= size <= LONG_ASSISTANT_CHARS:
            return  # the usual case, without copying the text to strip it
        size = len(text.strip())
        if size < SHORT_ASSISTANT_CHARS:
            self._flag(n, "short_assistant", f"message {i}: assistant reply is {size} characters")
        elif size > LONG_ASSISTANT_CHARS:
            self._flag(
                n,
                "long_assistant",
                f"message {i}: assistant reply is {size:,} characters (over {LONG_ASSISTANT_CHARS:,})",
            )

    def _check_secrets(self, obj: dict, n: int) -> None:
        messages = obj.get("messages")
        if not isinstance(messages, list):
            return
        for i, msg in enumerate(messages, 1):
            if not isinstance(msg, dict):
                continue
            strings, _, _ = message_strings(msg)
            kinds = sorted({k for s in strings for k in secrets.find_secrets(s)})
            if kinds:
                self._flag(
                    n,
                    "possible_secret",
                    f"message {i} ({msg.get('role')}) looks like it holds a secret "
                    f"({', '.join(kinds)}); remove it before the data leaves your machines",
                )

    def _add_valid(self, obj: dict, raw: bytes, n: int) -> None:
        out = self.out
        start = len(self._strings)
        self._strings.extend(self._ex_strings)
        if not self._ex_exact:
            out.exact = False
        for key in ("tools", "functions"):
            if obj.get(key):
                self._strings.append(orjson.dumps(obj[key]).decode("utf-8"))
                out.exact = False
        system = 0
        if self._ex_system is not None:
            system = self._system_ids.get(self._ex_system)
            if system is None:
                if len(self._system_ids) > 10_000:
                    self._system_ids.clear()
                system = _digest(self._ex_system.encode("utf-8"))
                self._system_ids[self._ex_system] = system
        slot = len(out.ex_tokens)
        out.ex_lines.append(n)
        out.ex_tokens.append(0)
        out.ex_hash.append(_digest(raw.strip()))
        out.ex_system.append(system)
        self._pending.append((slot, self._ex_fixed, start, len(self._strings)))
        if len(self._strings) >= _COUNT_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        counts = self.counter.count_many(self._strings)
        tokens = self.out.ex_tokens
        for slot, fixed, start, end in self._pending:
            tokens[slot] = fixed + sum(counts[start:end])
        self._strings.clear()
        self._pending.clear()


_BLANK_MESSAGE = "blank line; remove it (it is skipped)"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _tool_call_problem(call: object) -> str | None:
    if not isinstance(call, dict):
        return "must be an object"
    if not isinstance(call.get("id"), str) or not call["id"]:
        return 'needs an "id" string'
    if call.get("type", "function") != "function":
        return 'type must be "function"'
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return 'needs "function": {"name": ..., "arguments": "..."}'
    if not isinstance(fn.get("arguments"), str):
        return "function.arguments must be a JSON string"
    return None


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return names.get(type(value), type(value).__name__)


# --- reading lines -------------------------------------------------------------

_TOO_LONG = b"<line too long>"


def _lines(f: BinaryIO, end: int | None, first_chunk: bool) -> Iterator[bytes | int]:
    """Lines of `f` from its position up to byte `end`, each at most MAX_LINE_BYTES.

    After a blank line, the blank lines that follow it are read in bulk and
    yielded as their number (an int): a file of a billion newlines is read at
    the speed of the disk, not one Python loop turn per line.
    """
    pos = f.tell()
    first = first_chunk
    while end is None or pos < end:
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            return
        pos += len(line)
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:  # skip the rest of the overlong line without holding it
                rest = f.readline(MAX_LINE_BYTES)
                pos += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            line = _TOO_LONG
        elif first and line.startswith(_BOM):
            line = line[len(_BOM) :]
        first = False
        yield line
        if not line.strip():
            run, used = _blank_run(f, None if end is None else end - pos)
            pos += used
            if run:
                yield run


def _blank_run(f: BinaryIO, limit: int | None) -> tuple[int, int]:
    """Consume the whole blank lines at `f`'s position: (lines, bytes).

    Reads a small probe first and doubles it while it is all blank, so a blank
    line between examples costs one small read, and a long run few large ones.
    """
    lines = used = 0
    size = 64
    while limit is None or used < limit:
        block = f.read(size if limit is None else min(size, limit - used))
        if not block:
            break
        blank = len(block) - len(block.lstrip(_BLANK))
        whole = block.rfind(b"\n", 0, blank) + 1  # up to the last newline in the blank part
        if whole < len(block):
            f.seek(whole - len(block), os.SEEK_CUR)
        lines += block.count(b"\n", 0, whole)
        used += whole
        if blank < len(block) or whole == 0:
            break
        size = min(size * 2, 1 << 20)
    return lines, used


def _scan_range(path: str, start: int, end: int | None, encoding: str, backend: str) -> _Chunk:
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(start)
        return _Scanner(TokenCounter(encoding, backend)).scan(_lines(f, end, start == 0))


def _split(path: str, size: int, parts: int) -> list[tuple[int, int | None]]:
    """Byte ranges that start at line beginnings."""
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(bounds[-1], size * k // parts))
            f.readline()  # move to the start of the next line
            bounds.append(f.tell())
    bounds.append(size)
    ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    return [(a, b if i < len(ranges) - 1 else None) for i, (a, b) in enumerate(ranges)]


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    if not head:
        return False
    control = sum(1 for b in head if b < 9 or 13 < b < 32)
    return control > len(head) // 10


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_chunks(
    path: str, ranges: list[tuple[int, int | None]], encoding: str, backend: str
) -> list[_Chunk]:
    # _split returns fewer ranges than asked for when the file has fewer lines
    # (none for an empty file): the pool is sized by the ranges, never below one.
    if not ranges:
        return []
    if len(ranges) == 1:
        return [_scan_range(path, *ranges[0], encoding, backend)]
    import multiprocessing

    # fork shares the loaded tokenizer with the children; it is only safe while
    # this process has one thread, so threaded callers (the bot) get forkserver.
    method = "fork" if threading.active_count() == 1 else "forkserver"
    TokenCounter(encoding, backend)  # load the BPE tables once, before forking
    with ProcessPoolExecutor(
        max_workers=len(ranges) - 1, mp_context=multiprocessing.get_context(method)
    ) as pool:
        futures = [pool.submit(_scan_range, path, *r, encoding, backend) for r in ranges[1:]]
        first = _scan_range(path, *ranges[0], encoding, backend)  # this process works too
        return [first, *(f.result() for f in futures)]


# --- the whole file ---------------------------------------------------------


def validate(
    source: str | os.PathLike | BinaryIO,
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    max_file_bytes: int = OPENAI_MAX_FILE_BYTES,
    encoding: str = "o200k_base",
    workers: int | None = None,
    backend: str = "auto",
) -> Report:
    """Validate a chat fine-tuning JSONL file (a path, or a binary file object).

    `context_tokens` is the model's training context (examples beyond it get
    `over_token_limit`); `max_file_bytes` the upload cap (`file_too_large`; the
    scan still runs to the end). `workers` defaults to the CPUs available;
    file objects and small files are scanned in this process.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        size = os.path.getsize(path)  # OSError when it cannot be opened: the caller's to report
        with open(path, "rb") as f:
            head = f.read(8192)
        if _looks_binary(head):
            chunks: list[_Chunk] = []
        else:
            n = workers or default_workers()
            if size < PARALLEL_MIN_BYTES:
                n = 1
            chunks = _run_chunks(path, _split(path, size, max(1, n)), encoding, backend)
    else:
        if not source.seekable():
            raise ValueError("validate needs a seekable file object; save the stream first")
        path = getattr(source, "name", "<stream>")
        start = source.tell()
        head = source.read(8192)
        size = source.seek(0, os.SEEK_END) - start
        source.seek(start)
        if _looks_binary(head):
            chunks = []
        else:
            counter = TokenCounter(encoding, backend)
            chunks = [_Scanner(counter).scan(_lines(source, None, True))]
    return _merge(str(path), size, chunks, head, context_tokens, max_file_bytes, encoding)


def _merge(
    path: str,
    size: int,
    chunks: list[_Chunk],
    head: bytes,
    context_tokens: int,
    max_file_bytes: int,
    encoding: str,
) -> Report:
    raw: list[tuple[int, str, str, int | None]] = []
    counts: dict[str, int] = {}
    offset = 0
    lines = array("q")
    tokens = array("q")
    hashes = array("q")
    systems = array("q")
    examples = parsed = 0
    exact = True
    for chunk in chunks:
        raw.extend((line + offset, code, msg, None) for line, code, msg in chunk.findings)
        for code, n in chunk.counts.items():
            counts[code] = counts.get(code, 0) + n
        lines.extend(x + offset for x in chunk.ex_lines)
        tokens.extend(chunk.ex_tokens)
        hashes.extend(chunk.ex_hash)
        systems.extend(chunk.ex_system)
        examples += chunk.examples
        parsed += chunk.parsed
        exact = exact and chunk.exact
        offset += chunk.lines

    raw.extend(_cross_line_findings(lines, tokens, hashes, systems, context_tokens, counts))

    file_level: list[tuple[int, str, str, int | None]] = []
    if size > max_file_bytes:
        file_level.append(
            (
                0,
                "file_too_large",
                f"the file is {size / 2**20:,.1f} MiB; the limit is "
                f"{max_file_bytes / 2**20:,.0f} MiB. Split it or sample it.",
                None,
            )
        )
    valid = len(tokens)
    empty = False
    if _looks_binary(head):
        file_level.append((0, "not_jsonl", "this is a binary file, not JSONL text", None))
    elif not examples:
        # Nothing but whitespace: one finding says it all (not a warning per blank line).
        what = (
            "is empty (0 bytes)" if not size else f"holds only whitespace ({offset:,} blank lines)"
        )
        raw, counts, empty = [], {}, True
        file_level.append(
            (
                0,
                "empty_file",
                f"the file {what}; a training file has one JSON object per line, "
                'like {"messages": [...]}',
                None,
            )
        )
    elif not parsed:
        file_level.append((0, "not_jsonl", "no line parses as JSON: is this really JSONL?", None))
    if valid < MIN_EXAMPLES and not empty:
        file_level.append(
            (
                0,
                "too_few_examples",
                f"{valid} valid example{'s' if valid != 1 else ''}; OpenAI "
                f"needs at least {MIN_EXAMPLES}, and 50-100 good ones is a better start",
                None,
            )
        )
    for _, code, _, _ in file_level:
        counts[code] = counts.get(code, 0) + 1
    order = {code: i for i, code in enumerate(CODES)}
    raw.sort(key=lambda r: (r[0], order[r[1]]))
    findings = [Finding(0, CODES[c][0], c, m, d) for _, c, m, d in file_level]
    kept: dict[str, int] = {}
    for line, c, m, d in raw:  # each chunk kept its first ones; keep the file's first ones
        k = kept[c] = kept.get(c, 0) + 1
        if k <= MAX_FINDINGS_PER_CODE:
            findings.append(Finding(line, CODES[c][0], c, m, d))
    return Report(
        path=path,
        size_bytes=size,
        examples=examples,
        valid_examples=valid,
        findings=findings,
        tokens=TokenStats.of(tokens, exact),
        token_counts=tokens,
        encoding=encoding,
        context_tokens=context_tokens,
        counts=counts,
    )


def _cross_line_findings(
    lines: array,
    tokens: array,
    hashes: array,
    systems: array,
    context_tokens: int,
    counts: dict[str, int],
) -> Iterator[tuple[int, str, str, int | None]]:
    """Duplicates, the odd system prompt out, and over-long examples.

    Adds every one to `counts`, and yields the first MAX_FINDINGS_PER_CODE of
    each code in file order.
    """
    import numpy as np

    if not len(lines):
        return
    cap = MAX_FINDINGS_PER_CODE
    line_arr = np.frombuffer(lines, dtype=np.int64)
    over = np.flatnonzero(np.frombuffer(tokens, dtype=np.int64) > context_tokens)
    if len(over):
        counts["over_token_limit"] = len(over)
    for i in over[:cap]:
        yield (
            int(line_arr[i]),
            "over_token_limit",
            f"{tokens[i]:,} tokens; the model trains on {context_tokens:,}: the rest is cut "
            "off, and billed at the limit",
            None,
        )

    h = np.frombuffer(hashes, dtype=np.int64)
    order = np.argsort(h, kind="stable")  # equal hashes keep file order
    sorted_h = h[order]
    repeat = np.flatnonzero(sorted_h[1:] == sorted_h[:-1]) + 1
    if len(repeat):
        starts = np.flatnonzero(np.r_[True, sorted_h[1:] != sorted_h[:-1]])
        first_of = starts[np.searchsorted(starts, repeat, side="right") - 1]
        dups, firsts = order[repeat], order[first_of]
        del order, sorted_h, starts, first_of
        counts["duplicate_example"] = len(dups)
        in_file_order = np.argsort(dups, kind="stable")[:cap]
        for dup, first in zip(dups[in_file_order], firsts[in_file_order], strict=True):
            line, first_line = int(line_arr[dup]), int(line_arr[first])
            yield (line, "duplicate_example", f"same as line {first_line}", first_line)
    else:
        del order, sorted_h

    s = np.frombuffer(systems, dtype=np.int64)
    with_system = s[s != 0]
    if len(with_system) < 2:
        return
    values, n_each = np.unique(with_system, return_counts=True)
    if len(values) < 2:
        return
    top = int(np.argmax(n_each))
    # Only when one prompt clearly dominates: a file of per-example prompts is a choice.
    if n_each[top] * 2 < len(with_system):
        return
    dominant = values[top]
    first_line = int(line_arr[np.flatnonzero(s == dominant)[0]])
    share = f"{int(n_each[top]):,} of {len(with_system):,} examples"
    odd = np.flatnonzero((s != 0) & (s != dominant))
    counts["inconsistent_system"] = len(odd)
    for i in odd[:cap]:
        yield (
            int(line_arr[i]),
            "inconsistent_system",
            f"system prompt differs from the one on {share} (first on line {first_line}): "
            "the model learns conflicting behaviours",
            None,
        )


def validate_bytes(data: bytes, **kwargs) -> Report:
    """Validate an in-memory file (tests, small uploads)."""
    import io

    return validate(io.BytesIO(data), **kwargs)
