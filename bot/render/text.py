"""What every surface shares: `Message`, escaping, errors, notes, the help text,
and the small pieces of wording (money, plurals, durations) the others build on.

The bottom of bot.render: it imports no other view module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SECTION_LIMIT = 2_900  # Slack caps a section's text at 3,000 characters


@dataclass(frozen=True)
class Message:
    text: str
    blocks: list[dict] = field(default_factory=list)
    in_channel: bool = False  # as a command's answer: for everyone, not just the caller

    def to_kwargs(self) -> dict:
        return {"text": self.text, "blocks": self.blocks}


_BARE_AMPERSAND = re.compile(r"&(?!(?:amp|lt|gt);)")
# The bot's own mentions, built from Slack ids: the only `<…>` a composed message keeps.
_OWN_MENTION = re.compile(r"<[@#][A-Z0-9]+>")
# An absolute (or ~/) path of two parts or more; a URL's slashes never start one.
_SERVER_PATH = re.compile(r"(?<![\w:/.~\\-])~?(?:/[\w.+@-]+)+/([\w.+@-]+)")
_FILE_URI = re.compile(r"\bfile://(?=/)")  # file:///srv/x: its path is a server path
# s3://bucket/prefix/x (a Ray run's folder on a store): the bucket and prefix are the server's.
_STORE_URI = re.compile(r"\bs3://(?:[\w.+@-]+/)+([\w.+@-]+)")
_TRACEBACK = "Traceback (most recent call last)"


def escape(text: object) -> str:
    """Text from a person or a file, made inert for mrkdwn: `&`, `<`, `>` as entities.

    Every file name, reason, prompt, answer, model name or option a user typed
    goes through this where it enters a message, in `text` and blocks alike, so
    `<!channel>` in a file name pings nobody. Idempotent: an `&amp;`, `&lt;` or
    `&gt;` already there is left as it is, so nothing is escaped twice.
    """
    text = str(text)
    return _BARE_AMPERSAND.sub("&amp;", text).replace("<", "&lt;").replace(">", "&gt;")


def _inert(text: str) -> str:
    """A message composed elsewhere: escaped, except the bot's own `<@U…>`/`<#C…>` mentions."""
    parts, last = [], 0
    for mention in _OWN_MENTION.finditer(text):
        parts += [escape(text[last : mention.start()]), mention.group()]
        last = mention.end()
    return "".join(parts) + escape(text[last:])


def short_paths(text: str) -> str:
    """Server paths cut to their last part: `/srv/tunebot/runs/r1/spec.json` -> `spec.json`;
    a ``file:///`` or ``s3://bucket/…`` URI (a Ray run's folder) too."""
    return _SERVER_PATH.sub(r"\1", _FILE_URI.sub("", _STORE_URI.sub(r"\1", text)))


def failure_line(error: str | None, log: str | None = None) -> str:
    """An error as a person should see it: one line, its class and message, no server paths.

    A traceback (in `error`, or in the `log` when there is no error) gives its
    last line, the exception itself.
    """
    text = (error or "").strip()
    if _TRACEBACK in text or (not text and log and _TRACEBACK in log):
        source = text or log or ""
        head = text.split(_TRACEBACK, 1)[0].strip() if text else ""
        tail = source.rsplit(_TRACEBACK, 1)[1].splitlines()
        last = next((s.strip() for s in reversed(tail) if s.strip() and not s[:1].isspace()), "")
        text = f"{head} {last}".strip()
    lines = text.splitlines()
    return short_paths(lines[0].strip() if lines else "") or "no error message"


def _no_internals(text: str) -> str:
    """No traceback and no server path: a traceback shrinks to its last line."""
    if _TRACEBACK in text:
        head = text.split(_TRACEBACK, 1)[0].strip()
        return f"{head} {failure_line(text[len(head) :])}".strip()
    return short_paths(text)


def section(markdown: str) -> dict:
    """A mrkdwn section block, cut to what Slack accepts."""
    if len(markdown) > SECTION_LIMIT:
        markdown = markdown[: SECTION_LIMIT - 1] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": markdown}}


def context(markdown: str) -> dict:
    """A context block (small grey text) of one mrkdwn element."""
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": markdown[:SECTION_LIMIT]}]}


def money(usd: float) -> str:
    """Dollars with cents, or four decimals under a dollar so small runs aren't $0.00."""
    return f"${usd:,.2f}" if usd >= 1 or usd == 0 else f"${usd:.4f}"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def duration(hours: float) -> str:
    if hours < 1 / 60:
        return "under 1 min"
    if hours < 1:
        return f"~{round(hours * 60)} min"
    return f"~{hours:.1f} h"


def clip(text: str, limit: int = 180) -> str:
    """One line of at most `limit` characters, whitespace collapsed."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error(summary: str, detail: str | None = None) -> Message:
    """The one way an error reaches a person: what went wrong, and what to do.

    Never a traceback or a server path; user text in it is escaped (the bot's
    own mentions stay).
    """
    summary = _inert(_no_internals(summary))
    detail = _inert(_no_internals(detail)) if detail else None
    text = f"⚠️ {summary}" + (f"\n{detail}" if detail else "")
    return Message(text, [section(text)])


def note(text: str, *, in_channel: bool = False) -> Message:
    """A message composed by the caller: escaped here, keeping the bot's own mentions."""
    text = _inert(text)
    return Message(text, [section(text)], in_channel=in_channel)


def help_text(unknown: str | None = None) -> Message:
    from bot.commands import help_lines

    lines = help_lines()
    head = f"I don't know `{escape(unknown)}`. " if unknown else ""
    text = (
        f"{head}Drop a .jsonl chat training file in this channel and I'll check it and price it "
        "in its thread. Commands:\n" + "\n".join(f"• {line}" for line in lines)
    )
    return Message(text, [section(text)])
