"""Streaming validation of OpenAI fine-tuning JSONL: supervised chat, preference, reinforcement.

`validate(path)` reads the file line by line (memory stays flat whatever its
size), records every problem as a `Finding` with its 1-based line number, and
counts tokens of the valid examples by OpenAI's chat formula. One bad line
never stops the scan, and a `Report` is always produced.

Kinds of file. Each line is recognised by its shape and checked by the rules
of its kind; the file's kind (`Report.kind`) is the kind of most of its valid
lines, and a file that mixes kinds gets one `mixed_kinds` finding naming each
kind and its first line.

- ``supervised``: ``{"messages": [...], "tools": [...]?}``, the chat format,
  vision included (``image_url`` parts in user messages).
- ``preference`` (DPO): ``{"input": {"messages": [...], "tools": [...]?},
  "preferred_output": [{assistant message}], "non_preferred_output":
  [{assistant message}]}``, each output a list of exactly one assistant
  message. Text only (OpenAI's DPO guide). Its token count is the chat formula
  over the input plus both outputs as two more messages: the input counted
  once, each output once (``REPLY_PRIMING + input + preferred +
  non_preferred``); see `trainers.pricing` for how that is billed.
- ``reinforcement`` (RFT): ``messages`` that end in a user (or developer)
  turn, with grader fields beside them (``reference_answer`` or any other
  top-level key), and either ``reference_answer``, a developer message or no
  assistant reply at all (a chat row with metadata that merely ends in a user
  turn stays supervised). Recognised and checked lightly; no provider in the
  price table trains them, which is one file-level `untrainable_kind` error.

Rules follow the role, as OpenAI's fine-tuning "chat" input format has them
(the API reference's fine-tuning chat and preference input objects, and the
vision fine-tuning guide, as read 2026-11):

==========  =========================================  ============================
role        keys beside ``role``                        ``content``
==========  =========================================  ============================
system      content, name                              string, or text parts
user        content, name                              string, or text and
                                                       ``image_url`` parts
assistant   content, name, refusal (string or null),   string, text or refusal
            weight (0 or 1), tool_calls,               parts, or null with
            function_call                              tool_calls / function_call
                                                       / refusal
tool        content, tool_call_id, name                string only
function    content, name                              string only
==========  =========================================  ============================

(``developer`` is accepted, like system, in reinforcement rows only.) A key
outside every row is `unknown_message_key` (an error, as before), and so is
``refusal`` on another role; ``weight`` (`invalid_weight`), ``tool_calls``,
``function_call`` and ``tool_call_id`` (`invalid_tool_call`) on the wrong role
keep their own codes. Content parts a role does not take, and a list on a
tool or function message, are `invalid_content`; image problems are
`invalid_image`. An image part is
``{"type": "image_url", "image_url": {"url": "https://…" or
"data:image/png;base64,…", "detail": "low"|"high"|"auto"}}``: JPEG, PNG or
WEBP, at most 10 MB, at most 10 per example, only in user messages. Image
tokens follow the gpt-4o rule (`trainers.tokens.image_tokens`): exact for
``detail: low`` and for sized high-detail data URLs, approximate otherwise,
and `Report.token_notes` says which and how.

Whole-file shapes are recognised from the first bytes and lines, before the
scan, so a normal file pays one extra parse of its first line: a JSON array
(`json_array`), pretty-printed objects one after another (`multiline_json`),
UTF-16 or UTF-32 text (`wrong_encoding`) and an empty file (`empty_file`) are
each one file-level finding that names the shape and the fix, never one error
per physical line.

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

import base64
import binascii
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
from trainers.tokens import (
    IMAGE_MAX_TOKENS,
    IMAGE_RULE,
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    TokenCounter,
    image_tokens,
    message_strings,
)

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
    "unknown_message_key": (ERROR, "a message has a key OpenAI does not accept for its role"),
    "missing_content": (ERROR, "a message has no content"),
    "invalid_content": (ERROR, "content is not a string or the parts its role accepts"),
    "invalid_image": (ERROR, "an image part is malformed, not an accepted image, or misplaced"),
    "invalid_name": (ERROR, "a message's name is not a string"),
    "no_assistant": (ERROR, "no assistant message to learn from"),
    "invalid_weight": (ERROR, "weight is not 0 or 1, or is not on an assistant message"),
    "invalid_tool_call": (ERROR, "a tool call or tool message is malformed"),
    "invalid_tools": (ERROR, "the example's tools / parallel_tool_calls are malformed"),
    "invalid_preference": (ERROR, "a preference row's input or outputs are missing or malformed"),
    "too_few_examples": (ERROR, "fewer than 10 valid examples"),
    "file_too_large": (ERROR, "the file is over the upload limit"),
    "not_jsonl": (ERROR, "the file is binary, or no line parses as JSON"),
    "empty_file": (ERROR, "the file is empty, or holds only whitespace"),
    "json_array": (ERROR, "the file is one JSON array, not one JSON object per line"),
    "multiline_json": (ERROR, "the objects span several lines (pretty-printed), not one per line"),
    "wrong_encoding": (ERROR, "the file is UTF-16 or UTF-32 text, not UTF-8"),
    "mixed_kinds": (ERROR, "the file mixes kinds of example (supervised, preference, ...)"),
    "untrainable_kind": (ERROR, "no provider in the price table trains this kind of file"),
    "blank_line": (WARNING, "a blank line"),
    "unknown_key": (WARNING, "the example has a top-level key OpenAI ignores"),
    "missing_system": (WARNING, "no system message"),
    "missing_user": (WARNING, "no user message"),
    "short_assistant": (WARNING, "an assistant reply under 10 characters"),
    "long_assistant": (WARNING, "an assistant reply over 2,000 characters"),
    "last_not_assistant": (WARNING, "turns after the last assistant message are never learned"),
    "identical_outputs": (WARNING, "the preferred and non-preferred outputs are the same"),
    "duplicate_example": (WARNING, "the same example appears earlier"),
    "inconsistent_system": (WARNING, "the system prompt differs from the file's dominant one"),
    "over_token_limit": (WARNING, "longer than the model's training context"),
    "possible_secret": (WARNING, "content looks like a credential"),
}

# Kinds of example, and how reports name them.
SUPERVISED = "supervised"
PREFERENCE = "preference"
REINFORCEMENT = "reinforcement"
UNKNOWN = "unknown"  # no line recognised as any kind (or not JSONL at all)
KINDS = (SUPERVISED, PREFERENCE, REINFORCEMENT)
KIND_LABELS = {
    SUPERVISED: "supervised chat",
    PREFERENCE: "preference (DPO)",
    REINFORCEMENT: "reinforcement (RFT)",
    UNKNOWN: "not recognised",
}

ROLES = ("system", "user", "assistant", "tool", "function")
_PLAIN_ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
)
# The per-role table of the module docstring: which content part types a role takes
# (none: a string only), and the keys only one role may carry.
PART_TYPES: dict[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset(),
    "function": frozenset(),
}
EXAMPLE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
_RFT_ROLES = (*ROLES, "developer")
_RFT_LAST = ("user", "developer")  # a tuple: a role may be unhashable JSON

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

# OpenAI's vision fine-tuning limits (vision fine-tuning guide, as read 2026-11).
IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp"})
IMAGE_DETAILS = ("low", "high", "auto")
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGES_PER_EXAMPLE = 10
MAX_IMAGE_EXAMPLES = 50_000
# Shape sniffing reads a whole JSON array or run of pretty objects to count it, up to this.
SHAPE_COUNT_MAX_BYTES = 64 * 1024 * 1024


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
    kind: str = SUPERVISED  # the kind of most valid lines (see the module docstring)
    kinds: dict[str, int] | None = None  # kind -> valid lines of that kind
    images: int = 0  # image parts in valid examples, their tokens counted
    token_notes: tuple[str, ...] = ()  # why and how the token counts are approximate

    @property
    def kind_label(self) -> str:
        return KIND_LABELS.get(self.kind, self.kind)

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
            "kind": self.kind,
            "kinds": dict(self.kinds or {}),
            "images": self.images,
            "token_notes": list(self.token_notes),
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
    # kind -> [valid lines, first valid line]; and [recognised lines, first one] for all lines
    kinds: dict[str, list[int]] = field(default_factory=dict)
    seen: dict[str, list[int]] = field(default_factory=dict)
    # Why counts are approximate, in valid examples: tool JSON counted as text; images
    # counted at IMAGE_MAX_TOKENS (size unknown), as high detail (auto), or exactly.
    tool_examples: int = 0
    images_unsized: int = 0
    images_auto: int = 0
    images_exact: int = 0
    image_examples: int = 0


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
                f'each line must be a JSON object like {{"messages": [...]}}, not {json_type(obj)}',
            )
            return
        errors_before = self._errors
        kind = self._check_example(obj, n)
        # "non_preferred_output" looks like a token (an underscore and 15 word characters)
        # to the secrets prefilter: without it, a preference line costs what a chat line does.
        probe = raw.replace(b'"non_preferred_output"', b'""') if kind == PREFERENCE else raw
        if secrets.might_contain_secret(probe):
            self._check_secrets(obj, n)  # rare: say which message, if any
        if kind is None or self._errors > errors_before:
            return
        self._add_valid(obj, raw, n, kind)

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

    def _seen(self, kind: str, n: int) -> None:
        entry = self.out.seen.get(kind)
        if entry is None:
            self.out.seen[kind] = [1, n]
        else:
            entry[0] += 1

    def _begin(self) -> None:
        """Start gathering one example's strings, fixed tokens and images."""
        self._ex_strings: list[str] = []
        self._ex_fixed = REPLY_PRIMING
        self._ex_exact = True
        self._ex_system: str | None = None
        self._ex_images = 0
        self._ex_unsized = 0
        self._ex_auto = 0
        self._ex_tools = False

    # --- the three kinds -------------------------------------------------------

    def _check_example(self, obj: dict, n: int) -> str | None:
        """Checks one line by its kind's rules; returns the kind, or None when unrecognised."""
        if "messages" in obj:
            return self._check_chat(obj, n)
        if (
            "preferred_output" in obj
            or "non_preferred_output" in obj
            or isinstance(obj.get("input"), dict)
        ):
            return self._check_preference(obj, n)
        hint = _hint(obj)
        for key in () if hint else obj:  # another format's keys: the hint names them all
            if key not in EXAMPLE_KEYS:
                self._flag(
                    n, "unknown_key", f"top-level key {key!r} is ignored; only 'messages' trains"
                )
        self._flag(n, "missing_messages", 'no "messages" key; expected {"messages": [...]}' + hint)
        return None

    def _check_chat(self, obj: dict, n: int) -> str | None:
        """Supervised chat, or reinforcement: messages ending in a user turn, with grader fields."""
        flag = self._flag
        extra = [key for key in obj if key not in EXAMPLE_KEYS] if len(obj) > 1 else ()
        messages = obj["messages"]
        if not isinstance(messages, list):
            self._seen(SUPERVISED, n)
            flag(n, "messages_not_list", f'"messages" must be a list, not {json_type(messages)}')
            return None
        kind = SUPERVISED
        if (
            extra
            and messages
            and type(messages[-1]) is dict
            and messages[-1].get("role") in _RFT_LAST
            and _graded(obj, messages)
        ):
            kind = REINFORCEMENT
        seen = self.out.seen.get(kind)
        if seen is None:
            self._seen(kind, n)
        else:
            seen[0] += 1
        if kind == SUPERVISED:
            for key in extra:
                flag(n, "unknown_key", f"top-level key {key!r} is ignored; only 'messages' trains")
        if not messages:
            flag(n, "empty_messages", '"messages" is empty; add a conversation')
            return None
        self._check_tools(obj, n, "")
        self._begin()
        roles, trainable = self._messages(messages, n, kind, "message")
        if self._ex_images > MAX_IMAGES_PER_EXAMPLE:
            self._too_many_images(n)
        if kind == REINFORCEMENT:
            return kind  # graded, not imitated: no assistant reply is expected

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
        return kind

    def _check_preference(self, obj: dict, n: int) -> str:
        flag = self._flag
        self._seen(PREFERENCE, n)
        for key in obj:
            if key not in PREFERENCE_KEYS:
                flag(
                    n,
                    "unknown_key",
                    f"top-level key {key!r} is ignored; a preference row has input, "
                    "preferred_output and non_preferred_output",
                )
        self._begin()
        shape = (
            '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}], '
            '"non_preferred_output": [{"role": "assistant", ...}]}'
        )
        inp = obj.get("input")
        if inp is None:
            flag(n, "invalid_preference", f'no "input"; a preference row is {shape}')
        elif not isinstance(inp, dict):
            flag(
                n,
                "invalid_preference",
                f'"input" must be an object {{"messages": [...]}}, not {json_type(inp)}',
            )
        else:
            for key in inp:
                if key not in EXAMPLE_KEYS:
                    flag(n, "unknown_key", f"input key {key!r} is ignored")
            messages = inp.get("messages")
            if messages is None:
                flag(n, "missing_messages", 'input has no "messages"; expected {"messages": [...]}')
            elif not isinstance(messages, list):
                flag(
                    n,
                    "messages_not_list",
                    f'input "messages" must be a list, not {json_type(messages)}',
                )
            elif not messages:
                flag(n, "empty_messages", 'input "messages" is empty; add the prompt')
            else:
                self._check_tools(inp, n, "input ")
                roles, _ = self._messages(messages, n, PREFERENCE, "input message")
                if roles and "user" not in roles:
                    flag(n, "missing_user", "no user message in input")
                if roles and roles[-1] == "assistant":
                    flag(
                        n,
                        "invalid_preference",
                        "input ends with an assistant message: the outputs answer the last "
                        "user turn, so end the input there",
                    )
        outputs = []
        for key in ("preferred_output", "non_preferred_output"):
            msg = self._output(obj, key, n, shape)
            if msg is not None:
                outputs.append(msg)
        if len(outputs) == 2:
            a, b = outputs
            if _text(a.get("content")) == _text(b.get("content")) and a.get("tool_calls") == b.get(
                "tool_calls"
            ):
                flag(
                    n,
                    "identical_outputs",
                    "preferred_output and non_preferred_output are the same: the pair "
                    "teaches nothing; fix or drop it",
                )
        return PREFERENCE

    def _output(self, obj: dict, key: str, n: int, shape: str) -> dict | None:
        """One of a preference row's outputs: a list of exactly one assistant message."""
        flag = self._flag
        value = obj.get(key)
        if value is None:
            flag(n, "invalid_preference", f'no "{key}"; a preference row is {shape}')
            return None
        if isinstance(value, dict):
            flag(
                n,
                "invalid_preference",
                f'"{key}" must be a list holding one assistant message: wrap it in [...]',
            )
            return None
        if not isinstance(value, list) or len(value) != 1:
            what = f"{len(value)} messages" if isinstance(value, list) else json_type(value)
            flag(
                n,
                "invalid_preference",
                f'"{key}" must be a list of exactly one assistant message, not {what}',
            )
            return None
        msg = value[0]
        if not isinstance(msg, dict):
            flag(n, "invalid_preference", f'"{key}" holds {json_type(msg)}, not a message')
            return None
        if msg.get("role") != "assistant":
            flag(
                n,
                "invalid_preference",
                f'"{key}" message has role {msg.get("role")!r}; it must be assistant',
            )
            return None
        content = msg.get("content")
        if len(msg) == 2 and type(content) is str:  # the usual {"role", "content"} reply
            self._ex_strings += ("assistant", content)
            self._ex_fixed += TOKENS_PER_MESSAGE
            text = content
        else:
            text = self._message(msg, "assistant", key, n, PREFERENCE, set())
        if key == "preferred_output" and text is not None and not msg.get("tool_calls"):
            self._check_reply_length(text, key, n)
        return msg

    # --- messages --------------------------------------------------------------

    def _messages(self, messages: list, n: int, kind: str, label: str) -> tuple[list[str], int]:
        """Checks a list of messages by role; returns the roles and the trainable replies."""
        flag = self._flag
        roles: list[str] = []
        call_ids: set[str] = set()
        trainable = 0
        strings = self._ex_strings
        allowed = _RFT_ROLES if kind == REINFORCEMENT else ROLES
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
                        self._check_reply_length(text, f"{label} {i}", n)
                    elif role == "system" and self._ex_system is None:
                        self._ex_system = text
                    continue
            if not isinstance(msg, dict):
                flag(n, "message_not_object", f"{label} {i} is {json_type(msg)}, not an object")
                continue
            role = msg.get("role")
            if role is None:
                flag(n, "missing_role", f"{label} {i} has no role")
                continue
            if role not in allowed:
                flag(
                    n,
                    "invalid_role",
                    f"{label} {i} has role {role!r}; use one of {', '.join(allowed)}",
                )
                continue
            roles.append(role)
            text = self._message(msg, role, f"{label} {i}", n, kind, call_ids)
            if role == "system" and self._ex_system is None:
                self._ex_system = text or ""
            if role == "assistant" and msg.get("weight", 1) != 0:
                trainable += 1
                if text is not None and not msg.get("tool_calls"):
                    self._check_reply_length(text, f"{label} {i}", n)
        return roles, trainable

    def _message(
        self, msg: dict, role: str, where: str, n: int, kind: str, call_ids: set[str]
    ) -> str | None:
        """Checks one message by its role's rules and gathers its strings; returns its text."""
        for key in msg:
            if key not in MESSAGE_KEYS:
                self._flag(
                    n,
                    "unknown_message_key",
                    f"{where} ({role}) has unknown key {key!r}; "
                    f"allowed: {', '.join(sorted(MESSAGE_KEYS))}",
                )
        if "name" in msg and not isinstance(msg["name"], str):
            self._flag(n, "invalid_name", f"{where} ({role}): name must be a string")
        if "refusal" in msg:
            refusal = msg["refusal"]
            if role != "assistant":
                self._flag(
                    n,
                    "unknown_message_key",
                    f"{where} ({role}): refusal is only for assistant messages",
                )
            elif refusal is not None and not isinstance(refusal, str):
                self._flag(
                    n,
                    "invalid_content",
                    f"{where}: refusal must be a string or null, not {json_type(refusal)}",
                )
        self._check_weight(msg, role, where, n)
        self._check_calls(msg, role, where, n, call_ids)
        text = self._check_content(msg, role, where, n, kind)
        ms, fixed, exact = message_strings(msg)
        self._ex_strings.extend(ms)
        self._ex_fixed += fixed
        if not exact:
            self._ex_exact = False
            self._ex_tools = True
        return text

    def _check_tools(self, obj: dict, n: int, where: str) -> None:
        if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
            self._flag(n, "invalid_tools", f"{where}parallel_tool_calls must be true or false")
        tools = obj.get("tools")
        if tools is None:
            return
        if not isinstance(tools, list):
            self._flag(n, "invalid_tools", f"{where}tools must be a list, not {json_type(tools)}")
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
                    f'{where}tool {j} must be {{"type": "function", "function": {{"name": ..., '
                    '"parameters": {...}}}',
                )

    def _check_weight(self, msg: dict, role: str, where: str, n: int) -> None:
        if "weight" not in msg:
            return
        weight = msg["weight"]
        if role != "assistant":
            self._flag(
                n, "invalid_weight", f"{where} ({role}): weight is only for assistant messages"
            )
        elif isinstance(weight, bool) or weight not in (0, 1):
            self._flag(n, "invalid_weight", f"{where}: weight must be 0 or 1, not {weight!r}")

    def _check_calls(self, msg: dict, role: str, where: str, n: int, call_ids: set[str]) -> None:
        flag = self._flag
        if "tool_calls" in msg:
            calls = msg["tool_calls"]
            if role != "assistant":
                flag(
                    n,
                    "invalid_tool_call",
                    f"{where} ({role}): only assistant messages make tool calls",
                )
            elif not isinstance(calls, list) or not calls:
                flag(n, "invalid_tool_call", f"{where}: tool_calls must be a non-empty list")
            else:
                for j, call in enumerate(calls, 1):
                    problem = _tool_call_problem(call)
                    if problem:
                        flag(n, "invalid_tool_call", f"{where}, tool call {j}: {problem}")
                    else:
                        call_ids.add(call["id"])
        if "function_call" in msg:
            fc = msg["function_call"]
            if role != "assistant":
                flag(
                    n,
                    "invalid_tool_call",
                    f"{where} ({role}): only assistant messages call functions",
                )
            elif not (
                isinstance(fc, dict)
                and isinstance(fc.get("name"), str)
                and isinstance(fc.get("arguments"), str)
            ):
                flag(
                    n,
                    "invalid_tool_call",
                    f'{where}: function_call needs "name" and "arguments" strings',
                )
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                flag(
                    n,
                    "invalid_tool_call",
                    f"{where}: a tool message needs the tool_call_id it answers",
                )
            elif call_ids and call_id not in call_ids:
                flag(
                    n,
                    "invalid_tool_call",
                    f"{where}: tool_call_id {call_id!r} answers no earlier call",
                )
        elif "tool_call_id" in msg:
            flag(
                n,
                "invalid_tool_call",
                f"{where} ({role}): tool_call_id belongs on tool messages",
            )

    def _check_content(self, msg: dict, role: str, where: str, n: int, kind: str) -> str | None:
        """Validates content by the role's rules; returns its text (parts joined), or None."""
        content = msg.get("content")
        if content is None:
            answered = msg.get("tool_calls") or msg.get("function_call") or msg.get("refusal")
            if not (role == "assistant" and answered):
                what = "null content" if "content" in msg else "no content"
                self._flag(n, "missing_content", f"{where} ({role}) has {what}")
            return None
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            self._flag(
                n,
                "invalid_content",
                f"{where} ({role}): content must be a string or a list of parts, "
                f"not {json_type(content)}",
            )
            return None
        types = PART_TYPES[role]
        if not types:
            self._flag(
                n,
                "invalid_content",
                f"{where} ({role}): a {role} message's content must be a string in OpenAI's "
                "fine-tuning format, not a list of parts; join the parts' text",
            )
            return None
        texts = []
        for j, part in enumerate(content, 1):
            kind_of = part.get("type") if isinstance(part, dict) else None
            if kind_of == "image_url" or (isinstance(part, dict) and "image_url" in part):
                if not self._check_image(part, role, f"{where}, content part {j}", n, kind):
                    return None
                continue
            if kind_of in types and kind_of in ("text", "refusal"):
                value = part.get(kind_of)
                if isinstance(value, str):
                    texts.append(value)
                    continue
            allowed = " or ".join(
                {"text": '{"type": "text", "text": "..."}', "refusal": "a refusal part"}[t]
                for t in sorted(types - {"image_url"}, reverse=True)
            )
            if "image_url" in types:
                allowed += " or an image_url part"
            self._flag(
                n,
                "invalid_content",
                f"{where}, content part {j}: a {role} message takes {allowed}",
            )
            return None
        return "".join(texts)

    def _check_image(self, part: dict, role: str, where: str, n: int, kind: str) -> bool:
        """Validates an image part and counts its tokens; False (with a finding) when bad."""

        def bad(problem: str) -> bool:
            self._flag(n, "invalid_image", f"{where}: {problem}")
            return False

        if role != "user":
            return bad(f"images belong in user messages, not {role} messages")
        if kind == PREFERENCE:
            return bad("preference (DPO) training takes text only; drop the image")
        spec = part.get("image_url")
        if isinstance(spec, str):
            return bad(
                '"image_url" must be an object {"url": "...", "detail": "low"}, not a string'
            )
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            return bad('needs "image_url": {"url": "https://…" or "data:image/png;base64,…"}')
        if part.get("type") != "image_url":
            return bad('an image part needs "type": "image_url"')
        detail = spec.get("detail", "auto")
        if detail not in IMAGE_DETAILS:
            return bad(f"detail must be low, high or auto, not {detail!r}")
        url = spec["url"]
        head = url[:16].lower()
        size = None
        if head.startswith(("https://", "http://")):
            pass
        elif head.startswith("data:"):
            comma = url.find(",", 0, 256)
            header = url[5:comma].lower() if comma > 0 else url[5:64].lower()
            mime, *params = header.split(";")
            if comma < 0 or not mime.startswith("image/"):
                return bad(f"a data URL of {mime or 'no media type'}, not of an image")
            if mime not in IMAGE_TYPES:
                return bad(f"{mime} is not accepted: OpenAI takes JPEG, PNG or WEBP images")
            if "base64" not in params:
                return bad("an image data URL must be base64: data:image/png;base64,…")
            nbytes = (len(url) - comma - 1) * 3 // 4
            if nbytes > MAX_IMAGE_BYTES:
                return bad(f"the image is {nbytes / 2**20:,.1f} MB; OpenAI takes at most 10 MB")
            size = _image_size(url, comma + 1)
            if size is False:
                return bad("the data is not a JPEG, PNG or WEBP image (or not valid base64)")
        else:
            shown = url[:40] + ("…" if len(url) > 40 else "")
            return bad(f"the URL must be https://… or a data:image/…;base64 URL, not {shown!r}")
        tokens = image_tokens(detail, size or None)
        self._ex_fixed += tokens
        self._ex_images += 1
        if detail != "low":
            if not size:
                self._ex_unsized += 1
            elif detail == "auto":
                self._ex_auto += 1
        return True

    def _too_many_images(self, n: int) -> None:
        self._flag(
            n,
            "invalid_image",
            f"{self._ex_images} images in one example; OpenAI takes at most "
            f"{MAX_IMAGES_PER_EXAMPLE}",
        )

    def _check_reply_length(self, text: str, where: str, n: int) -> None:
        size = len(text)
        if SHORT_ASSISTANT_CHARS <= size <= LONG_ASSISTANT_CHARS:
            return  # the usual case, without copying the text to strip it
        size = len(text.strip())
        if size < SHORT_ASSISTANT_CHARS:
            self._flag(n, "short_assistant", f"{where}: assistant reply is {size} characters")
        elif size > LONG_ASSISTANT_CHARS:
            self._flag(
                n,
                "long_assistant",
                f"{where}: assistant reply is {size:,} characters (over {LONG_ASSISTANT_CHARS:,})",
            )

    def _check_secrets(self, obj: dict, n: int) -> None:
        groups = [("message", obj.get("messages"))]
        inp = obj.get("input")
        if isinstance(inp, dict):
            groups.append(("input message", inp.get("messages")))
        for key in ("preferred_output", "non_preferred_output"):
            groups.append((key, obj.get(key)))
        for label, messages in groups:
            if not isinstance(messages, list):
                continue
            for i, msg in enumerate(messages, 1):
                if not isinstance(msg, dict):
                    continue
                strings, _, _ = message_strings(msg)
                kinds = sorted({k for s in strings for k in secrets.find_secrets(s)})
                if kinds:
                    self._flag(
                        n,
                        "possible_secret",
                        f"{label} {i} ({msg.get('role')}) looks like it holds a secret "
                        f"({', '.join(kinds)}); remove it before the data leaves your machines",
                    )

    def _add_valid(self, obj: dict, raw: bytes, n: int, kind: str) -> None:
        out = self.out
        entry = out.kinds.get(kind)
        if entry is None:
            out.kinds[kind] = [1, n]
        else:
            entry[0] += 1
        start = len(self._strings)
        self._strings.extend(self._ex_strings)
        holder = obj.get("input") if kind == PREFERENCE else obj
        for key in ("tools", "functions"):
            if holder.get(key):
                self._strings.append(orjson.dumps(holder[key]).decode("utf-8"))
                self._ex_exact = False
                self._ex_tools = True
        if self._ex_tools:
            out.tool_examples += 1
        if self._ex_images:
            out.image_examples += 1
            out.images_unsized += self._ex_unsized
            out.images_auto += self._ex_auto
            out.images_exact += self._ex_images - self._ex_unsized - self._ex_auto
            if self._ex_unsized or self._ex_auto:
                self._ex_exact = False
        if not self._ex_exact:
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


def _graded(obj: dict, messages: list) -> bool:
    """Whether a row whose messages end in a user turn, with extra keys, is a reinforcement row.

    A chat row with metadata that merely ends in a user turn (an assistant reply
    earlier) stays supervised: RFT rows say so with `reference_answer`, a
    developer message, or by holding no assistant reply at all.
    """
    if "reference_answer" in obj:
        return True
    roles = [m.get("role") for m in messages if type(m) is dict]
    return "developer" in roles or "assistant" not in roles


def _hint(obj: dict) -> str:
    """What a line without "messages" looks like, when it is a format `tunebot convert` reads."""
    if "conversations" in obj:
        return " (this looks like ShareGPT: `tunebot convert --from sharegpt` writes chat JSONL)"
    if "instruction" in obj and "output" in obj:
        return " (this looks like Alpaca: `tunebot convert --from alpaca` writes chat JSONL)"
    if "prompt" in obj and "completion" in obj:
        return " (this is the legacy prompt/completion format; chat models train on messages)"
    return ""


def _image_size(url: str, start: int) -> tuple[int, int] | bool | None:
    """(width, height) from the header of a base64 image in `url` from `start`.

    None when the header is readable but gives no size within the first 48 KB
    (a JPEG with large metadata first); False when the data is not base64 or
    not a JPEG, PNG or WEBP image.
    """
    chunk = url[start : start + 65_536]
    chunk = chunk[: len(chunk) - len(chunk) % 4]
    try:
        data = base64.b64decode(chunk, validate=True)
    except (binascii.Error, ValueError):
        return False
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = data[12:16]
        if fmt == b"VP8 " and len(data) >= 30:
            return (
                int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF,
            )
        if fmt == b"VP8L" and len(data) >= 25:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if fmt == b"VP8X" and len(data) >= 30:
            width = int.from_bytes(data[24:27], "little") + 1
            return width, int.from_bytes(data[27:30], "little") + 1
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                    data[i + 5 : i + 7], "big"
                )
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        return None
    return False


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
        return "".join(
            str(p.get("text", p.get("refusal", ""))) for p in content if isinstance(p, dict)
        )
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


def json_type(value: object) -> str:
    """A JSON value's type as a message names it: "an object", "a list", "null", …"""
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


# --- the whole file's shape, from its first bytes -----------------------------------

_UTF32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32", "little"), (b"\x00\x00\xfe\xff", "UTF-32", "big"))
_UTF16_BOMS = ((b"\xff\xfe", "UTF-16", "little"), (b"\xfe\xff", "UTF-16", "big"))
_CONVERT_JSON = "`tunebot convert --from json` writes JSONL (one example per line)"


def _wide_encoding(head: bytes) -> str | None:
    """'UTF-16 (little-endian, with BOM)' and the like, or None for byte-wide text."""
    for bom, name, order in (*_UTF32_BOMS, *_UTF16_BOMS):
        if head.startswith(bom):
            return f"{name} ({order}-endian, with BOM)"
    sample = head[:64]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    for name, width, order, codec in (
        ("UTF-32", 4, "little", "utf-32-le"),
        ("UTF-32", 4, "big", "utf-32-be"),
        ("UTF-16", 2, "little", "utf-16-le"),
        ("UTF-16", 2, "big", "utf-16-be"),
    ):
        usable = sample[: len(sample) - len(sample) % width]
        try:
            text = usable.decode(codec)
        except UnicodeDecodeError:
            continue
        if text and "\x00" not in text and text.lstrip()[:1] in ("{", "["):
            return f"{name} ({order}-endian, no BOM)"
    return None


def _first_line(f: BinaryIO, head: bytes) -> tuple[bytes, int]:
    """The file's first non-blank line (BOM removed), read whole however long it is,
    and the offset just past it."""
    start = len(_BOM) if head.startswith(_BOM) else 0
    body = head[start:]
    stripped = body.lstrip(_BLANK)
    skipped = start + len(body) - len(stripped)
    end = stripped.find(b"\n")
    if end >= 0:
        return stripped[:end].rstrip(b"\r"), skipped + end + 1
    f.seek(skipped)
    line = f.readline(MAX_LINE_BYTES)
    return line.rstrip(b"\r\n"), skipped + len(line)


def _describe(values: list, n: int, what: str) -> str:
    """'12 conversations' and the like, from the first values of a JSON array or object run."""
    first = values[0] if values else None
    if isinstance(first, dict):
        if "messages" in first:
            return f"{n:,} conversation{'s' if n != 1 else ''}"
        if PREFERENCE_KEYS & set(first):
            return f"{n:,} preference row{'s' if n != 1 else ''}"
        if "conversations" in first:
            return f"{n:,} ShareGPT conversation{'s' if n != 1 else ''}"
        if "instruction" in first:
            return f"{n:,} Alpaca row{'s' if n != 1 else ''}"
    return f"{n:,} {what}{'s' if n != 1 else ''}"


def _fix_for(first: object) -> str:
    if isinstance(first, dict):
        hint = _hint(first)
        if "sharegpt" in hint:
            return "`tunebot convert --from sharegpt` writes JSONL"
        if "alpaca" in hint:
            return "`tunebot convert --from alpaca` writes JSONL"
    return _CONVERT_JSON


def _values(text: str, pos: int, array: bool) -> tuple[list, int, str | None]:
    """The top-level values from `pos`: (first three values, count, problem or None).

    For an array, the elements after its '['; otherwise objects one after another.
    Values are decoded one at a time, so memory holds one value, not the file's.
    """
    import json

    decoder = json.JSONDecoder()
    first: list = []
    count = 0
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def where(i: int) -> str:
        line = text.count("\n", 0, i) + 1
        return f"line {line:,}"

    i = skip(pos)
    if array and i < n and text[i] == "]":
        return first, 0, None
    while i < n:
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            return first, count, f"it stops parsing at {where(exc.pos)} ({exc.msg})"
        count += 1
        if len(first) < 3:
            first.append(value)
        i = skip(i)
        if array:
            if i < n and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < n and text[i] == "]":
                return first, count, None
            return first, count, f"it stops parsing at {where(i)} (expected ',' or ']')"
    return first, count, ("the array is never closed with ']'" if array else None)


def _file_shape(f: BinaryIO, head: bytes, size: int) -> tuple[str, str] | None:
    """(code, message) when the whole file is a shape other than JSON Lines, else None.

    A normal JSONL file costs one parse of its first line. A file that starts
    like a JSON array, or whose first line is not a whole object, is read once
    more (up to SHAPE_COUNT_MAX_BYTES) to say what it holds. Leaves `f` anywhere.
    """
    wide = _wide_encoding(head)
    if wide:
        return (
            "wrong_encoding",
            f"the file is {wide} text, not UTF-8: save it as UTF-8 (PowerShell: "
            "`Out-File -Encoding utf8`), or `tunebot convert` transcodes it",
        )
    body = head[len(_BOM) :] if head.startswith(_BOM) else head
    opener = body.lstrip(_BLANK)[:1]
    if opener not in (b"[", b"{"):
        return None
    line, end = _first_line(f, head)
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        value = _UNPARSED
    if isinstance(value, dict):
        return None  # a JSON object on the first line: JSON Lines, the normal case
    if isinstance(value, list):
        # Lines that are arrays are JSONL of the wrong thing (not_an_object per
        # line), unless this one line is the whole file.
        f.seek(end)
        rest = f.read(65_536)
        if rest.strip(_BLANK) or end + len(rest) < size:
            return None
        first = value[0] if value else None
        return (
            "json_array",
            f"the file is a JSON array of {_describe(value[:3], len(value), 'value')} on one "
            f"line, not JSONL: {_fix_for(first)}",
        )
    if value is not _UNPARSED:
        return None  # a number or string first: not a shape we name
    f.seek(0)
    sniff = f.read(1 << 20)
    text = sniff.decode("utf-8", "replace").lstrip("\ufeff")
    start = text.find(opener.decode())
    if opener == b"{":
        import json

        try:
            obj, stop = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None  # a broken first line of an ordinary file: the scan says where
        if not isinstance(obj, dict) or "\n" not in text[start:stop]:
            return None  # one line after all (its bytes were not UTF-8): the scan says so
        first = [obj]
    if size > SHAPE_COUNT_MAX_BYTES:
        if opener == b"[":
            return (
                "json_array",
                f"the file is a JSON array (too large to count here), not JSONL: {_CONVERT_JSON}",
            )
        return (
            "multiline_json",
            "the file holds JSON objects pretty-printed over several lines each (too many to "
            f"count here), not one per line: {_fix_for(first[0])}",
        )
    if len(sniff) < size:
        f.seek(0)
        text = f.read(SHAPE_COUNT_MAX_BYTES).decode("utf-8", "replace").lstrip("\ufeff")
    if opener == b"[":
        first, count, problem = _values(text, start + 1, True)
        tail = f"; {problem}" if problem else ""
        return (
            "json_array",
            f"the file is a JSON array of {_describe(first, count, 'value')}, not JSONL{tail}: "
            f"{_fix_for(first[0] if first else None)}",
        )
    first, count, problem = _values(text, start, False)
    tail = f"; {problem}" if problem else ""
    return (
        "multiline_json",
        f"the file holds {_describe(first, count, 'object')} pretty-printed over several lines "
        f"each, not one per line{tail}: {_fix_for(first[0])}",
    )


_UNPARSED = object()


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
    """Validate a fine-tuning JSONL file (a path, or a binary file object).

    `context_tokens` is the model's training context (examples beyond it get
    `over_token_limit`); `max_file_bytes` the upload cap (`file_too_large`; the
    scan still runs to the end). `workers` defaults to the CPUs available;
    file objects and small files are scanned in this process.
    """
    shape: tuple[str, str] | None
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        size = os.path.getsize(path)  # OSError when it cannot be opened: the caller's to report
        with open(path, "rb") as f:
            head = f.read(8192)
            shape = _file_shape(f, head, size)
        if shape or _looks_binary(head):
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
        shape = _file_shape(_Window(source, start), head, size)
        source.seek(start)
        if shape or _looks_binary(head):
            chunks = []
        else:
            counter = TokenCounter(encoding, backend)
            chunks = [_Scanner(counter).scan(_lines(source, None, True))]
    return _merge(str(path), size, chunks, head, shape, context_tokens, max_file_bytes, encoding)


class _Window:
    """A file object seen from `start`: what `_file_shape` reads of a stream mid-way."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        self._f, self._start = f, start

    def seek(self, pos: int) -> int:
        return self._f.seek(self._start + pos) - self._start

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readline(self, n: int = -1) -> bytes:
        return self._f.readline(n)


def _merge(
    path: str,
    size: int,
    chunks: list[_Chunk],
    head: bytes,
    shape: tuple[str, str] | None,
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
    kinds: dict[str, list[int]] = {}  # kind -> [valid lines, first valid line]
    seen: dict[str, list[int]] = {}  # kind -> [recognised lines, first one]
    tool_examples = unsized = auto = exact_images = image_examples = 0
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
        for mine, theirs in ((kinds, chunk.kinds), (seen, chunk.seen)):
            for kind, (n, first) in theirs.items():
                entry = mine.setdefault(kind, [0, first + offset])
                entry[0] += n
        tool_examples += chunk.tool_examples
        unsized += chunk.images_unsized
        auto += chunk.images_auto
        exact_images += chunk.images_exact
        image_examples += chunk.image_examples
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
    # The file's kind: that of most valid lines; with none valid, of most recognised lines.
    tally = kinds or seen
    kind = max(tally, key=lambda k: (tally[k][0], -tally[k][1])) if tally else UNKNOWN
    alone = False  # one finding says it all: no too_few_examples beside it
    if shape:
        file_level.append((0, shape[0], shape[1], None))
        alone = True
    elif _looks_binary(head):
        file_level.append((0, "not_jsonl", "this is a binary file, not JSONL text", None))
    elif not examples:
        # Nothing but whitespace: one finding says it all (not a warning per blank line).
        what = (
            "is empty (0 bytes)" if not size else f"holds only whitespace ({offset:,} blank lines)"
        )
        raw, counts, alone = [], {}, True
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
    if len(kinds) > 1:
        parts = [
            f"{KIND_LABELS[k]} ({n:,} line{'s' if n != 1 else ''}, first on line {first})"
            for k, (n, first) in sorted(kinds.items(), key=lambda kv: kv[1][1])
        ]
        file_level.append(
            (
                0,
                "mixed_kinds",
                f"the file mixes kinds of example: {', '.join(parts)}; a training file holds "
                "one kind (one method per job): split it",
                None,
            )
        )
    if kind == REINFORCEMENT and not shape:
        file_level.append(
            (
                0,
                "untrainable_kind",
                "reinforcement fine-tuning (RFT) rows: messages that end in a user turn, with "
                "grader fields beside them. No provider in the price table trains them today "
                "(OpenAI's only RFT model, o4-mini, is shut down; local training is supervised "
                "only)",
                None,
            )
        )
        alone = True
    if image_examples > MAX_IMAGE_EXAMPLES:
        file_level.append(
            (
                0,
                "invalid_image",
                f"{image_examples:,} examples hold images; OpenAI takes at most "
                f"{MAX_IMAGE_EXAMPLES:,} per file: split it",
                None,
            )
        )
    if valid < MIN_EXAMPLES and not alone:
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
    images = unsized + auto + exact_images
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
        kind=kind,
        kinds={k: n for k, (n, _) in sorted(kinds.items())},
        images=images,
        token_notes=tuple(_token_notes(tool_examples, unsized, auto, exact_images)),
    )


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _token_notes(tool_examples: int, unsized: int, auto: int, exact_images: int) -> list[str]:
    """Why the counts are approximate, and how images were counted, in words."""
    notes = []
    if unsized or auto:
        parts = []
        if unsized:
            parts.append(
                f"{_plural(unsized, 'image')} counted at {IMAGE_MAX_TOKENS:,} tokens each, the "
                f"most {IMAGE_RULE}'s rule charges at high or auto detail (a URL does not give "
                "the image's size)"
            )
        if auto:
            parts.append(
                f"{_plural(auto, 'image')} with detail auto counted as high detail (OpenAI "
                "chooses the detail itself)"
            )
        notes.append("token counts are approximate: " + "; ".join(parts))
    if exact_images:
        notes.append(
            f"{_plural(exact_images, 'image')} counted exactly by {IMAGE_RULE}'s rule "
            "(low detail 85 tokens; high detail 85 + 170 per 512 px tile)"
        )
    if tool_examples:
        notes.append(
            f"token counts are approximate: {_plural(tool_examples, 'example')} with tool calls "
            "or tool definitions, whose JSON is counted as text (OpenAI publishes no formula)"
        )
    return notes


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
