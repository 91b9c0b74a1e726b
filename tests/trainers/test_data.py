"""trainers.data: every finding code, with its line, on real files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainers.data import (
    CODES,
    ERROR,
    MAX_FINDINGS_PER_CODE,
    WARNING,
    Finding,
    Report,
    TokenStats,
    validate,
    validate_bytes,
)

SYSTEM = {"role": "system", "content": "You are a concise support assistant."}


def ex(*messages, **top) -> dict:
    return {"messages": list(messages), **top}


def user(text="How do I reset my account?") -> dict:
    return {"role": "user", "content": text}


def assistant(text="Open Settings, then choose Reset account.", **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


GOOD = ex(SYSTEM, user(), assistant())
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def jsonl(*rows) -> bytes:
    """Rows are dicts (dumped) or raw bytes/str lines."""
    out = []
    for row in rows:
        if isinstance(row, bytes):
            out.append(row)
        elif isinstance(row, str):
            out.append(row.encode())
        else:
            out.append(json.dumps(row).encode())
    return b"\n".join(out) + b"\n"


def padded(*rows) -> bytes:
    """The rows, then enough distinct good examples that too_few_examples stays quiet."""
    fillers = [ex(SYSTEM, user(f"Question number {i}?"), assistant()) for i in range(10)]
    return jsonl(*rows, *fillers)


def findings(data: bytes, **kwargs) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in validate_bytes(data, **kwargs).findings]


# (case id, first line, expected code) — the bad line is always line 1 here.
LINE_CASES = [
    ("invalid_json", b'{"messages": [', "invalid_json"),
    ("invalid_utf8", b'{"messages": "\xff\xfe"}', "invalid_utf8"),
    ("not_an_object", b"[1, 2, 3]", "not_an_object"),
    ("missing_messages", {"conversation": []}, "missing_messages"),
    ("messages_not_list", {"messages": {"role": "user"}}, "messages_not_list"),
    ("empty_messages", {"messages": []}, "empty_messages"),
    ("message_not_object", ex(SYSTEM, "hello", assistant()), "message_not_object"),
    ("missing_role", ex(SYSTEM, {"content": "hi"}, assistant()), "missing_role"),
    ("invalid_role", ex(SYSTEM, {"role": "bot", "content": "hi"}, assistant()), "invalid_role"),
    (
        "unknown_message_key",
        ex(SYSTEM, {"role": "user", "content": "hi", "text": "x"}, assistant()),
        "unknown_message_key",
    ),
    ("missing_content", ex(SYSTEM, {"role": "user"}, assistant()), "missing_content"),
    ("null_content", ex(SYSTEM, {"role": "user", "content": None}, assistant()), "missing_content"),
    (
        "invalid_content_type",
        ex(SYSTEM, {"role": "user", "content": 42}, assistant()),
        "invalid_content",
    ),
    (
        "invalid_content_part",
        ex(SYSTEM, {"role": "user", "content": [{"type": "input_audio"}]}, assistant()),
        "invalid_content",
    ),
    (
        "tool_content_parts",
        ex(
            SYSTEM,
            user(),
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
            assistant(),
        ),
        "invalid_content",
    ),
    (
        "image_part_without_url",
        ex(SYSTEM, {"role": "user", "content": [{"type": "image_url"}]}, assistant()),
        "invalid_image",
    ),
    (
        "invalid_preference",
        {"input": {"messages": [SYSTEM, user()]}, "preferred_output": [assistant()]},
        "invalid_preference",
    ),
    (
        "identical_outputs",
        {
            "input": {"messages": [SYSTEM, user()]},
            "preferred_output": [assistant()],
            "non_preferred_output": [assistant()],
        },
        "identical_outputs",
    ),
    (
        "invalid_name",
        ex(SYSTEM, {"role": "user", "content": "hi", "name": 3}, assistant()),
        "invalid_name",
    ),
    ("no_assistant", ex(SYSTEM, user()), "no_assistant"),
    ("all_weight_zero", ex(SYSTEM, user(), assistant(weight=0)), "no_assistant"),
    ("weight_two", ex(SYSTEM, user(), assistant(weight=2)), "invalid_weight"),
    ("weight_bool", ex(SYSTEM, user(), assistant(weight=True)), "invalid_weight"),
    ("weight_on_user", ex(SYSTEM, {**user(), "weight": 1}, assistant()), "invalid_weight"),
    (
        "tool_call_no_id",
        ex(
            SYSTEM,
            user(),
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            assistant(),
        ),
        "invalid_tool_call",
    ),
    (
        "tool_call_args_not_string",
        ex(
            SYSTEM,
            user(),
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
                ],
            },
            assistant(),
        ),
        "invalid_tool_call",
    ),
    (
        "tool_without_call_id",
        ex(SYSTEM, user(), {"role": "tool", "content": "42"}, assistant()),
        "invalid_tool_call",
    ),
    (
        "tool_calls_on_user",
        ex(SYSTEM, {**user(), "tool_calls": []}, assistant()),
        "invalid_tool_call",
    ),
    (
        "tools_not_list",
        ex(SYSTEM, user(), assistant(), tools={"type": "function"}),
        "invalid_tools",
    ),
    (
        "parallel_not_bool",
        ex(SYSTEM, user(), assistant(), parallel_tool_calls="yes"),
        "invalid_tools",
    ),
    ("missing_system", ex(user(), assistant()), "missing_system"),
    ("missing_user", ex(SYSTEM, assistant()), "missing_user"),
    ("short_assistant", ex(SYSTEM, user(), assistant("Yes.")), "short_assistant"),
    ("long_assistant", ex(SYSTEM, user(), assistant("word " * 500)), "long_assistant"),
    (
        "last_not_assistant",
        ex(SYSTEM, user(), assistant(), user("and then?")),
        "last_not_assistant",
    ),
    ("unknown_top_key", {**GOOD, "metadata": {"id": 1}}, "unknown_key"),
    (
        "secret_openai",
        ex(SYSTEM, user("my key is sk-proj-" + "a1B2" * 8), assistant()),
        "possible_secret",
    ),
    ("secret_aws", ex(SYSTEM, user("AKIAIOSFODNN7EXAMPLE is set"), assistant()), "possible_secret"),
    (
        "secret_private_key",
        ex(SYSTEM, user("-----BEGIN RSA PRIVATE KEY-----\nMIIE"), assistant()),
        "possible_secret",
    ),
    (
        "secret_password",
        ex(SYSTEM, user("the password: hunter22!"), assistant()),
        "possible_secret",
    ),
    (
        "secret_slack",
        ex(SYSTEM, user("token xoxb-1234567890-abcdefghij"), assistant()),
        "possible_secret",
    ),
    ("secret_github", ex(SYSTEM, user("ghp_" + "x" * 36), assistant()), "possible_secret"),
]


@pytest.mark.parametrize(
    ("row", "code"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES]
)
def test_each_code_is_reported_on_its_line(row, code):
    got = findings(padded(row))
    assert (1, code) in got, got
    # The bad line is the only one with findings: nothing leaks onto good lines.
    assert {line for line, _ in got} <= {0, 1}, got


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_is_covered_by_a_test(code):
    covered = {c[2] for c in LINE_CASES} | {
        "too_few_examples",
        "file_too_large",
        "not_jsonl",
        "blank_line",
        "duplicate_example",
        "inconsistent_system",
        "over_token_limit",
        "line_too_long",
        "empty_file",
        # whole-file shapes and kinds: tests/trainers/test_kinds.py
        "json_array",
        "multiline_json",
        "wrong_encoding",
        "mixed_kinds",
        "untrainable_kind",
    }
    assert code in covered


def test_severities_follow_the_contract():
    errors = {c for c, (sev, _) in CODES.items() if sev == ERROR}
    warnings = {c for c, (sev, _) in CODES.items() if sev == WARNING}
    assert {"invalid_json", "no_assistant", "file_too_large", "not_jsonl"} <= errors
    assert {"duplicate_example", "possible_secret", "over_token_limit"} <= warnings


def test_a_clean_file_has_no_findings():
    report = validate_bytes(padded(GOOD))
    assert report.findings == []
    assert report.examples == report.valid_examples == 11


def test_line_numbers_count_every_physical_line():
    data = jsonl(GOOD, "", "   ", b"{broken", GOOD)
    report = validate_bytes(data + padded())
    got = [(f.line, f.code) for f in report.findings]
    assert (2, "blank_line") in got and (3, "blank_line") in got
    assert (4, "invalid_json") in got
    assert report.examples == 13  # blank lines are not examples


def test_bom_and_crlf_are_accepted():
    rows = [json.dumps(ex(SYSTEM, user(f"q{i}?"), assistant())) for i in range(12)]
    data = b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n"
    report = validate_bytes(data)
    assert report.findings == []
    assert report.valid_examples == 12


def test_duplicates_name_the_first_occurrence():
    data = padded(GOOD, user(), GOOD, GOOD)  # lines 1, 3, 4 equal
    report = validate_bytes(data)
    dups = [f for f in report.findings if f.code == "duplicate_example"]
    assert [(f.line, f.duplicate_of) for f in dups] == [(3, 1), (4, 1)]
    assert report.findings[0].to_dict().keys() >= {"line", "severity", "code", "message"}
    assert dups[0].to_dict()["duplicate_of"] == 1


def test_inconsistent_system_flags_the_minority():
    odd = ex({"role": "system", "content": "You are a pirate."}, user("Ahoy?"), assistant())
    report = validate_bytes(padded(odd))
    assert [(f.line, f.code) for f in report.findings] == [(1, "inconsistent_system")]


def test_per_example_system_prompts_are_not_flagged():
    rows = [
        ex({"role": "system", "content": f"Persona {i}"}, user(), assistant()) for i in range(12)
    ]
    assert "inconsistent_system" not in validate_bytes(jsonl(*rows)).codes()


def test_over_token_limit_uses_the_models_context():
    long = ex(SYSTEM, user("word " * 300), assistant())
    assert (1, "over_token_limit") in findings(padded(long), context_tokens=100)
    assert (1, "over_token_limit") not in findings(padded(long))


def test_too_few_examples_is_a_file_level_error():
    report = validate_bytes(jsonl(GOOD, {"messages": []}))
    assert (0, "too_few_examples") in [(f.line, f.code) for f in report.findings]
    assert report.has_errors


def test_file_too_large_still_scans_everything(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(padded(b"{oops"))
    report = validate(path, max_file_bytes=100)
    codes = [(f.line, f.code) for f in report.findings]
    assert (0, "file_too_large") in codes
    assert (1, "invalid_json") in codes  # the scan went on
    assert report.valid_examples == 10


def test_binary_file_is_not_jsonl(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 40)
    report = validate(path)
    assert (0, "not_jsonl") in [(f.line, f.code) for f in report.findings]
    assert report.has_errors


def test_csv_is_not_jsonl():
    report = validate_bytes(b"prompt,completion\nhi,hello\nbye,ciao\n")
    assert {(0, "not_jsonl"), (1, "invalid_json")} <= {(f.line, f.code) for f in report.findings}


def test_overlong_line_is_skipped_without_holding_it(monkeypatch):
    import trainers.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 300)
    row = ex(SYSTEM, user("x" * 1000), assistant())
    got = findings(padded(row))
    assert (1, "line_too_long") in got
    assert not [c for line, c in got if line > 1]  # later lines still parse


def test_valid_tool_use_example_counts_approximately():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    row = ex(
        SYSTEM,
        user("Where is order 42?"),
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"id": 42}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
        assistant("Order 42 has shipped and arrives Tuesday."),
        tools=tools,
        parallel_tool_calls=False,
    )
    report = validate_bytes(padded(row))
    assert report.findings == []
    assert report.tokens.exact is False


def test_text_parts_and_names_and_weights_are_valid():
    row = ex(
        SYSTEM,
        {
            "role": "user",
            "name": "alice",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        },
        assistant("An answer we do not want learned.", weight=0),
        user("Again?"),
        assistant("A better answer to learn from.", weight=1),
    )
    report = validate_bytes(padded(row))
    assert report.findings == []
    assert report.tokens.exact is True


def test_secret_is_never_echoed():
    key = "sk-proj-" + "Zx9" * 10
    report = validate_bytes(padded(ex(SYSTEM, user(f"use {key}"), assistant())))
    secret = [f for f in report.findings if f.code == "possible_secret"]
    assert secret and key not in secret[0].message and "Zx9" not in secret[0].message
    assert "OpenAI API key" in secret[0].message


def test_talking_about_passwords_is_not_a_secret():
    row = ex(
        SYSTEM,
        user("How do I reset my password?"),
        assistant("Click 'Forgot password' on the login page."),
    )
    assert "possible_secret" not in validate_bytes(padded(row)).codes()


def test_token_stats_are_nearest_rank():
    rows = [ex(user("x " * i), assistant()) for i in range(1, 21)]
    t = validate_bytes(jsonl(*rows)).tokens
    counts = sorted(validate_bytes(jsonl(*rows)).token_counts)
    assert t.total == sum(counts) and t.min == counts[0] and t.max == counts[-1]
    assert t.p50 == counts[9] and t.p95 == counts[18]  # ceil(0.5*20)=10th, ceil(0.95*20)=19th


def test_parallel_scan_equals_single_process(tmp_path, monkeypatch):
    import trainers.data as data

    monkeypatch.setattr(data, "PARALLEL_MIN_BYTES", 0)
    rows = [ex(SYSTEM, user(f"q{i % 50}?"), assistant()) for i in range(400)]
    rows[123] = {"messages": []}
    rows[300] = ex({"role": "system", "content": "other"}, user(), assistant())
    path = tmp_path / "f.jsonl"
    path.write_bytes(jsonl(*rows))
    one = validate(path, workers=1)
    # Subprocess: fork is only used from a single-threaded process.
    code = (
        "import sys, json; import trainers.data as d; d.PARALLEL_MIN_BYTES = 0; "
        f"r = d.validate({str(path)!r}, workers=2); "
        "print(json.dumps([r.to_dict(), list(r.token_counts)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    two, counts = json.loads(out.stdout)
    assert two == {**one.to_dict(), "file": str(path)}
    assert counts == list(one.token_counts)


def test_file_object_and_path_agree(tmp_path):
    data = padded(GOOD, b"{bad")
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    a, b = validate(path).to_dict(), validate(io.BytesIO(data)).to_dict()
    assert a["findings"] == b["findings"] and a["tokens"] == b["tokens"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_always_give_a_report(data):
    report = validate_bytes(data)
    assert report.examples >= 0
    assert all(f.line >= 0 and f.code in CODES for f in report.findings)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(["role", "content", "name", "weight", "tool_calls", "messages", "tools"]),
        max_size=3,
    ),
    json_values,
    st.integers(min_value=0, max_value=20),
)
def test_mutated_valid_files_always_give_a_report(keys, value, cut):
    row = json.loads(json.dumps(ex(SYSTEM, user(), assistant())))
    target = row["messages"][cut % 3]
    for key in keys:
        target[key] = value
    if cut % 4 == 0:
        row[keys[0] if keys else "messages"] = value
    text = json.dumps(row)
    data = padded(row) + text[: len(text) - cut].encode()  # and a truncated copy
    report = validate_bytes(data)
    assert all(f.code in CODES for f in report.findings)
    assert report.valid_examples <= report.examples


# --- memory is bounded: findings past the first 1,000 of a code are counted ------------


def test_a_megabyte_of_blank_lines_is_counted_not_stored():
    blank = 1_000_000
    report = validate_bytes(padded(GOOD) + b"\n" * blank)
    assert report.counts["blank_line"] == blank
    stored = [f for f in report.findings if f.code == "blank_line"]
    assert len(stored) == MAX_FINDINGS_PER_CODE
    assert [f.line for f in stored] == list(range(12, 12 + MAX_FINDINGS_PER_CODE))
    assert report.warning_count == blank and report.error_count == 0 and not report.has_errors
    assert report.examples == report.valid_examples == 11  # blank lines are not examples
    assert len(report.token_counts) == 11
    assert report.summary() == [
        "blank_line ×1,000,000 — lines 12, 13, 14, 15, 16 and 999,995 more: "
        "blank line; remove it (it is skipped)"
    ]
    # What the worker sends back to the bot, and what --json prints, stays small.
    import pickle

    assert len(pickle.dumps(report)) < 200_000
    assert len(json.dumps(report.to_dict())) < 200_000
    assert report.to_dict()["counts"] == {"blank_line": blank}


def test_blank_lines_between_examples_keep_their_line_numbers():
    data = jsonl(GOOD, "", "  ", "\t", GOOD) + b"\r\n\n \n" + padded(b"{x")
    report = validate_bytes(data)
    lines = [f.line for f in report.findings if f.code == "blank_line"]
    assert lines == [2, 3, 4, 6, 7, 8]
    assert [f.line for f in report.findings if f.code == "invalid_json"] == [9]


def test_errors_are_capped_in_file_order_across_processes(tmp_path):
    bad = 5_000
    path = tmp_path / "bad.jsonl"
    # Over PARALLEL_MIN_BYTES: two processes scan halves; the first 1,000 are the file's.
    filler = b"\n" * (5 * 2**20)
    path.write_bytes(padded(GOOD) + b"{nope\n" * bad + filler + b"[1]\n" * 3)
    code = (
        "import json, sys, trainers.data as d; "
        f"r = d.validate({str(path)!r}, workers=2); "
        "print(json.dumps([r.to_dict(), r.error_count, r.warning_count]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report, errors, warnings = json.loads(out.stdout)
    assert report["counts"] == {"invalid_json": bad, "not_an_object": 3, "blank_line": 5 * 2**20}
    assert errors == bad + 3 and warnings == 5 * 2**20
    invalid = [f["line"] for f in report["findings"] if f["code"] == "invalid_json"]
    assert invalid == list(range(12, 12 + MAX_FINDINGS_PER_CODE))
    assert len(report["findings"]) == 2 * MAX_FINDINGS_PER_CODE + 3


def test_duplicates_are_capped_in_file_order():
    report = validate_bytes(jsonl(*[GOOD] * 3_000))
    dups = [f for f in report.findings if f.code == "duplicate_example"]
    assert report.counts["duplicate_example"] == 2_999
    assert [f.line for f in dups] == list(range(2, 2 + MAX_FINDINGS_PER_CODE))
    assert {f.duplicate_of for f in dups} == {1}


def test_a_report_with_capped_findings_counts_from_counts():
    findings = [Finding(i, ERROR, "invalid_json", "x") for i in range(1, 4)]
    report = Report("f", 0, 9, 0, findings, TokenStats(), array("q"), counts={"invalid_json": 9})
    assert report.error_count == 9 and report.has_errors and report.truncated
    assert report.counts_by_code() == {"invalid_json": 9}
    plain = Report("f", 0, 3, 0, findings, TokenStats(), array("q"))
    assert plain.counts == {"invalid_json": 3} and not plain.truncated


# --- empty files (/work/shared/cases/19-empty-file.jsonl is the 0-byte case) ---------------


@pytest.mark.parametrize("data", [b"", b"\n", b" \r\n\t\n\n", b"\xef\xbb\xbf", b"\n" * 100_000])
def test_an_empty_or_whitespace_file_is_one_empty_file_error(data, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(data)
    for report in (validate(path), validate(path, workers=2), validate_bytes(data)):
        assert [(f.line, f.code, f.severity) for f in report.findings] == [(0, "empty_file", ERROR)]
        assert report.counts == {"empty_file": 1} and report.examples == 0
        assert len(report.token_counts) == 0


@pytest.mark.parametrize("data", [b"", b"\n"])
def test_fewer_lines_than_workers_is_not_an_error(data, tmp_path, monkeypatch):
    import trainers.data as d

    monkeypatch.setattr(d, "PARALLEL_MIN_BYTES", 0)  # was: "max_workers must be greater than 0"
    path = tmp_path / "tiny.jsonl"
    path.write_bytes(data)
    assert [f.code for f in validate(path, workers=4).findings] == ["empty_file"]
