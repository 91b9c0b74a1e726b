"""What a Slack file object, or Slack's answer about one, says tunebot should do.

Pure decisions, no network: the workflow asks, then calls Slack or waits.
Slack's file events are messier than the happy path (facts from Slack's
`file_shared`, `files.info` and Slack Connect documentation, read 2026-11):

- `file_shared` often arrives before `files.info` can describe the file
  (`file_not_found` for a few seconds) and before the file has a download
  link or a `shares` entry for the channel;
- Slack Connect sends a stub `{"id", "mode": "file_access", "file_access":
  "check_file_info"}` with no name: only `files.info` says what it is;
- deleted files come back as `file_deleted` or as a tombstone
  (`mode: "tombstone"`), files past a free workspace's limit as
  `mode: "hidden_by_limit"`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
# Files tunebot reports on and offers to convert (`/finetune convert`).
CONVERTIBLE_SUFFIXES = (".json", ".csv", ".tsv")
TRAINING_FILETYPES = frozenset({"jsonl", "json", "csv", "tsv"})
# Slack's filetypes that say nothing about the content: decided by the first bytes.
UNTYPED = frozenset({"", "text", "binary", "auto", "plain"})
SNIFF_BYTES = 4096
# Errors of `files.info` that pass: Slack has not caught up with the upload yet.
NOT_YET = frozenset({"file_not_found"})
# Errors that mean the file is gone or was never ours to see: nothing to say.
GONE = frozenset({"file_deleted", "file_is_tombstoned", "access_denied", "hidden_by_limit"})
GONE_MODES = frozenset({"tombstone", "hidden_by_limit"})


@dataclass(frozen=True)
class Verdict:
    """`ours`: True (training data), False (not ours: stay silent), None (read the
    first bytes to know). `why` is for the log line."""

    ours: bool | None
    why: str


def is_stub(file: dict[str, Any] | None) -> bool:
    """True when the event's file object cannot be trusted to describe the file: only
    `files.info` can (a Slack Connect stub, an id alone, no name or no link)."""
    if not file:
        return True
    return (
        file.get("mode") == "file_access"
        or bool(file.get("file_access"))
        or not file.get("name")
        or not (file.get("url_private_download") or file.get("url_private"))
    )


def is_gone(file: dict[str, Any]) -> bool:
    """A deleted file, a tombstone, or one hidden by the workspace's plan."""
    return (
        file.get("mode") in GONE_MODES
        or bool(file.get("is_tombstoned"))
        or file.get("file_access") in ("access_denied", "file_not_found_deleted")
    )


def training_data(file: dict[str, Any]) -> Verdict:
    """Whether a described file is one tunebot checks, from its name, its filetype and
    its mimetype; None for an unnamed or untyped file, decided by `sniff`."""
    name = (file.get("name") or "").lower()
    filetype = (file.get("filetype") or "").lower()
    mimetype = (file.get("mimetype") or "").lower()
    if name.endswith(JSONL_SUFFIXES + CONVERTIBLE_SUFFIXES) or filetype in TRAINING_FILETYPES:
        return Verdict(True, f"a {filetype or name.rsplit('.', 1)[-1]} file")
    if mimetype.startswith(("image/", "video/", "audio/")):
        return Verdict(False, f"a {mimetype} file")
    if not name or (filetype in UNTYPED and ("." not in name or name.endswith(".txt"))):
        return Verdict(None, "unnamed or untyped: its first bytes decide")
    return Verdict(False, f"a {filetype or 'named'} file ({name.rsplit('.', 1)[-1]})")


def sniff(head: bytes) -> bool:
    """True when a file's first bytes look like JSON or JSON Lines (an object or an
    array first, after a BOM and white space), in UTF-8 or UTF-16."""
    for bom, encoding in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if head.startswith(bom):
            text = head[len(bom) :].decode(encoding, errors="ignore")
            break
    else:
        text = head.decode("utf-8-sig", errors="ignore")
    return text.lstrip()[:1] in ("{", "[")


def share_thread(file: dict[str, Any], channel: str) -> str | None:
    """The thread to answer in: the ts (or thread) of the message that shared `file`
    in `channel`, from the file's `shares`; None while Slack has not listed it."""
    for kind in ("public", "private"):
        for share in (file.get("shares") or {}).get(kind, {}).get(channel, []):
            return share.get("thread_ts") or share.get("ts")
    return None
