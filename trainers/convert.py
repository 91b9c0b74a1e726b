"""Turning common public dataset formats into OpenAI chat JSONL.

Formats (`FORMATS`):

- ``sharegpt``: `conversations` of `from`/`value` turns (`human`, `gpt`,
  `system`, `function_call`, `observation`), or the "openai" flavour,
  `messages` of `role`/`content` turns; a `system` column, a `tools` column (a
  JSON string or a list of function definitions) and an `images` column (with
  `<image>` placeholders in the text).
- ``alpaca``: `instruction` + `input` (the last user turn), `output` (the
  assistant), `system`, and `history` (earlier [user, assistant] pairs).
- ``csv``: a prompt and a completion column (and optionally `system`); the
  separator (`,` `;` tab) is detected.
- ``json``: rows that already are chat examples (`messages`), as a JSON array,
  as JSON Lines, or as pretty-printed objects one after another.

The JSON formats read any of those three layouts. The encoding is detected:
UTF-8 with or without a BOM, UTF-16 / UTF-32 with or without a BOM, else
Windows-1252 (said in a notice). Lines are split on ``\\n`` only: U+2028,
U+2029, U+0085, ``\\x0b`` and ``\\x0c`` are text.

Every input row is either converted or listed in `Conversion.problems` with
where it was and why; a field the converter does not use is counted in
`Conversion.ignored` (reported once per file), never dropped in silence.

Input is bounded: a CSV field over `MAX_CSV_FIELD_CHARS`, or JSON nested
deeper than Python's parser goes (about 1,000 levels), is a problem reported
with its line, not a crash.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from trainers.data import json_type

FORMATS = ("sharegpt", "alpaca", "csv", "json")
MAX_CSV_FIELD_CHARS = 128 * 1024  # csv's own default, stated: one field, not one file
CSV_SEPARATORS = (",", ";", "\t")

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "function_call",
    "observation": "observation",
    "tool": "tool",
}
# Keys of an OpenAI chat message that a role/content turn may carry as they are.
_CARRIED_MESSAGE_KEYS = ("name", "weight", "tool_calls", "tool_call_id", "refusal")
_EXAMPLE_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")
_CSV_COLUMNS = (
    ("prompt", "completion"),
    ("user", "assistant"),
    ("question", "answer"),
    ("input", "output"),
)
_IMAGE = "<image>"


@dataclass
class Conversion:
    """What a conversion made, and everything it could not keep."""

    examples: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, what): not converted
    ignored: dict[str, int] = field(default_factory=dict)  # field -> converted rows that had it
    notices: list[str] = field(default_factory=list)  # about the whole file (encoding, separator)
    encoding: str = "utf-8"

    @property
    def dropped(self) -> bool:
        """True when anything in the input is not in the output."""
        return bool(self.problems or self.ignored)

    def ignored_lines(self) -> list[str]:
        return [
            f"ignored field `{name}` in {n:,} row{'s' if n != 1 else ''}"
            for name, n in self.ignored.items()
        ]

    def jsonl(self) -> bytes:
        return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.examples).encode()

    def write(self, path: Path) -> None:
        Path(path).write_bytes(self.jsonl())


def convert(path: Path, fmt: str) -> Conversion:
    """Convert the file at `path` (OSError when it cannot be read)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return convert_bytes(Path(path).read_bytes(), fmt)


def convert_bytes(data: bytes, fmt: str) -> Conversion:
    """Convert an in-memory file (an upload's stored bytes)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Conversion()
    try:
        text, out.encoding, notice = decode(data)
    except UnicodeDecodeError as exc:
        out.problems.append(
            ("the file", f"cannot be read as text: {exc.reason} at byte {exc.start:,}")
        )
        return out
    if notice:
        out.notices.append(notice)
    if not text.strip():
        out.notices.append("the file is empty: nothing to convert")
        return out
    if fmt == "csv":
        rows: Iterator[tuple[str, object]] = _csv_rows(text, out)
        make = _from_csv
    else:
        rows = _json_rows(text, out)
        make = {"sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "json": _from_chat}[fmt]
    for where, row in rows:
        ignored: list[str] = []
        try:
            example = make(row, ignored)
        except ValueError as exc:
            out.problems.append((where, str(exc)))
            continue
        out.examples.append(example)
        for name in dict.fromkeys(ignored):  # once per row
            out.ignored[name] = out.ignored.get(name, 0) + 1
    return out


SAMPLE_BYTES = 256 * 1024  # what `suggest` reads of a file


def suggest(data: bytes, name: str = "", *, complete: bool = True) -> tuple[str, str] | None:
    """(format, what the file looks like) when converting it would help; None otherwise.

    For offering a conversion: None for a file that already is UTF-8 chat JSON
    Lines, or that no converter reads. `data` may be the file's first bytes
    only (`complete=False`).
    """
    if name.lower().endswith((".csv", ".tsv")):
        return "csv", "a CSV file"
    try:
        text, encoding, _ = decode(data, final=complete)
    except UnicodeDecodeError:
        return None
    start = _JSON_WS.match(text, 0).end()
    if start >= len(text):
        return None
    layout = None
    if text[start] == "[" and not _jsonl_of_arrays(text, start):
        layout = "a JSON array"
    elif text[start] == "{":
        eol = text.find("\n", start)
        try:
            _decoder.raw_decode(text[start : eol if eol >= 0 else len(text)])
        except json.JSONDecodeError:
            layout = "pretty-printed JSON objects"
        except RecursionError:
            return None
    row = next((r for _, r in _json_rows(text, Conversion())), None)
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        fmt, kind = "sharegpt", "ShareGPT rows"
    elif "instruction" in row:
        fmt, kind = "alpaca", "Alpaca rows"
    elif "messages" in row:
        fmt, kind = "json", "chat rows"
    else:
        return None
    wide = _ENCODING_NAMES.get(encoding)
    if fmt == "json" and layout is None and wide is None:
        return None  # chat JSON Lines in UTF-8 already
    what = f"{layout} ({kind})" if layout else kind
    if wide:
        what += f" in {wide}"
    return fmt, what


_ENCODING_NAMES = {
    "utf-16-le": "UTF-16LE",
    "utf-16-be": "UTF-16BE",
    "utf-32-le": "UTF-32LE",
    "utf-32-be": "UTF-32BE",
    "cp1252": "Windows-1252",
    "latin-1": "Latin-1",
}


# --- encodings ------------------------------------------------------------------

_BOMS = (  # longest first: a UTF-32LE BOM starts with the UTF-16LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode(data: bytes, *, final: bool = True) -> tuple[str, str, str | None]:
    """(text, encoding, notice): UTF-8/16/32 by BOM or by their zero bytes, else cp1252.

    `final=False` for a file's first bytes: a character cut at the end is left out.
    Raises UnicodeDecodeError when a BOM names an encoding the bytes are not in.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            text = _decode(data[len(bom) :], codec, final)
            if codec == "utf-8":
                return text, "utf-8-sig", None
            label = _ENCODING_NAMES[codec]
            return text, codec, f"read as {label} (byte-order mark) and written as UTF-8"
    wide = _wide_encoding(data[:4096])
    if wide:
        try:
            text = _decode(data, wide, final)
        except UnicodeDecodeError:
            pass
        else:
            label = _ENCODING_NAMES[wide]
            return text, wide, f"read as {label} (no byte-order mark) and written as UTF-8"
    try:
        return _decode(data, "utf-8", final), "utf-8", None
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start:,}"
    try:
        text, codec = data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: no cp1252 character
        text, codec = data.decode("latin-1"), "latin-1"
    name = "Windows-1252 (cp1252)" if codec == "cp1252" else "Latin-1"
    return (
        text,
        codec,
        f"not UTF-8 (first at {where}): read as {name}; check accented letters, "
        "and save the file as UTF-8 next time",
    )


def _decode(data: bytes, codec: str, final: bool) -> str:
    if final:
        return data.decode(codec)
    return codecs.getincrementaldecoder(codec)().decode(data, final=False)


def _wide_encoding(head: bytes) -> str | None:
    """UTF-32 or UTF-16 without a BOM, told by where the zero bytes of ASCII fall."""
    n4 = len(head) - len(head) % 4
    if n4 >= 4 and b"\0" in head:
        quads = [head[k:n4:4] for k in range(4)]
        zeros = [q.count(0) / len(q) for q in quads]
        if zeros[2] == zeros[3] == 1 and zeros[0] < 0.5:
            return "utf-32-le"
        if zeros[0] == zeros[1] == 1 and zeros[3] < 0.5:
            return "utf-32-be"
    n2 = len(head) - len(head) % 2
    if n2 >= 2 and b"\0" in head:
        even, odd = head[0:n2:2], head[1:n2:2]
        z_even, z_odd = even.count(0) / len(even), odd.count(0) / len(odd)
        if z_odd > 0.3 and z_even < 0.05:
            return "utf-16-le"
        if z_even > 0.3 and z_odd < 0.05:
            return "utf-16-be"
    return None


# --- JSON: arrays, JSON Lines, pretty-printed objects ---------------------------------

_TOO_DEEP = "JSON nested too deep to read (about 1,000 levels; a chat example needs under 20)"
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_JSON_WS = re.compile(r"[ \t\r\n]*")
_ROW_START = re.compile(r"\n[{\[]")  # a line that starts a new top-level value
_decoder = json.JSONDecoder()


class _Lines:
    """Line numbers of positions in `text`, counting `\\n` only, cheaply when positions grow."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _span(first: int, last: int) -> str:
    return f"line {first}" if last <= first else f"lines {first}–{last}"


def _json_rows(text: str, out: Conversion) -> Iterator[tuple[str, object]]:
    lines = _Lines(text)
    pos = _JSON_WS.match(text, 0).end()
    if pos < len(text) and text[pos] == "[" and not _jsonl_of_arrays(text, pos):
        pos = yield from _array_rows(text, pos, lines, out)
        if pos is None:
            return
    yield from _stream_rows(text, pos, lines, out)


def _jsonl_of_arrays(text: str, pos: int) -> bool:
    """True when the first line is a whole array and more follows: JSON Lines, not one array."""
    eol = text.find("\n", pos)
    if eol < 0 or not text[eol:].strip():
        return False
    try:
        _, end = _decoder.raw_decode(text[pos:eol])
    except (json.JSONDecodeError, RecursionError):
        return False
    return not text[pos + end : eol].strip()


def _array_rows(
    text: str, pos: int, lines: _Lines, out: Conversion
) -> Iterator[tuple[str, object]]:
    """Items of the array starting at `pos`; returns where reading goes on, or None to stop."""
    n = len(text)
    pos = _JSON_WS.match(text, pos + 1).end()
    if pos < n and text[pos] == "]":
        out.notices.append("the JSON array is empty: nothing to convert")
        return pos + 1
    i = 0
    while True:
        i += 1
        pos = _JSON_WS.match(text, pos).end()
        line = lines.at(pos)
        where = f"item {i} (line {line})"
        try:
            value, pos = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            out.problems.append(
                (where, f"{_bad_json(exc)}; this item and the rest of the array were not read")
            )
            return None
        except RecursionError:
            end = _matching_end(text, pos)
            if end is None:
                out.problems.append((where, f"{_TOO_DEEP}; the rest of the file was not read"))
                return None
            out.problems.append((where, _TOO_DEEP))
            pos = end
        else:
            yield where, value
        pos = _JSON_WS.match(text, pos).end()
        if pos < n and text[pos] == ",":
            pos = _JSON_WS.match(text, pos + 1).end()
            if pos < n and text[pos] == "]":  # a trailing comma loses nothing
                return pos + 1
            continue
        if pos < n and text[pos] == "]":
            return pos + 1
        where = f"item {i + 1} (line {lines.at(pos)})"
        out.problems.append(
            (where, f"expected ',' or ']' after item {i}; the rest of the array was not read")
        )
        return None


def _stream_rows(
    text: str, pos: int, lines: _Lines, out: Conversion
) -> Iterator[tuple[str, object]]:
    """JSON Lines, or whole values one after another (pretty-printed objects)."""
    n = len(text)
    while True:
        pos = _JSON_WS.match(text, pos).end()
        if pos >= n:
            return
        first = lines.at(pos)
        eol = text.find("\n", pos)
        eol = n if eol < 0 else eol
        line = text[pos:eol]
        try:  # one line first: a broken JSON Lines row costs its own line only
            value, end = _decoder.raw_decode(line)
        except json.JSONDecodeError as exc:
            if exc.pos < len(line.rstrip()):  # broken within the line: not a longer value
                column = pos - text.rfind("\n", 0, pos) - 1
                out.problems.append((f"line {first}", _bad_json(exc, first - 1, column)))
                pos = eol
                continue
        except RecursionError:
            out.problems.append((f"line {first}", _TOO_DEEP))
            pos = eol
            continue
        else:
            rest = line[end:].strip()
            if not rest:
                yield f"line {first}", value
                pos = eol
                continue
            if rest[0] not in "{[":
                out.problems.append(
                    (f"line {first}", f"not valid JSON: extra text after the value: {rest[:40]!r}")
                )
                pos = eol
                continue
            yield f"line {first}", value  # several values on one line
            pos += end
            continue
        # The value goes on past this line: a pretty-printed object.
        try:
            value, end = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            found = _ROW_START.search(text, eol)
            resume = found.start() + 1 if found else n
            last = lines.at(resume - 1) if found else text.count("\n", 0, n) + 1
            out.problems.append((_span(first, last), _bad_json(exc)))
            pos = resume
            continue
        except RecursionError:
            end = _matching_end(text, pos)
            out.problems.append((f"line {first}", _TOO_DEEP))
            if end is None:
                return
            pos = end
            continue
        yield f"line {first}", value
        pos = end


def _bad_json(exc: json.JSONDecodeError, line_offset: int = 0, column_offset: int = 0) -> str:
    """The parser's message, its line and column in the file (offsets: where it started)."""
    line, column = exc.lineno + line_offset, exc.colno + (column_offset if exc.lineno == 1 else 0)
    return f"not valid JSON: {exc.msg} (line {line}, column {column})"


def _matching_end(text: str, pos: int) -> int | None:
    """Where the value opening at `pos` closes, by counting brackets (None if never)."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, pos):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


# --- rows to examples ---------------------------------------------------------------


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is missing or empty")
    return value


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {json_type(value)}")
    return value if value.strip() else None


def _unused(row: dict, used: tuple[str, ...], ignored: list[str], prefix: str = "") -> None:
    for key, value in row.items():
        if key not in used and value not in (None, "", [], {}):
            ignored.append(prefix + str(key))


def _keys(row: dict) -> str:
    keys = ", ".join(str(k) for k in list(row)[:8])
    return f"this row has {keys}" if keys else "this row is empty"


def _from_chat(row: object, ignored: list[str]) -> dict:
    """A row that already is a chat example: kept as it is (the validator judges it)."""
    if not isinstance(row, dict):
        raise ValueError(f'expected {{"messages": [...]}}, not {json_type(row)}')
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        hint = ""
        if "conversations" in row:
            hint = "; it looks like ShareGPT: convert with --from sharegpt"
        elif "instruction" in row:
            hint = "; it looks like Alpaca: convert with --from alpaca"
        raise ValueError(
            f'expected {{"messages": [{{"role": ..., "content": ...}}]}} ({_keys(row)}){hint}'
        )
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f'message {i} must be {{"role": ..., "content": ...}}')
    _unused(row, _EXAMPLE_KEYS, ignored)
    return {k: row[k] for k in _EXAMPLE_KEYS if k in row}


def _from_sharegpt(row: object, ignored: list[str]) -> dict:
    expected = (
        'expected {"conversations": [{"from": ..., "value": ...}, ...]} '
        'or {"messages": [{"role": ..., "content": ...}, ...]}'
    )
    if not isinstance(row, dict):
        raise ValueError(f"{expected}, not {json_type(row)}")
    column = "conversations" if "conversations" in row else "messages"
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{expected} ({_keys(row)})")
    messages: list[dict] = []
    system = _optional_text(row, "system")
    if system is not None:
        messages.append({"role": "system", "content": system})
    tools = _tools(row.get("tools"))
    images = _images(row.get("images"))
    used_images = 0
    calls_made = 0
    pending: list[str] = []  # call ids not yet answered, oldest first
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        speaker_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        raw_speaker = turn.get(speaker_key)
        speaker = raw_speaker.lower() if isinstance(raw_speaker, str) else ""
        role = _SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise ValueError(
                f"turn {i} is from {speaker or 'nobody'!r}; known: {', '.join(_SHAREGPT_ROLES)}"
            )
        carried = {}
        for key in turn:
            if key in (speaker_key, text_key):
                continue
            if speaker_key == "role" and key in _CARRIED_MESSAGE_KEYS:
                carried[key] = turn[key]
            elif turn[key] not in (None, "", [], {}):
                ignored.append(f"{column}[].{key}")
        value = turn.get(text_key)
        if role == "function_call":
            calls = _calls(value, i, calls_made)
            calls_made += len(calls)
            pending += [c["id"] for c in calls]
            messages.append({"role": "assistant", "tool_calls": calls})
            continue
        if role == "observation" or (role == "tool" and "tool_call_id" not in carried):
            if not pending:
                raise ValueError(f"turn {i} ({speaker}) answers no function_call turn before it")
            if not isinstance(value, str):
                raise ValueError(f"turn {i}'s {text_key} must be a string")
            messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": value})
            continue
        if speaker_key == "role" and (not isinstance(value, str) or not value.strip()):
            # the openai flavour: content parts, or no content beside tool calls
            if isinstance(value, list) and value:
                messages.append({"role": role, "content": value, **carried})
                continue
            if value is None and carried.get("tool_calls"):
                messages.append({"role": role, **carried})
                continue
        content = _text(value, f"turn {i}'s {text_key}")
        if _IMAGE in content:
            if role != "user":
                raise ValueError(
                    f"turn {i} ({speaker}) has an {_IMAGE} placeholder; OpenAI takes images "
                    "in user messages only"
                )
            parts, used_images = _image_parts(content, images, used_images, i)
            messages.append({"role": role, "content": parts, **carried})
            continue
        messages.append({"role": role, "content": content, **carried})
    if used_images != len(images):
        raise ValueError(
            f"the row lists {len(images)} image{'s' if len(images) != 1 else ''} but its text "
            f"has {used_images} {_IMAGE} placeholder{'s' if used_images != 1 else ''}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant (gpt) turn")
    _unused(row, (column, "system", "tools", "images"), ignored)
    example: dict = {"messages": messages}
    if tools:
        example["tools"] = tools
    return example


def _tools(value: object) -> list[dict] | None:
    """A `tools` column (a JSON string or a list) in OpenAI's form."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"tools is not valid JSON: {getattr(exc, 'msg', exc)}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"tools must be a list of function definitions, not {json_type(value)}")
    tools = []
    for j, tool in enumerate(value, 1):
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
        ):
            tools.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"]:
            tools.append({"type": "function", "function": tool})
        else:
            raise ValueError(
                f'tool {j} must be a function definition: {{"name": ..., "parameters": ...}}'
            )
    return tools or None


def _calls(value: object, turn: int, made: int) -> list[dict]:
    """A function_call turn's value: {"name", "arguments"} or a list of them (parallel calls)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(
                f"turn {turn} (function_call) is not valid JSON: {getattr(exc, 'msg', exc)}"
            ) from None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(
                f'turn {turn} (function_call) must be {{"name": ..., "arguments": ...}}'
            )
        if "arguments" not in item:
            raise ValueError(f"turn {turn} (function_call) has no arguments")
        args = item["arguments"]
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        made += 1
        calls.append(
            {
                "id": f"call_{made}",
                "type": "function",
                "function": {"name": item["name"], "arguments": args},
            }
        )
    if not calls:
        raise ValueError(f"turn {turn} (function_call) calls nothing")
    return calls


def _images(value: object) -> list[str]:
    """An `images` column: http(s) or data URLs only (OpenAI cannot read local paths)."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"images must be a list of URLs, not {json_type(value)}")
    for j, image in enumerate(value, 1):
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"image {j} must be a URL string, not {json_type(image)}")
        if not _is_image_url(image):
            shown = image if len(image) <= 80 else image[:77] + "..."
            raise ValueError(
                f"image {shown!r} is a local path; OpenAI needs a URL or a base64 data URL"
            )
    return list(value)


def _is_image_url(image: str) -> bool:
    if image.startswith("data:"):
        return ";base64," in image[:100]
    parts = urlsplit(image)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _image_parts(content: str, images: list[str], used: int, turn: int) -> tuple[list[dict], int]:
    parts: list[dict] = []
    pieces = content.split(_IMAGE)
    for k, piece in enumerate(pieces):
        if k:
            if used >= len(images):
                raise ValueError(
                    f"turn {turn} has more {_IMAGE} placeholders than the row has images "
                    f"({len(images)})"
                )
            parts.append({"type": "image_url", "image_url": {"url": images[used]}})
            used += 1
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts, used


def _from_alpaca(row: object, ignored: list[str]) -> dict:
    if not isinstance(row, dict):
        raise ValueError(
            f'expected {{"instruction": ..., "input": ..., "output": ...}}, not {json_type(row)}'
        )
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"input must be a string, not {json_type(extra)}")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    output = row.get("output")
    if output is not None and not isinstance(output, str):
        raise ValueError(f"output must be a string, not {json_type(output)}")
    messages = []
    system = _optional_text(row, "system")
    if system is not None:
        messages.append({"role": "system", "content": system})
    history = row.get("history")
    if history not in (None, []):
        if not isinstance(history, list):
            raise ValueError(
                f"history must be a list of [user, assistant] pairs, not {json_type(history)}"
            )
        for j, pair in enumerate(history, 1):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"history item {j} must be a [user, assistant] pair")
            messages.append(
                {"role": "user", "content": _text(pair[0], f"history item {j}'s user turn")}
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": _text(pair[1], f"history item {j}'s assistant turn"),
                }
            )
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(output, "output")},
    ]
    _unused(row, ("instruction", "input", "output", "system", "history"), ignored)
    return {"messages": messages}


# --- CSV -------------------------------------------------------------------------------


def _csv_separator(text: str) -> str:
    """The separator of a CSV text: sniffed, then checked against the known header columns."""
    sample = text[: 32 * 1024]
    sniffed = None
    with contextlib.suppress(csv.Error):
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(CSV_SEPARATORS)).delimiter
    candidates = [sniffed] if sniffed else []
    candidates += [s for s in CSV_SEPARATORS if s != sniffed]
    for sep in candidates:
        try:
            header = next(csv.reader(io.StringIO(sample, newline="\n"), delimiter=sep), [])
        except csv.Error:
            continue
        if _csv_pair(_csv_header(header)):
            return sep
    # No known header under any separator: the one sniffed, else the commonest on line 1.
    first_line = sample.split("\n", 1)[0]
    return sniffed or max(CSV_SEPARATORS, key=first_line.count)


def _csv_header(names: list[str]) -> list[str]:
    """Column names, trimmed and lower-cased; a repeated name gets its column number."""
    header: list[str] = []
    for i, name in enumerate(names, 1):
        name = name.strip().lower()
        header.append(f"{name} (column {i})" if name in header else name)
    return header


def _csv_pair(header: list[str]) -> tuple[str, str] | None:
    return next(((p, c) for p, c in _CSV_COLUMNS if p in header and c in header), None)


_BARE_CR = re.compile(r"\r(?!\n)")


class _Restored:
    """A csv reader whose fields get back the bare \r hidden as `mark`."""

    def __init__(self, reader, mark: str) -> None:
        self.reader, self.mark = reader, mark

    @property
    def line_num(self) -> int:
        return self.reader.line_num

    def __iter__(self) -> _Restored:
        return self

    def __next__(self) -> list[str]:
        return [f.replace(self.mark, "\r") for f in next(self.reader)]


def _csv_rows(text: str, out: Conversion) -> Iterator[tuple[str, object]]:
    sep = _csv_separator(text)
    if sep != ",":
        out.notices.append(f"read as {'tab' if sep == chr(9) else repr(sep)}-separated")
    # Split on \n only (\r\n endings are csv's business); a file of bare \r endings as such.
    newline, restore = "\n", None
    if "\n" not in text:
        newline = ""
    elif _BARE_CR.search(text):  # csv ends a record at a bare \r: hide it until the fields are cut
        mark = next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in text)
        text = _BARE_CR.sub(mark, text)
        restore = mark
    reader = csv.reader(io.StringIO(text, newline=newline), delimiter=sep)
    if restore:
        reader = _Restored(reader, restore)
    rows = 0
    header: list[str] | None = None
    limit = csv.field_size_limit(MAX_CSV_FIELD_CHARS)  # process-wide: put back after
    try:
        try:
            header = _csv_header(next(reader, []))
        except csv.Error as exc:
            out.problems.append(("line 1", f"the header cannot be read: {exc}"))
            return
        pair = _csv_pair(header)
        if pair is None:
            options = "; ".join(f"{p},{c}" for p, c in _CSV_COLUMNS)
            out.problems.append(
                ("line 1", f"the header needs a prompt and a completion column ({options})")
            )
            return
        end = reader.line_num
        while True:
            start = end + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if "field larger than field limit" in str(exc):
                    raise
                out.problems.append((_span(start, reader.line_num), f"not valid CSV: {exc}"))
                rows += 1
                end = reader.line_num
                continue
            end = reader.line_num
            if not record:  # a blank line
                continue
            rows += 1
            where = _span(start, end) if start != end else f"line {start}"
            if len(record) > len(header):
                out.problems.append((where, "more fields than the header has"))
                continue
            yield where, {"pair": pair, "row": dict(zip(header, record, strict=False))}
    except csv.Error as exc:  # an over-long field: stop there, and say where
        reason = str(exc)
        if "field larger than field limit" in reason:
            reason = (
                f"a field is over {MAX_CSV_FIELD_CHARS // 1024:,} KiB "
                f"({MAX_CSV_FIELD_CHARS:,} characters); shorten or split it"
            )
        row_label = "the header" if header is None else f"row {rows + 1}"
        out.problems.append(
            (
                f"line {reader.line_num} ({row_label})",
                f"{reason}; this row and the rest of the file were not read",
            )
        )
    finally:
        csv.field_size_limit(limit)


def _from_csv(item: dict, ignored: list[str]) -> dict:
    prompt_col, completion_col = item["pair"]
    row = item["row"]
    messages = []
    if (row.get("system") or "").strip():
        messages.append({"role": "system", "content": row["system"]})
    messages += [
        {"role": "user", "content": _text(row.get(prompt_col), prompt_col)},
        {"role": "assistant", "content": _text(row.get(completion_col), completion_col)},
    ]
    _unused(row, (prompt_col, completion_col, "system"), ignored)
    return {"messages": messages}
