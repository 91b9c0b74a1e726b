"""`tunebot convert` on the real-world cases (tests/cases, from /work/shared/cases/README.md).

Each case goes through the CLI (a subprocess: exit code, and the output
validates with `tunebot validate`) and through the Python API (what the
examples hold). Property tests: no input makes the converter raise, and every
row is either converted or reported.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import CASES, training_file
from tests.fakes.signing import file_share_message_event
from trainers.convert import FORMATS, convert, convert_bytes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, timeout=120
    )


def _convert_and_validate(tmp_path: Path, case: str, fmt: str, rows: int) -> Path:
    """Convert through the CLI, then check the output with `tunebot validate`."""
    out = tmp_path / "out.jsonl"
    done = _cli("convert", str(CASES / case), "--from", fmt, "--out", str(out))
    assert "Traceback" not in done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{rows} examples written" in done.stdout and "0 rows not converted" in done.stdout
    assert "✅" in done.stdout  # nothing dropped, nothing invalid
    checked = _cli("validate", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{rows} valid — 0 errors" in checked.stdout
    return out


def _messages(example: dict) -> list[tuple[str, object]]:
    return [(m["role"], m.get("content")) for m in example["messages"]]


# --- 12: ShareGPT with function_call / observation turns and a tools column --------


def test_case_12_sharegpt_function_calls_cli(tmp_path):
    out = _convert_and_validate(
        tmp_path, "12-sharegpt-function-call-observation.json", "sharegpt", 12
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum("tools" in r for r in rows) == 2


def test_case_12_sharegpt_function_calls_api():
    source = json.loads((CASES / "12-sharegpt-function-call-observation.json").read_text())
    result = convert(CASES / "12-sharegpt-function-call-observation.json", "sharegpt")
    assert result.problems == [] and result.ignored == {} and len(result.examples) == 12
    for row, example in zip(source, result.examples, strict=True):
        messages = example["messages"]
        assert messages[0] == {"role": "system", "content": row["system"]}
        assert len(messages) == len(row["conversations"]) + 1  # every turn kept
        if "tools" not in row:
            assert "tools" not in example
            continue
        assert example["tools"] == [
            {"type": "function", "function": tool} for tool in json.loads(row["tools"])
        ]
        calls = [m for m in messages if m.get("tool_calls")]
        answers = [m for m in messages if m["role"] == "tool"]
        assert calls and len(answers) == sum(len(m["tool_calls"]) for m in calls)
        ids = [c["id"] for m in calls for c in m["tool_calls"]]
        assert ids == [f"call_{i}" for i in range(1, len(ids) + 1)]  # deterministic
        assert [m["tool_call_id"] for m in answers] == ids
        for turn, message in zip(row["conversations"], messages[1:], strict=True):
            if turn["from"] == "function_call":
                (call,) = message["tool_calls"]
                expected = json.loads(turn["value"])
                assert message["role"] == "assistant" and "content" not in message
                assert call["type"] == "function"
                assert call["function"]["name"] == expected["name"]
                assert json.loads(call["function"]["arguments"]) == expected["arguments"]
            elif turn["from"] == "observation":
                assert message["role"] == "tool" and message["content"] == turn["value"]
            else:
                assert message["content"] == turn["value"]


# --- 13: Alpaca with history -------------------------------------------------------


def test_case_13_alpaca_history_cli(tmp_path):
    _convert_and_validate(tmp_path, "13-alpaca-history.jsonl", "alpaca", 10)


def test_case_13_alpaca_history_api():
    lines = (CASES / "13-alpaca-history.jsonl").read_text().splitlines()
    result = convert(CASES / "13-alpaca-history.jsonl", "alpaca")
    assert result.problems == [] and result.ignored == {} and len(result.examples) == 10
    for line, example in zip(lines, result.examples, strict=True):
        row = json.loads(line)
        expected = [("system", row["system"])]
        for user, assistant in row["history"]:
            expected += [("user", user), ("assistant", assistant)]
        expected += [("user", row["instruction"]), ("assistant", row["output"])]
        assert _messages(example) == expected


# --- 15: ShareGPT with images ------------------------------------------------------


def test_case_15_sharegpt_local_images_cli_lists_every_row(tmp_path):
    out = tmp_path / "out.jsonl"
    done = _cli(
        "convert", str(CASES / "15-sharegpt-images.json"), "--from", "sharegpt", "--out", str(out)
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr and "✅" not in done.stdout
    problems = [line for line in done.stderr.splitlines() if "is a local path" in line]
    assert len(problems) == 10
    assert problems[0] == (
        "15-sharegpt-images.json item 1 (line 2): image 'photos/plant_0.jpg' is a local path; "
        "OpenAI needs a URL or a base64 data URL"
    )
    assert "nothing converted" in done.stderr and not out.exists()


def test_case_15_sharegpt_images_api():
    result = convert(CASES / "15-sharegpt-images.json", "sharegpt")
    assert result.examples == [] and len(result.problems) == 10
    assert all("is a local path" in what for _, what in result.problems)
    # The same rows with URLs: image parts where <image> stood, in the user turn.
    rows = json.loads((CASES / "15-sharegpt-images.json").read_text())
    for i, row in enumerate(rows):
        row["images"] = [f"https://example.com/{Path(p).name}" for p in row["images"]]
        if i == 1:
            row["images"] = ["data:image/png;base64,iVBORw0KGgo="]
    result = convert_bytes(json.dumps(rows).encode(), "sharegpt")
    assert result.problems == [] and len(result.examples) == 10
    user, assistant = result.examples[0]["messages"]
    assert user == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/plant_0.jpg"}},
            {"type": "text", "text": "What is wrong with this plant?"},
        ],
    }
    assert assistant["content"] == rows[0]["conversations"][1]["value"]
    assert result.examples[1]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:")
    assert all("<image>" not in json.dumps(e) for e in result.examples)


def test_sharegpt_openai_flavour_parallel_calls_and_tool_list():
    tool = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
    row = {
        "messages": [
            {"role": "user", "content": "<image>Time in Lyon and Oslo?"},
            {
                "role": "function_call",
                "content": json.dumps(
                    [{"name": "get_time", "arguments": {"city": c}} for c in ("Lyon", "Oslo")]
                ),
            },
            {"role": "observation", "content": "10:00"},
            {"role": "observation", "content": "10:00"},
            {"role": "assistant", "content": "It is 10:00 in both.", "weight": 1},
        ],
        "images": ["https://example.com/clock.png"],
        "tools": [tool],
    }
    (example,) = convert_bytes(json.dumps(row).encode(), "sharegpt").examples
    user, calls, first, second, answer = example["messages"]
    assert user["content"][0]["image_url"]["url"] == "https://example.com/clock.png"
    assert [c["id"] for c in calls["tool_calls"]] == ["call_1", "call_2"]
    assert json.loads(calls["tool_calls"][1]["function"]["arguments"]) == {"city": "Oslo"}
    assert (first["tool_call_id"], second["tool_call_id"]) == ("call_1", "call_2")
    assert answer == {"role": "assistant", "content": "It is 10:00 in both.", "weight": 1}
    assert example["tools"] == [{"type": "function", "function": tool}]
    unanswered = dict(row, messages=[row["messages"][0], row["messages"][2]])
    result = convert_bytes(json.dumps(unanswered).encode(), "sharegpt")
    assert "answers no function_call turn" in result.problems[0][1]


def test_image_placeholders_and_images_must_match():
    def row(text, images):
        return {
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Ok."}],
            "images": images,
        }

    rows = [
        row("<image><image>two?", ["https://x.org/a.png"]),
        row("none here", ["https://x.org/a.png"]),
        row("<image> but no images column", None),
    ]
    result = convert_bytes("\n".join(json.dumps(r) for r in rows).encode(), "sharegpt")
    assert result.examples == []
    assert [w for w, _ in result.problems] == ["line 1", "line 2", "line 3"]
    assert "more <image> placeholders" in result.problems[0][1]
    assert "1 image but its text has 0 <image> placeholders" in result.problems[1][1]


# --- 18: a ;-separated CSV ----------------------------------------------------------


def test_case_18_semicolon_csv_cli(tmp_path):
    _convert_and_validate(tmp_path, "18-semicolon-utf8.csv", "csv", 11)


def test_case_18_semicolon_csv_api():
    result = convert(CASES / "18-semicolon-utf8.csv", "csv")
    assert result.problems == [] and len(result.examples) == 11
    assert _messages(result.examples[-1]) == [
        ("user", "Café or tea for focus?"),
        ("assistant", "Either works; keep the dose small and steady."),
    ]
    assert result.notices == ["read as ';'-separated"]


@pytest.mark.parametrize("sep", [",", ";", "\t"])
@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "cp1252"]
)
def test_csv_separators_encodings_and_quoted_newlines(sep, encoding):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=sep, lineterminator="\r\n")
    writer.writerow(["Prompt", "completion", "id"])
    writer.writerow(["Two lines,\nplease; é", 'He said "yes"\r\nthen left', "1"])
    writer.writerow(["q2", "a2", ""])
    result = convert_bytes(buffer.getvalue().encode(encoding), "csv")
    assert result.problems == []
    assert _messages(result.examples[0]) == [
        ("user", "Two lines,\nplease; é"),
        ("assistant", 'He said "yes"\r\nthen left'),
    ]
    assert result.ignored_lines() == ["ignored field `id` in 1 row"]
    assert (encoding == "cp1252") == any("cp1252" in n for n in result.notices)


# --- 07, 09, 10: JSON that is not JSON Lines, and UTF-16 ----------------------------


@pytest.mark.parametrize(
    "case", ["07-json-array-pretty.json", "09-pretty-objects.jsonl", "10-utf16le-bom.jsonl"]
)
def test_cases_07_09_10_from_json_cli(tmp_path, case):
    _convert_and_validate(tmp_path, case, "json", 12)


@pytest.mark.parametrize(
    "case", ["07-json-array-pretty.json", "09-pretty-objects.jsonl", "10-utf16le-bom.jsonl"]
)
def test_cases_07_09_10_from_json_api(case):
    expected = [
        json.loads(line)
        for line in (CASES / "10-utf16le-bom.jsonl").read_bytes().decode("utf-16").split("\n")
        if line.strip()
    ]
    result = convert(CASES / case, "json")
    assert result.problems == [] and result.ignored == {}
    assert result.examples == expected  # the same twelve conversations, whatever the layout
    if case.startswith("10"):
        assert result.notices == ["read as UTF-16LE (byte-order mark) and written as UTF-8"]
        assert b"\r" not in result.jsonl()


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_utf16_and_utf32_with_or_without_bom(encoding):
    data = (CASES / "10-utf16le-bom.jsonl").read_bytes().decode("utf-16").encode(encoding)
    result = convert_bytes(data, "json")
    assert len(result.examples) == 12 and result.problems == []
    assert result.notices and "written as UTF-8" in result.notices[0]


def test_lines_split_on_newline_only():
    odd = "a\u2028b\u2029c\x85d\x0be\x0cf"
    row = {"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": odd}]}
    line = json.dumps(row, ensure_ascii=False)
    assert len(line.splitlines()) > 1  # what str.splitlines() would have broken
    result = convert_bytes((line + "\n" + line + "\n").encode(), "json")
    assert result.problems == [] and result.examples == [row, row]
    assert result.jsonl().count(b"\n") == 2


def test_broken_rows_are_listed_and_the_rest_kept():
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    pretty = json.dumps(good, indent=2)
    text = "\n".join([pretty, pretty.replace('"Yo"', '"Yo",,'), pretty, '{"a": 1', "junk", pretty])
    result = convert_bytes(text.encode(), "json")
    assert len(result.examples) == 3
    # a broken object is one problem over its lines; a truncated line takes the junk after it
    assert [w for w, _ in result.problems] == ["lines 13–24", "lines 37–38"]


def test_unused_fields_are_reported_once_per_file(tmp_path):
    rows = [
        {"id": i, "instruction": f"Q{i}", "output": f"A{i}", "meta": {"src": "x"} if i else None}
        for i in range(12)
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = convert(path, "alpaca")
    assert result.ignored_lines() == [
        "ignored field `id` in 12 rows",
        "ignored field `meta` in 11 rows",
    ]
    done = _cli("convert", str(path), "--from", "alpaca")
    assert done.returncode == 0 and "✅" not in done.stdout
    assert "a.jsonl: ignored field `id` in 12 rows (not in the output)" in done.stderr


def test_nothing_converted_exits_1_without_traceback(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, {"b": 2}]')
    done = _cli("convert", str(path), "--from", "sharegpt")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "nothing converted from x.json: none of its 2 rows converts" in done.stderr
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"")
    done = _cli("convert", str(empty), "--from", "csv")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the file is empty" in done.stderr


# --- properties ------------------------------------------------------------------------

_text = st.text(max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_known_keys = st.sampled_from(
    ["conversations", "messages", "instruction", "input", "output", "system", "history",
     "tools", "images", "from", "value", "role", "content", "id"]
)  # fmt: skip
_turn = st.dictionaries(
    st.sampled_from(["from", "value", "role", "content", "weight"]),
    st.sampled_from(["human", "gpt", "system", "function_call", "observation", "tool", "user"])
    | _text
    | _json,
    max_size=3,
)
_row = st.one_of(
    _json,
    st.dictionaries(_known_keys | _text, _json | st.lists(_turn, max_size=4) | _text, max_size=6),
)
_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(rows=st.lists(_row, max_size=8), fmt=st.sampled_from(["sharegpt", "alpaca", "json"]))
def test_any_json_lines_rows_are_converted_or_reported(rows, fmt):
    # One line holding one list is a JSON array, whose items are the rows.
    assume(not (len(rows) == 1 and isinstance(rows[0], list)))
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    result = convert_bytes(data, fmt)
    assert len(result.examples) + len(result.problems) == len(rows)
    assert all(isinstance(e.get("messages"), list) for e in result.examples)
    json.loads("[" + ",".join(json.dumps(e) for e in result.examples) + "]")  # serialisable


@_PROPERTY
@given(
    rows=st.lists(st.dictionaries(_known_keys | _text, _json | _text, max_size=5), max_size=6),
    fmt=st.sampled_from(["sharegpt", "alpaca", "json"]),
    indent=st.sampled_from([None, 0, 2, 4]),
    as_array=st.booleans(),
)
def test_any_array_or_pretty_rows_are_converted_or_reported(rows, fmt, indent, as_array):
    if as_array:
        text = json.dumps(rows, indent=indent, ensure_ascii=False)
    else:
        text = "\n".join(json.dumps(r, indent=indent, ensure_ascii=False) for r in rows)
    result = convert_bytes(text.encode(), fmt)
    assert len(result.examples) + len(result.problems) == len(rows)


@_PROPERTY
@given(
    rows=st.lists(st.tuples(_text, _text, _text), max_size=8),
    sep=st.sampled_from([",", ";", "\t"]),
    end=st.sampled_from(["\n", "\r\n"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]),
)
def test_any_csv_rows_are_converted_or_reported(rows, sep, end, encoding):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=sep, lineterminator=end)
    writer.writerow(["prompt", "completion", "notes"])
    writer.writerows(rows)
    result = convert_bytes(buffer.getvalue().encode(encoding), "csv")
    assert len(result.examples) + len(result.problems) == len(rows)
    for (prompt, completion, _), example in zip(
        [r for r in rows if r[0].strip() and r[1].strip()], result.examples, strict=True
    ):
        assert _messages(example) == [("user", prompt), ("assistant", completion)]


@_PROPERTY
@given(
    turns=st.lists(
        st.tuples(_text.filter(str.strip), _text.filter(str.strip)), min_size=1, max_size=4
    ),
    extra=st.dictionaries(
        st.sampled_from(["id", "source", "lang"]), _text.filter(bool), max_size=2
    ),
)
def test_valid_sharegpt_rows_are_kept_whole(turns, extra):
    conversation = []
    for user, assistant in turns:
        conversation += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    row = {"conversations": conversation, **extra}
    result = convert_bytes(json.dumps(row).encode(), "sharegpt")
    assert result.problems == []
    (example,) = result.examples
    assert [m["content"] for m in example["messages"]] == [t["value"] for t in conversation]
    assert result.ignored == dict.fromkeys(extra, 1)


@_PROPERTY
@given(data=st.binary(max_size=300), fmt=st.sampled_from(FORMATS))
def test_any_bytes_never_raise(data, fmt):
    result = convert_bytes(data, fmt)
    assert all(isinstance(e.get("messages"), list) for e in result.examples)


# --- Slack: a dropped .json / .csv / UTF-16 file, and /finetune convert -----------------


def _drop(bot, case: str | bytes, name: str | None = None) -> dict:
    content = (CASES / case).read_bytes() if name is None else case
    file = bot.slack.add_file(content, name=name or case)
    assert bot.event(file_share_message_event(file), event_id=f"Ev{file['id']}") == 200
    bot.wait_idle()
    return file


def _thread(bot, file: dict) -> list[str]:
    ts = file["shares"]["public"]["C1"][0]["ts"]
    return [m["text"] for m in bot.slack.messages(channel="C1", thread_ts=ts)]


def _convert_in_slack(bot, text: str) -> str:
    status, body = bot.command(text)
    assert status == 200
    bot.wait_idle()
    return body["text"]


def test_slack_sharegpt_json_drop_offers_and_converts(bot):
    file = _drop(bot, "12-sharegpt-function-call-observation.json")
    report, offer = _thread(bot, file)
    assert report.startswith("12-sharegpt-function-call-observation.json (d1)")
    assert "a JSON array (ShareGPT rows)" in offer
    assert "`/finetune convert d1 from=sharegpt`" in offer and "sharegpt|alpaca|csv|json" in offer

    answer = _convert_in_slack(bot, "convert d1 from=sharegpt")
    assert "Converting d1 from sharegpt" in answer
    summary, new_report = _thread(bot, file)[2:]
    assert summary.startswith(
        "12-sharegpt-function-call-observation.json (d1) from sharegpt: 12 examples converted, "
        "0 rows not converted."
    )
    assert new_report.startswith(
        "12-sharegpt-function-call-observation.chat.jsonl (d2): 12 examples, 12 valid — 0 errors"
    )
    assert "✅" in new_report
    converted = bot.store.get_dataset("d2")
    assert converted.source_dataset_id == "d1" and converted.valid_examples == 12
    expected = convert(CASES / "12-sharegpt-function-call-observation.json", "sharegpt").jsonl()
    assert bot.workflow.blobs.path(converted.sha256).read_bytes() == expected


def test_slack_csv_drop_converts_with_the_format_guessed(bot):
    file = _drop(bot, "18-semicolon-utf8.csv")
    offer = _thread(bot, file)[-1]
    assert "`/finetune convert d1 from=csv`" in offer
    assert "Converting d1 from csv" in _convert_in_slack(bot, "convert d1")
    summary, new_report = _thread(bot, file)[-2:]
    assert "11 examples converted, 0 rows not converted" in summary
    assert "read as ';'-separated" in summary
    assert new_report.startswith("18-semicolon-utf8.chat.jsonl (d2): 11 examples, 11 valid")
    assert bot.store.get_dataset("d2").source_dataset_id == "d1"


def test_slack_utf16_jsonl_drop_offers_transcoding(bot):
    file = _drop(bot, "10-utf16le-bom.jsonl")
    offer = _thread(bot, file)[-1]
    assert "chat rows in UTF-16LE" in offer and "`/finetune convert d1 from=json`" in offer
    _convert_in_slack(bot, "convert d1 from=json")
    summary, new_report = _thread(bot, file)[-2:]
    assert "read as UTF-16LE (byte-order mark) and written as UTF-8" in summary
    assert new_report.startswith("10-utf16le-bom.chat.jsonl (d2): 12 examples, 12 valid — 0 errors")


def test_slack_conversion_where_nothing_converts_says_why(bot):
    file = _drop(bot, "15-sharegpt-images.json")
    before = len(_thread(bot, file))
    _convert_in_slack(bot, "convert d1 from=sharegpt")
    (summary,) = _thread(bot, file)[before:]
    assert summary.startswith(
        "⚠️ Nothing converted from 15-sharegpt-images.json (d1) from sharegpt: none of its "
        "10 rows converts; no dataset was made."
    )
    assert "image 'photos/plant_0.jpg' is a local path; OpenAI needs a URL" in summary
    assert "…and 5 more" in summary
    assert [d.id for d in bot.store.datasets()] == ["d1"]


def test_slack_conversion_that_drops_anything_shows_no_tick(bot):
    rows = [
        {"instruction": f"Question {i}?", "output": f"Answer {i}, in full.", "id": i}
        for i in range(12)
    ]
    rows.append({"instruction": "no answer"})
    content = "\n".join(json.dumps(r) for r in rows).encode()
    file = _drop(bot, content, name="alpaca.jsonl")
    assert "`/finetune convert d1 from=alpaca`" in _thread(bot, file)[-1]
    _convert_in_slack(bot, "convert d1 from=alpaca")
    summary, new_report = _thread(bot, file)[-2:]
    assert summary.startswith("⚠️ alpaca.jsonl (d1) from alpaca: 12 examples converted, 1 row")
    assert "line 13: output is missing or empty" in summary
    assert "ignored field `id` in 12 rows" in summary
    assert new_report.startswith("alpaca.chat.jsonl (d2): 12 examples, 12 valid — 0 errors")
    assert "✅" not in new_report and "not everything was" in new_report


def test_slack_chat_jsonl_gets_no_offer_and_convert_asks_for_the_format(bot):
    file = _drop(bot, training_file(12), name="support.jsonl")
    (report,) = _thread(bot, file)
    assert "/finetune convert" not in report
    status, body = bot.command("convert d1")
    assert status == 200 and "Which format is d1 in?" in body["text"]
    _, body = bot.command("convert d1 from=parquet")
    assert "Which format is d1 in?" in body["text"]
    bot.wait_idle()
    assert [d.id for d in bot.store.datasets()] == ["d1"]
