"""trainers.tokens: exact OpenAI counts offline, two backends that agree."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.tokens import TokenCounter, chat_tokens, tiktoken_encoding

quicktok = pytest.importorskip("quicktok", reason="quicktok-v1 not installed: tiktoken-only path")


def test_known_count_in_o200k():
    assert len(tiktoken_encoding("o200k_base").encode("Hello, world! Fine-tuning is fun.")) == 10
    assert TokenCounter(backend="quicktok").count("Hello, world! Fine-tuning is fun.") == 10
    assert TokenCounter(backend="tiktoken").count("Hello, world! Fine-tuning is fun.") == 10


def test_cl100k_loads_offline_too():
    assert TokenCounter("cl100k_base", backend="tiktoken").count("Hello, world!") == 4


def test_unknown_encoding_is_a_value_error():
    with pytest.raises(ValueError, match="unknown encoding"):
        tiktoken_encoding("p99k_base")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_quicktok_equals_tiktoken(text):
    ref = len(tiktoken_encoding("o200k_base").encode_ordinary(text))
    assert TokenCounter(backend="quicktok").count(text) == ref
    assert TokenCounter(backend="tiktoken").count(text) == ref


@pytest.mark.parametrize(
    "text",
    ["<|endoftext|> special tokens count as text", "日本語のテキスト", "  \n\t ", "a" * 5000],
)
def test_backends_agree_on_awkward_text(text):
    assert TokenCounter(backend="quicktok").count(text) == TokenCounter(backend="tiktoken").count(
        text
    )


def test_chat_formula_matches_the_cookbook():
    enc = tiktoken_encoding("o200k_base")
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "name": "bob", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    expected = 3  # reply priming
    for m in example["messages"]:
        expected += 3 + sum(len(enc.encode(v)) for v in m.values()) + (1 if "name" in m else 0)
    for backend in ("quicktok", "tiktoken"):
        assert chat_tokens(example, TokenCounter(backend=backend)) == (expected, True)


def test_tools_make_the_count_approximate_never_zero():
    example = {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    count, exact = chat_tokens(example, TokenCounter())
    assert exact is False and count > 3 + 2 * 3 + 2


def test_memo_stays_bounded():
    counter = TokenCounter()
    counter.MEMO_LIMIT_CHARS = 100
    counts = counter.count_many([f"string {i:03d}" for i in range(100)])
    assert counts == [counter.count("string 000")] * 100
    assert sum(map(len, counter._memo)) <= 100 + len("string 000")


def test_importing_the_validator_does_not_import_torch():
    code = "import sys, trainers.data, trainers.pricing, bot.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
