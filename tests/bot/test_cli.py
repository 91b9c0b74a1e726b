"""`tunebot validate` / `estimate` as a user runs them: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

GOOD = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
}


def run(*args, env=None):
    cmd = [sys.executable, "-m", "bot.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.jsonl"
    rows = [
        dict(
            GOOD,
            messages=[
                *GOOD["messages"][:1],
                {"role": "user", "content": f"Q{i}?"},
                GOOD["messages"][2],
            ],
        )
        for i in range(20)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{nope\n")
    return path


def test_json_output_has_the_contracted_shape(good_file):
    out = run("validate", str(good_file), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["examples"] == data["valid_examples"] == 20
    assert data["findings"] == []
    assert set(data["tokens"]) == {"total", "min", "max", "mean", "p50", "p95", "exact"}
    assert data["estimate"]["model"] == "gpt-4o-mini-2024-07-18"
    assert data["estimate"]["epochs"] == 5  # 20 examples: 100 // 20
    assert data["estimate"]["billed_tokens"] == 5 * data["tokens"]["total"]
    assert len(data["estimates"]) == 4
    assert any("2027-01-06" in n for n in data["notices"])


def test_errors_exit_1_with_every_finding(bad_file):
    out = run("validate", str(bad_file), "--json", "--model", "gpt-4o", "--epochs", "2")
    assert out.returncode == 1
    data = json.loads(out.stdout)
    codes = {(f["line"], f["code"]) for f in data["findings"]}
    assert {(2, "invalid_json"), (0, "too_few_examples")} <= codes
    assert data["estimate"] == {
        "model": "gpt-4o-2024-08-06",
        "epochs": 2,
        "billed_tokens": 2 * data["tokens"]["total"],
        "cost_usd": round(2 * data["tokens"]["total"] / 1e6 * 25, 4),
    }


def test_human_report_groups_findings(bad_file):
    out = run("validate", str(bad_file))
    assert out.returncode == 1
    assert "invalid_json ×1 — line 2" in out.stdout
    assert "gpt-4o-mini-2024-07-18" in out.stdout


def test_estimate_prints_the_cost_table(good_file):
    out = run("estimate", str(good_file), "--model", "gpt-4.1-mini")
    assert out.returncode == 0
    assert "gpt-4.1-mini-2025-04-14" in out.stdout and "◀" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "/no/such/file.jsonl"], "cannot open"),
        (["validate", "{good}", "--epochs", "zero"], "epochs"),
        (["validate", "{good}", "--model", "gpt-9"], "unknown model"),
        (["validate"], "required"),
        (["frobnicate"], "invalid choice"),
        (["estimate", "{dir}"], "is a folder"),
    ],
)
def test_usage_errors_exit_2_with_one_line(good_file, args, needle):
    args = [a.format(good=good_file, dir=good_file.parent) for a in args]
    out = (
        run(*args, "--json")
        if args[0] in ("validate", "estimate") and len(args) > 1
        else run(*args)
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("epochs", "needle"), [("0", "at least 1"), ("two", "whole number")])
def test_demo_refuses_bad_epochs_before_fetching_a_model(tmp_path, epochs, needle):
    import os

    home = tmp_path / "home"
    out = run("demo", "--epochs", epochs, env={**os.environ, "TUNEBOT_HOME": str(home)})
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--epochs" in out.stderr and needle in out.stderr
    assert not home.exists()  # no model fetched, no run started


def test_bad_settings_exit_2(good_file):
    import os

    env = {**os.environ, "TUNEBOT_MAX_FILE_MB": "lots"}
    out = run("validate", str(good_file), env=env)
    assert out.returncode == 2 and "TUNEBOT_MAX_FILE_MB" in out.stderr


def test_max_file_setting_flags_large_files(good_file):
    import os

    env = {**os.environ, "TUNEBOT_MAX_FILE_MB": "1"}
    big = good_file.parent / "big.jsonl"
    big.write_text(good_file.read_text() * 800)  # a little over 1 MiB
    out = run("validate", str(big), "--json", env=env)
    assert out.returncode == 1
    assert {"line": 0, "severity": "error", "code": "file_too_large"}.items() <= json.loads(
        out.stdout
    )["findings"][0].items()


@pytest.mark.parametrize("content", [b"", b"\n  \r\n\t\n"])
def test_an_empty_file_is_one_empty_file_error(tmp_path, content):
    # /work/shared/cases/19-empty-file.jsonl: a preparation script that wrote nothing.
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for command in ("validate", "estimate"):
        out = run(command, str(path), "--json")
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
        data = json.loads(out.stdout)
        assert [f["code"] for f in data["findings"]] == ["empty_file"]
        assert data["counts"] == {"empty_file": 1} and data["examples"] == 0
    out = run("validate", str(path))
    assert out.returncode == 1 and out.stderr == ""
    assert "1 error, 0 warnings" in out.stdout and "empty_file ×1: the file " in out.stdout


def test_a_million_blank_lines_print_a_count_and_the_first_lines(good_file):
    good = good_file.read_bytes()
    path = good_file.parent / "blanks.jsonl"
    path.write_bytes(good + b"\n" * 1_000_000)
    out = run("validate", str(path))
    assert out.returncode == 0, out.stderr
    assert "blank_line ×1,000,000 — lines 21, 22, 23, 24, 25 and 999,995 more" in out.stdout
    out = run("validate", str(path), "--json")
    data = json.loads(out.stdout)
    assert data["counts"] == {"blank_line": 1_000_000}
    assert len(data["findings"]) == 1_000 and len(out.stdout) < 200_000
    assert data["summary"][0].startswith(
        "blank_line ×1,000,000 — lines 21, 22, 23, 24, 25 and 999,995 more"
    )


def test_a_malformed_price_file_is_one_line(good_file, tmp_path):
    import os

    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"x": {"aliases": 5}}}')
    env = {**os.environ, "TUNEBOT_PRICES": str(prices)}
    out = run("validate", str(good_file), env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "TUNEBOT_PRICES" in out.stderr and "aliases must be a list" in out.stderr


def test_an_unexpected_error_is_one_line_and_exit_2(monkeypatch, capsys, good_file):
    import bot.cli as cli

    def broken(args, settings):
        raise RuntimeError("something broke\n  deep inside")

    monkeypatch.setattr(cli, "_check_file", broken)
    assert cli.main(["validate", str(good_file)], env={}) == 2
    err = capsys.readouterr().err
    assert err == "tunebot validate: unexpected error: RuntimeError: something broke deep inside\n"


def test_providers_lists_the_file_and_whether_each_key_is_set(tmp_path):
    import os

    from tests.trainers.test_providers import GOOD

    path = tmp_path / "providers.toml"
    path.write_text(GOOD)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    out = run("providers", env={**env, "TUNEBOT_PROVIDERS": str(path), "ACME_API_KEY": "sk-x"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("• openai") and "OPENAI_API_KEY not set" in lines[1]
    assert lines[2].startswith("• local")
    (acme,) = [line for line in lines if line.startswith("• acme")]
    assert "openai-compatible at http://127.0.0.1:9/v1 (key set)" in acme
    assert "acme-8b ($0.5/1M, 32,768 tokens)" in acme and "sk-x" not in out.stdout
    (tog,) = [line for line in lines if line.startswith("• tog ")]
    (together,) = [line for line in lines if line.startswith("• together ")]
    assert "TOGETHER_API_KEY not set" in together
    assert "TOGETHER_API_KEY not set" in tog

    path.write_text('[providers.a]\nkind = "openai"\napi_key_env = "sk-live-1"')
    out = run("providers", env={**env, "TUNEBOT_PROVIDERS": str(path)})
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.startswith("TUNEBOT_PROVIDERS:") and "never hold the key" in out.stderr
