"""trainers.convert and `tunebot convert`: public formats to chat JSONL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainers.convert import convert
from trainers.data import validate


def test_sharegpt_jsonl_with_a_bad_row(tmp_path):
    rows = [
        {
            "system": "Be brief.",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello there, friend!"},
            ],
        },
        {"conversations": [{"from": "human", "value": "Only a question"}]},
        {"conversations": [{"from": "narrator", "value": "?"}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    result = convert(path, "sharegpt")
    assert result.examples == [
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there, friend!"},
        ]}
    ]  # fmt: skip
    assert [w for w, _ in result.problems] == ["line 2", "line 3", "line 4"]
    assert "no assistant" in result.problems[0][1] and "'narrator'" in result.problems[1][1]


def test_alpaca_array(tmp_path):
    items = [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "", "output": "orphan"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items))
    result = convert(path, "alpaca")
    assert result.examples[0]["messages"][0] == {
        "role": "user",
        "content": "Translate to French\n\ncat",
    }
    assert result.examples[1]["messages"][0]["content"] == "Say hi"
    assert result.problems == [("item 3 (line 1)", "instruction is missing or empty")]


def test_csv_with_quotes_commas_and_a_bad_row(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(
        'question,answer,system\n"Hi, you?","Fine, thanks.",Be kind\nq2,,\nq3,a3,s,extra\n'
    )
    result = convert(path, "csv")
    assert result.examples == [
        {"messages": [
            {"role": "system", "content": "Be kind"},
            {"role": "user", "content": "Hi, you?"},
            {"role": "assistant", "content": "Fine, thanks."},
        ]}
    ]  # fmt: skip
    assert result.problems == [
        ("line 3", "answer is missing or empty"),
        ("line 4", "more fields than the header has"),
    ]


def test_csv_without_known_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n1,2\n")
    result = convert(path, "csv")
    assert result.examples == [] and "prompt and a completion column" in result.problems[0][1]


def test_output_validates_and_cli_reports_rows(tmp_path):
    items = [
        {"instruction": f"Question {i}?", "output": f"Answer number {i}, in full."}
        for i in range(12)
    ]
    items.append({"instruction": "no output"})
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items))
    out = subprocess.run(
        [sys.executable, "-m", "bot.cli", "convert", str(path), "--from", "alpaca"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1  # a row was not converted
    assert "a.json item 13 (line 1): output is missing or empty" in out.stderr
    assert "12 examples written" in out.stdout and "12 valid — 0 errors" in out.stdout
    report = validate(tmp_path / "a.chat.jsonl")
    assert report.valid_examples == 12


def test_unknown_format_is_a_value_error(tmp_path):
    path = tmp_path / "x"
    path.write_text("")
    with pytest.raises(ValueError, match="unknown format"):
        convert(path, "parquet")


def _cli_convert(path, fmt):
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "convert", str(path), "--from", fmt],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_csv_field_over_128_kib_names_its_row(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("prompt,completion\nHi,Hello there!\nq," + "x" * 200 * 1024 + "\nq3,a3\n")
    result = convert(path, "csv")
    assert len(result.examples) == 1
    ((where, what),) = result.problems
    assert where == "line 3 (row 2)" and "over 128 KiB" in what
    import csv

    assert csv.field_size_limit() == 128 * 1024  # the process-wide limit is put back
    out = _cli_convert(path, "csv")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "long.csv line 3 (row 2): a field is over 128 KiB (131,072 characters); shorten or "
        "split it; this row and the rest of the file were not read"
    ]


@pytest.mark.parametrize("as_array", [False, True])
def test_json_nested_10000_deep_names_its_line(tmp_path, as_array):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo!"}]}
    deep = '{"a":' * 10_000 + "1" + "}" * 10_000
    if as_array:
        text = "[\n" + json.dumps(good) + ",\n" + deep + "\n]\n"
    else:
        text = json.dumps(good) + "\n" + deep + "\n"
    path = tmp_path / "deep.json"
    path.write_text(text)
    result = convert(path, "sharegpt")
    where = "item 2 (line 3)" if as_array else "line 2"
    assert [w for w, _ in result.problems] == [where]
    assert "nested too deep" in result.problems[0][1]
    assert len(result.examples) == 1  # the rows around it are still read
    out = _cli_convert(path, "sharegpt")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"deep.json {where}: JSON nested too deep")
