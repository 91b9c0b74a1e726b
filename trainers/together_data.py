"""Together AI's rules for conversational fine-tuning data, as `trainers.data.Finding`s.

Pure functions over parsed JSON: `check_example(row)` for one JSONL line,
`check_messages(messages)` for its ``messages`` list. Every finding is an
error (Together refuses the file), with the 1-based ``line`` given (0: not
known) and a ``together_*`` code.

Source: Together AI's docs, read 2026-11-30:
"Data preparation" (https://docs.together.ai/docs/fine-tuning/data-preparation),
"Function calling" (https://docs.together.ai/docs/fine-tuning/function-calling)
and "Reasoning" (https://docs.together.ai/docs/fine-tuning/reasoning):

- Conversational data is a ``messages`` array; a line that also has another
  format's keys (``text``; ``prompt`` and ``completion``; ``input``,
  ``preferred_output`` and ``non_preferred_output``) has "two possible
  formats" and the server rejects it (`together_mixed_format`).
- Each message has a ``role``, one of system, user, assistant, or tool for a
  tool's result (`together_role`), and ``content`` (`together_content`):
  a string, or content parts for multimodal models; an assistant message may
  carry ``tool_calls`` in place of content, and ``reasoning`` /
  ``reasoning_content`` beside it.
- "The conversation must start with system or user and alternate user and
  assistant afterwards" (`together_first_role`, `together_alternation`); tool
  results follow an assistant message with ``tool_calls``, and the assistant
  answers after them (`together_tool_order`).
- Per-message ``weight``: "Only 0 and 1 are supported" (`together_weight`).
- At least one assistant message, or there is nothing to learn
  (`together_no_assistant`; the together SDK's older client-side check
  refused such rows too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainers.data import ERROR, Finding

ROLES = ("system", "user", "assistant", "tool")
OTHER_FORMATS = (("text",), ("prompt", "completion"), ("input", "preferred_output"))


def check_example(row: object, *, line: int = 0) -> list[Finding]:
    """Findings for one parsed JSONL line in Together's conversational format."""
    if not isinstance(row, Mapping):
        return [_error(line, "together_not_messages", "the line is not a JSON object")]
    if "messages" not in row:
        return [_error(line, "together_not_messages", "no `messages` list")]
    findings: list[Finding] = []
    for keys in OTHER_FORMATS:
        if all(k in row for k in keys):
            findings.append(
                _error(
                    line,
                    "together_mixed_format",
                    f"`messages` and {' / '.join(f'`{k}`' for k in keys)} on one line: "
                    "two formats at once; keep only `messages`",
                )
            )
    return findings + check_messages(row["messages"], line=line)


def check_messages(messages: object, *, line: int = 0) -> list[Finding]:
    """Findings for a ``messages`` list by Together's rules (see the module docstring)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        return [_error(line, "together_not_messages", "`messages` must be a non-empty list")]
    findings: list[Finding] = []
    previous: str | None = None  # role of the message before, system aside
    calls_open = False  # the last assistant message asked for tools
    for number, message in enumerate(messages, 1):
        where = f"message {number}"
        if not isinstance(message, Mapping):
            findings.append(_error(line, "together_role", f"{where} is not an object"))
            return findings
        role = message.get("role")
        if role not in ROLES:
            findings.append(
                _error(
                    line,
                    "together_role",
                    f"{where} has role {role!r}; Together takes {', '.join(ROLES)}",
                )
            )
            return findings
        findings += _content(line, where, role, message)
        findings += _weight(line, where, message)
        if number == 1:
            if role not in ("system", "user"):
                findings.append(
                    _error(
                        line,
                        "together_first_role",
                        f"the conversation starts with {role}; it must start with system or user",
                    )
                )
        elif role == "system":
            findings.append(
                _error(
                    line,
                    "together_alternation",
                    f"{where} is a system message; only the first may be",
                )
            )
        elif role == "tool":
            if not (previous == "tool" or (previous == "assistant" and calls_open)):
                findings.append(
                    _error(
                        line,
                        "together_tool_order",
                        f"{where} is a tool result with no assistant tool_calls before it",
                    )
                )
        elif previous == "tool" and role != "assistant":
            findings.append(
                _error(
                    line,
                    "together_tool_order",
                    f"{where}: the assistant answers after tool results",
                )
            )
        elif previous is not None and previous == role:
            findings.append(
                _error(
                    line,
                    "together_alternation",
                    f"{where} is a second {role} message in a row; user and assistant alternate",
                )
            )
        elif previous is None and role == "assistant":
            findings.append(
                _error(
                    line,
                    "together_alternation",
                    f"{where}: a user message comes before the assistant",
                )
            )
        if role != "system":
            previous = role
        if role == "assistant":
            calls_open = bool(message.get("tool_calls"))
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        findings.append(
            _error(line, "together_no_assistant", "no assistant message: nothing to train on")
        )
    return findings


def _content(line: int, where: str, role: str, message: Mapping[str, Any]) -> list[Finding]:
    content = message.get("content")
    if isinstance(content, str):
        return []
    if role in ("user", "system") and _parts(content):
        return []
    if role == "assistant" and content is None and message.get("tool_calls"):
        return []
    wanted = "a string, or tool_calls" if role == "assistant" else "a string"
    if role in ("user", "system"):
        wanted = "a string or content parts"
    return [_error(line, "together_content", f"{where} ({role}) content must be {wanted}")]


def _parts(content: object) -> bool:
    return (
        isinstance(content, list)
        and bool(content)
        and all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in content)
    )


def _weight(line: int, where: str, message: Mapping[str, Any]) -> list[Finding]:
    if "weight" not in message:
        return []
    weight = message["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        return [_error(line, "together_weight", f"{where} has weight {weight!r}; only 0 or 1")]
    return []


def _error(line: int, code: str, message: str) -> Finding:
    return Finding(line, ERROR, code, message)
