"""Kinds of file (supervised with vision, preference, reinforcement), role rules and shapes.

The files in tests/cases/ are copies of /work/shared/cases (see its README): each
stands for a kind of fault people meet preparing fine-tuning data. Every case is
checked through `trainers.data.validate` and through `tunebot validate --json`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CASES
from trainers import pricing
from trainers.data import (
    ERROR,
    IMAGE_MAX_TOKENS,
    PREFERENCE,
    REINFORCEMENT,
    SUPERVISED,
    UNKNOWN,
    WARNING,
    validate,
    validate_bytes,
)
from trainers.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter, image_tokens

SYSTEM = {"role": "system", "content": "You identify the kind of leaf in a photo."}


def user(text="What leaf is this?", *parts) -> dict:
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


def assistant(text="This looks like a maple leaf: five lobes.", **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def image(url="https://example.com/leaf.jpg", detail="low") -> dict:
    spec = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": spec}


def chat(*messages, **top) -> dict:
    return {"messages": list(messages), **top}


def pref(prompt="How do I reset a router?", good="Unplug it for thirty seconds.", bad="No idea."):
    return {
        "input": {"messages": [SYSTEM, user(prompt)]},
        "preferred_output": [assistant(good)],
        "non_preferred_output": [assistant(bad)],
    }


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def fill(rows: list[dict], n: int = 12) -> bytes:
    """`rows`, then distinct good rows of the same kind up to `n`: too_few_examples stays quiet."""
    first = rows[0]
    extra = []
    for i in range(n - len(rows)):
        if {"input", "preferred_output", "non_preferred_output"} & set(first):
            extra.append(pref(prompt=f"Question {i}?"))
        else:
            extra.append(chat(SYSTEM, user(f"Question {i}?"), assistant()))
    return jsonl(*rows, *extra)


def got(report) -> set[tuple[int, str]]:
    return {(f.line, f.code) for f in report.findings}


def cli(*args: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "bot.cli", "validate", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def png(width: int, height: int) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x06\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + ihdr + b"\x00" * 4 + b"\x00" * 16


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return b"\xff\xd8" + app0 + sof + b"\x03" + b"\x00" * 9 + b"\xff\xd9"


def webp(width: int, height: int) -> bytes:
    body = b"VP8X" + (10).to_bytes(4, "little") + b"\x00" * 4
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WEBP" + body


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# --- the shared cases, through validate and through the CLI -----------------------------


def test_case_01_vision_image_parts_are_accepted_and_counted():
    report = validate(CASES / "01-vision-image-url.jsonl")
    assert not report.has_errors, report.summary()
    assert report.kind == SUPERVISED and report.valid_examples == 13 and report.images == 3
    # detail low: 85 tokens each, exactly (gpt-4o's rule); the rest is the chat formula.
    text_only = []
    for line in (CASES / "01-vision-image-url.jsonl").read_text().splitlines():
        row = json.loads(line)
        for m in row["messages"]:
            if isinstance(m["content"], list):
                m["content"] = [p for p in m["content"] if p["type"] == "text"]
        text_only.append(row)
    plain = validate_bytes(jsonl(*text_only))
    assert report.tokens.total == plain.tokens.total + 3 * 85
    assert report.tokens.exact and any("3 images counted exactly" in n for n in report.token_notes)


def test_case_02_preference_rows_are_recognised_and_counted():
    report = validate(CASES / "02-dpo-preference.jsonl")
    assert report.findings == [] and report.kind == PREFERENCE
    assert report.valid_examples == 12 and report.kinds == {PREFERENCE: 12}
    # Input once, each output once, by the chat formula (see trainers.data's docstring).
    counter = TokenCounter()
    row = json.loads((CASES / "02-dpo-preference.jsonl").read_text().splitlines()[0])
    messages = [*row["input"]["messages"], *row["preferred_output"], *row["non_preferred_output"]]
    expected = REPLY_PRIMING + sum(
        TOKENS_PER_MESSAGE + counter.count(m["role"]) + counter.count(m["content"])
        for m in messages
    )
    assert report.token_counts[0] == expected


def test_case_03_tool_content_parts_are_an_error():
    report = validate(CASES / "03-tool-content-parts.jsonl")
    assert {(11, "invalid_content"), (12, "invalid_content")} <= got(report)
    tool = next(f for f in report.findings if f.code == "invalid_content")
    assert "(tool)" in tool.message and "must be a string" in tool.message
    assert report.valid_examples == 10  # the other lines are fine


def test_case_06_refusal_key_is_accepted():
    report = validate(CASES / "06-refusal-key.jsonl")
    assert report.findings == [] and report.valid_examples == 10


@pytest.mark.parametrize(
    ("name", "code", "needles"),
    [
        (
            "07-json-array-pretty.json",
            "json_array",
            ["a JSON array of 12 conversations, not JSONL", "`tunebot convert --from json`"],
        ),
        (
            "09-pretty-objects.jsonl",
            "multiline_json",
            ["12 conversations pretty-printed", "`tunebot convert --from json`"],
        ),
        (
            "10-utf16le-bom.jsonl",
            "wrong_encoding",
            ["UTF-16 (little-endian, with BOM)", "save it as UTF-8", "`tunebot convert`"],
        ),
        ("19-empty-file.jsonl", "empty_file", ["is empty (0 bytes)"]),
    ],
)
def test_whole_file_shapes_are_one_finding(name, code, needles):
    for report in (validate(CASES / name), validate_bytes((CASES / name).read_bytes())):
        assert [(f.line, f.code, f.severity) for f in report.findings] == [(0, code, ERROR)]
        assert report.counts == {code: 1} and report.valid_examples == 0
        for needle in needles:
            assert needle in report.findings[0].message


@pytest.mark.parametrize(
    ("name", "rc", "kind", "codes"),
    [
        ("01-vision-image-url.jsonl", 0, SUPERVISED, {"inconsistent_system"}),
        ("02-dpo-preference.jsonl", 0, PREFERENCE, set()),
        ("03-tool-content-parts.jsonl", 1, SUPERVISED, {"invalid_content"}),
        ("06-refusal-key.jsonl", 0, SUPERVISED, set()),
        ("07-json-array-pretty.json", 1, UNKNOWN, {"json_array"}),
        ("09-pretty-objects.jsonl", 1, UNKNOWN, {"multiline_json"}),
        ("10-utf16le-bom.jsonl", 1, UNKNOWN, {"wrong_encoding"}),
        ("19-empty-file.jsonl", 1, UNKNOWN, {"empty_file"}),
    ],
)
def test_cases_through_the_cli(name, rc, kind, codes):
    code, data = cli(str(CASES / name))
    assert code == rc
    assert data["kind"] == kind and set(data["counts"]) == codes
    assert isinstance(data["trainable_by"], list) and isinstance(data["token_notes"], list)


def test_cli_names_who_trains_each_kind():
    _, vision = cli(str(CASES / "01-vision-image-url.jsonl"))
    assert vision["images"] == 3 and vision["local"] == []  # local models are text-only
    assert [(t["provider"], t["method"], t["models"]) for t in vision["trainable_by"]] == [
        ("openai", "supervised", ["gpt-4o-2024-08-06"])
    ]
    _, dpo = cli(str(CASES / "02-dpo-preference.jsonl"))
    assert [(t["provider"], t["method"]) for t in dpo["trainable_by"]] == [("openai", "dpo")]
    assert dpo["trainable_by"][0]["until"] == "2027-01-06"
    assert dpo["estimate"]["billed_tokens"] == dpo["estimate"]["epochs"] * dpo["tokens"]["total"]
    _, text = cli(str(CASES / "06-refusal-key.jsonl"))
    assert [(t["provider"], t["method"]) for t in text["trainable_by"]] == [
        ("openai", "supervised"),
        ("local", "supervised"),
    ]


def test_text_report_names_the_kind_and_the_trainers():
    def text(path: Path) -> str:
        cmd = [sys.executable, "-m", "bot.cli", "validate", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout

    dpo = text(CASES / "02-dpo-preference.jsonl")
    assert "Kind: preference (DPO) · trainable by OpenAI DPO (until 2027-01-06" in dpo
    assert "gpt-4o-mini-2024-07-18 does not take this file" in dpo
    vision = text(CASES / "01-vision-image-url.jsonl")
    assert "Kind: supervised chat with 3 images (vision)" in vision
    assert "3 images counted exactly by gpt-4o's rule" in vision
    assert "Local LoRA on one 80 GB GPU" not in vision


def test_trainable_by_follows_the_openai_cutoff():
    before, after = dt.date(2027, 1, 5), dt.date(2027, 1, 6)
    assert [t.provider for t in pricing.trainable_by("supervised", today=before)] == [
        "openai",
        "local",
    ]
    assert [t.provider for t in pricing.trainable_by("supervised", today=after)] == ["local"]
    assert pricing.trainable_by("preference", today=after) == []
    assert pricing.trainable_by("reinforcement", today=before) == []
    assert pricing.trainable_by("supervised", images=True, today=after) == []


# --- vision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "role", "needle"),
    [
        (image("ftp://example.com/leaf.jpg"), "user", "https://"),
        (image("photos/leaf_0.jpg"), "user", "https://"),
        (image("data:text/plain;base64,aGVsbG8="), "user", "not of an image"),
        (image(data_url(b"GIF89a" + b"\x00" * 20, "image/gif")), "user", "JPEG, PNG or WEBP"),
        (image("data:image/png,rawbytes"), "user", "base64"),
        (image("data:image/png;base64,!!!notbase64!!!"), "user", "not valid base64"),
        (image(data_url(b"not an image at all")), "user", "not a JPEG, PNG or WEBP"),
        (image(detail="medium"), "user", "detail must be low, high or auto"),
        ({"type": "image_url", "image_url": "https://example.com/a.jpg"}, "user", "object"),
        ({"type": "image_url"}, "user", '"image_url": {"url"'),
        (image(), "system", "user messages"),
        (image(), "assistant", "user messages"),
    ],
)
def test_bad_image_parts_are_invalid_image(part, role, needle):
    message = {"role": role, "content": [{"type": "text", "text": "Look:"}, part]}
    row = {
        "system": chat(message, user(), assistant()),
        "user": chat(SYSTEM, message, assistant()),
        "assistant": chat(SYSTEM, user(), message),
    }[role]
    report = validate_bytes(fill([row]))
    bad = [f for f in report.findings if f.line == 1]
    assert [f.code for f in bad] == ["invalid_image"], bad
    assert needle in bad[0].message
    assert report.valid_examples == 11


def test_at_most_ten_images_per_example():
    row = chat(SYSTEM, user("Which leaves?", *[image() for _ in range(11)]), assistant())
    report = validate_bytes(fill([row]))
    assert (1, "invalid_image") in got(report)
    assert "11 images" in next(f.message for f in report.findings if f.code == "invalid_image")


@pytest.mark.parametrize(
    ("url", "detail", "tokens", "exact"),
    [
        ("https://example.com/a.jpg", "low", 85, True),
        ("https://example.com/a.jpg", "high", IMAGE_MAX_TOKENS, False),
        ("https://example.com/a.jpg", None, IMAGE_MAX_TOKENS, False),  # no detail: auto
        (data_url(png(1024, 1024)), "high", 765, True),
        (data_url(png(2048, 4096)), "high", 1105, True),
        (data_url(jpeg(512, 512), "image/jpeg"), "high", 255, True),
        (data_url(webp(1024, 1024), "image/webp"), "high", 765, True),
        (data_url(png(1024, 1024)), "auto", 765, False),  # auto counted as high
        (data_url(png(4000, 3000)), "low", 85, True),
    ],
)
def test_image_tokens_follow_the_gpt4o_rule(url, detail, tokens, exact):
    a = validate_bytes(fill([chat(SYSTEM, user("Which leaf?", image(url, detail)), assistant())]))
    b = validate_bytes(fill([chat(SYSTEM, user("Which leaf?"), assistant())]))
    assert not a.has_errors, a.summary()
    assert a.token_counts[0] - b.token_counts[0] == tokens
    assert a.tokens.exact is exact and a.images == 1
    if not exact:
        assert a.token_notes[0].startswith("token counts are approximate: 1 image")


def test_approximate_images_are_said_in_the_report_and_the_cli(tmp_path):
    rows = [chat(SYSTEM, user(f"Leaf {i}?", image(detail="high")), assistant()) for i in range(12)]
    path = tmp_path / "vision.jsonl"
    path.write_bytes(jsonl(*rows))
    rc, data = cli(str(path))
    assert rc == 0 and data["tokens"]["exact"] is False and data["images"] == 12
    assert data["token_notes"] == [
        "token counts are approximate: 12 images counted at 1,445 tokens each, the most "
        "gpt-4o's rule charges at high or auto detail (a URL does not give the image's size)"
    ]
    text = subprocess.run(
        [sys.executable, "-m", "bot.cli", "validate", str(path)], capture_output=True, text=True
    ).stdout
    assert "chat formula, approximate)" in text and "12 images counted at 1,445" in text


def test_image_tokens_helper_matches_openai_examples():
    assert image_tokens("high", (1024, 1024)) == 765  # the vision guide's examples
    assert image_tokens("high", (2048, 4096)) == 1105
    assert image_tokens("low", (4096, 8192)) == 85
    assert image_tokens("high", None) == IMAGE_MAX_TOKENS == 1445


# --- rules follow the role ----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "alice"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello there, friend."}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help."}]},
        {"role": "assistant", "content": None, "refusal": "I cannot help with that."},
        {"role": "assistant", "content": "Hello there, friend.", "refusal": None, "weight": 1},
        {"role": "assistant", "content": "Hello there, friend.", "name": "bot", "weight": 0},
    ],
)
def test_what_the_schema_allows_is_valid(message):
    rows = [chat(SYSTEM, user(), message, user("Again?"), assistant())]
    if message["role"] == "system":
        rows = [chat(message, user(), assistant())]
    report = validate_bytes(fill(rows))
    mine = [f for f in report.findings if f.line == 1 and f.code != "inconsistent_system"]
    assert not mine, report.summary()


def test_a_tool_message_may_carry_a_name():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    row = chat(
        SYSTEM,
        user(),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"},
        assistant(),
    )
    assert not [f for f in validate_bytes(fill([row])).findings if f.line == 1]


@pytest.mark.parametrize(
    ("message", "code", "needle"),
    [
        ({"role": "user", "content": "Hi", "refusal": "no"}, "unknown_message_key", "refusal"),
        (
            {"role": "assistant", "content": "A fine answer.", "refusal": 3},
            "invalid_content",
            "null",
        ),
        (
            {"role": "system", "content": [{"type": "refusal", "refusal": "x"}]},
            "invalid_content",
            "system message takes",
        ),
        (
            {"role": "function", "name": "f", "content": [{"type": "text", "text": "1"}]},
            "invalid_content",
            "must be a string",
        ),
        ({"role": "user", "content": "Hi", "colour": "red"}, "unknown_message_key", "colour"),
        ({"role": "user", "content": "Hi", "weight": 1}, "invalid_weight", "assistant"),
        ({"role": "developer", "content": "Hi"}, "invalid_role", "developer"),
    ],
)
def test_what_the_role_does_not_allow_is_an_error(message, code, needle):
    row = chat(SYSTEM, user(), assistant(), message, assistant("And a closing reply."))
    report = validate_bytes(fill([row]))
    bad = [f for f in report.findings if f.line == 1]
    assert code in {f.code for f in bad}, bad
    assert needle in next(f.message for f in bad if f.code == code)


# --- preference (DPO) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        (
            {"preferred_output": [assistant()], "non_preferred_output": [assistant("No.")]},
            'no "input"',
        ),
        ({**pref(), "preferred_output": None}, 'no "preferred_output"'),
        (
            {k: v for k, v in pref().items() if k != "non_preferred_output"},
            'no "non_preferred_output"',
        ),
        ({**pref(), "preferred_output": assistant()}, "wrap it in [...]"),
        ({**pref(), "preferred_output": [assistant(), assistant()]}, "not 2 messages"),
        ({**pref(), "non_preferred_output": "bad answer"}, "not a string"),
        ({**pref(), "preferred_output": [user()]}, "role 'user'; it must be assistant"),
        ({**pref(), "input": "How do I reset it?"}, '"input" must be an object'),
        (
            {**pref(), "input": {"messages": [SYSTEM, user(), assistant()]}},
            "input ends with an assistant message",
        ),
    ],
)
def test_malformed_preference_rows(row, needle):
    report = validate_bytes(fill([row]))
    bad = [f for f in report.findings if f.line == 1 and f.code == "invalid_preference"]
    assert bad and needle in bad[0].message, report.summary()
    assert report.kind == PREFERENCE and report.valid_examples == 11
    assert "mixed_kinds" not in report.codes()


def test_preference_input_keeps_the_chat_rules():
    row = pref()
    row["input"]["messages"][1] = {"role": "user", "content": "Hi", "colour": "red"}
    assert (1, "unknown_message_key") in got(validate_bytes(fill([row])))
    row = pref()
    row["input"]["messages"][1] = user("What is this?", image())
    report = validate_bytes(fill([row]))
    assert "text only" in next(f.message for f in report.findings if f.code == "invalid_image")
    row = {**pref(), "input": {**pref()["input"], "tools": "lookup"}}
    assert (1, "invalid_tools") in got(validate_bytes(fill([row])))


def test_identical_outputs_are_a_warning_and_the_row_still_counts():
    row = pref(good="Same answer here.", bad="Same answer here.")
    report = validate_bytes(fill([row]))
    warn = [f for f in report.findings if f.code == "identical_outputs"]
    assert [(f.line, f.severity) for f in warn] == [(1, WARNING)]
    assert report.valid_examples == 12 and not report.has_errors


def test_preference_with_tools_counts_approximately():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    row = {**pref(), "input": {**pref()["input"], "tools": tools, "parallel_tool_calls": True}}
    report = validate_bytes(fill([row]))
    assert not report.has_errors and report.tokens.exact is False
    assert any("tool" in n for n in report.token_notes)


def test_preference_secrets_are_found_and_key_names_are_not_secrets():
    assert "possible_secret" not in validate_bytes(fill([pref()])).codes()
    row = pref(good="Use the key sk-proj-" + "a1B2" * 8 + " to log in.")
    report = validate_bytes(fill([row]))
    secret = [f for f in report.findings if f.code == "possible_secret"]
    assert [(f.line, f.message.split(" looks")[0]) for f in secret] == [
        (1, "preferred_output 1 (assistant)")
    ]


def test_preference_unknown_top_level_key_is_a_warning():
    report = validate_bytes(fill([{**pref(), "id": 7}]))
    assert (1, "unknown_key") in got(report) and not report.has_errors


# --- reinforcement (RFT) ------------------------------------------------------------------


def rft(i: int) -> dict:
    return {
        "messages": [
            {"role": "developer", "content": "Answer with the leaf's name only."},
            {"role": "user", "content": f"Which leaf has five lobes? ({i})"},
        ],
        "reference_answer": "maple",
        "grader_notes": {"case": i},
    }


def test_reinforcement_rows_are_one_untrainable_finding(tmp_path):
    data = jsonl(*[rft(i) for i in range(5)])
    report = validate_bytes(data)
    assert report.kind == REINFORCEMENT and report.valid_examples == 5
    assert [(f.line, f.code) for f in report.findings] == [(0, "untrainable_kind")]
    assert "No provider in the price table trains them" in report.findings[0].message
    path = tmp_path / "rft.jsonl"
    path.write_bytes(data)
    rc, out = cli(str(path))
    assert rc == 1 and out["kind"] == REINFORCEMENT and out["trainable_by"] == []
    assert out["counts"] == {"untrainable_kind": 1} and out["local"] == []
    text = subprocess.run(
        [sys.executable, "-m", "bot.cli", "validate", str(path)], capture_output=True, text=True
    ).stdout
    assert "no provider in the price table trains it today" in text
    assert "Training cost on OpenAI" not in text


def test_a_chat_row_ending_in_user_without_extra_keys_stays_supervised():
    report = validate_bytes(fill([chat(SYSTEM, user())]))
    assert (1, "no_assistant") in got(report) and report.kind == SUPERVISED


def test_a_chat_row_with_metadata_that_ends_in_user_stays_supervised():
    row = chat(SYSTEM, user(), assistant(), user("Thanks!"), metadata={"id": 7})
    report = validate_bytes(fill([row]))
    assert {(1, "last_not_assistant"), (1, "unknown_key")} <= got(report)
    assert report.kind == SUPERVISED and not report.has_errors and report.valid_examples == 12


# --- mixed kinds --------------------------------------------------------------------------


def test_mixed_kinds_is_one_finding_naming_each_kind_and_its_first_line():
    rows = [chat(SYSTEM, user(f"Q{i}?"), assistant()) for i in range(12)]
    data = jsonl(*rows[:4], pref(), *rows[4:], rft(1), rft(2))
    report = validate_bytes(data)
    mixed = [f for f in report.findings if f.code == "mixed_kinds"]
    assert len(mixed) == 1 and mixed[0].line == 0 and mixed[0].severity == ERROR
    assert (
        "supervised chat (12 lines, first on line 1), preference (DPO) (1 line, first on line 5), "
        "reinforcement (RFT) (2 lines, first on line 14)"
    ) in mixed[0].message
    assert report.kind == SUPERVISED and report.kinds == {
        SUPERVISED: 12,
        PREFERENCE: 1,
        REINFORCEMENT: 2,
    }
    assert "untrainable_kind" not in report.codes()  # the file is mostly supervised


def test_mixed_kinds_are_merged_across_processes(tmp_path):
    rows = [chat(SYSTEM, user(f"Q{i}?"), assistant()) for i in range(300)]
    rows[250] = pref()
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(*rows))
    code = (
        "import json, trainers.data as d; d.PARALLEL_MIN_BYTES = 0; "
        f"r = d.validate({str(path)!r}, workers=2); print(json.dumps(r.to_dict()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    two = json.loads(out.stdout)
    one = validate(path, workers=1).to_dict()
    assert two == one and two["kinds"] == {PREFERENCE: 1, SUPERVISED: 299}
    assert "preference (DPO) (1 line, first on line 251)" in two["findings"][0]["message"]


# --- shapes: detected from the first bytes, never one error per line ----------------------


def test_one_line_json_array_is_one_finding():
    rows = [chat(SYSTEM, user(f"Q{i}?"), assistant()) for i in range(3)]
    report = validate_bytes(json.dumps(rows).encode())
    assert [f.code for f in report.findings] == ["json_array"]
    assert "JSON array of 3 conversations on one line" in report.findings[0].message


def test_array_with_one_object_per_line_is_one_finding():
    rows = [json.dumps(chat(SYSTEM, user(f"Q{i}?"), assistant())) for i in range(20)]
    data = ("[\n" + ",\n".join(rows) + "\n]\n").encode()
    report = validate_bytes(data)
    assert [f.code for f in report.findings] == ["json_array"]
    assert "20 conversations" in report.findings[0].message


def test_broken_json_array_still_one_finding_with_where():
    rows = [json.dumps(pref(prompt=f"Q{i}?"), indent=2) for i in range(3)]
    data = ("[\n" + ",\n".join(rows) + ",\n{oops\n]").encode()
    report = validate_bytes(data)
    assert [f.code for f in report.findings] == ["json_array"]
    message = report.findings[0].message
    assert "3 preference rows" in message and "stops parsing at line" in message


def test_sharegpt_array_names_its_converter():
    rows = [{"conversations": [{"from": "human", "value": "hi"}]}] * 2
    report = validate_bytes(json.dumps(rows, indent=1).encode())
    assert "2 ShareGPT conversations" in report.findings[0].message
    assert "`tunebot convert --from sharegpt`" in report.findings[0].message


@pytest.mark.parametrize(
    ("codec", "bom", "name"),
    [
        ("utf-16-le", b"", "UTF-16 (little-endian, no BOM)"),
        ("utf-16-be", b"\xfe\xff", "UTF-16 (big-endian, with BOM)"),
        ("utf-16-be", b"", "UTF-16 (big-endian, no BOM)"),
        ("utf-32-le", b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with BOM)"),
        ("utf-32-be", b"", "UTF-32 (big-endian, no BOM)"),
    ],
)
def test_wide_encodings_are_named(codec, bom, name, tmp_path):
    text = jsonl(*[chat(SYSTEM, user(f"Q{i}?"), assistant()) for i in range(12)]).decode()
    path = tmp_path / "wide.jsonl"
    path.write_bytes(bom + text.replace("\n", "\r\n").encode(codec))
    report = validate(path)
    assert [(f.code, f.line) for f in report.findings] == [("wrong_encoding", 0)]
    assert name in report.findings[0].message


def test_normal_jsonl_stays_on_the_fast_path_even_with_a_long_first_line():
    long = chat(SYSTEM, user("word " * 5_000), assistant())  # first line > the 8 KB head
    report = validate_bytes(fill([long]))
    assert not report.has_errors and report.valid_examples == 12


def test_a_broken_first_line_is_still_reported_on_its_line():
    report = validate_bytes(b'{"messages": [\n' + fill([chat(SYSTEM, user(), assistant())]))
    assert (1, "invalid_json") in got(report)
    assert "multiline_json" not in report.codes() and report.valid_examples == 12


def test_lines_that_are_arrays_stay_per_line():
    report = validate_bytes(b"[1, 2]\n[3]\n" + fill([chat(SYSTEM, user(), assistant())]))
    assert {(1, "not_an_object"), (2, "not_an_object")} <= got(report)
    assert "json_array" not in report.codes()


def test_other_formats_get_a_hint_not_a_cascade():
    rows = [{"instruction": f"Q{i}", "input": "", "output": "A"} for i in range(3)]
    report = validate_bytes(jsonl(*rows))
    assert report.counts["missing_messages"] == 3 and "unknown_key" not in report.codes()
    assert "`tunebot convert --from alpaca`" in report.findings[-1].message
    assert report.kind == UNKNOWN
