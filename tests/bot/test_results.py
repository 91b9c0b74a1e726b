"""A run's result record (bot/results.py): old rows read, unknown keys kept, the
stored dict round-trips with its version, and a bad field is named in the error."""

from __future__ import annotations

import dataclasses

import pytest

from bot.results import VERSION, RunResult

# result_json as runs wrote it before the record existed (an OpenAI run that
# succeeded and was evaluated; a local run; a distillation), plus a key no
# version of the record knows.
OPENAI_OLD = {
    "training_file": "file-abc",
    "last_event_id": "ftevent-9",
    "progress_edited_at": 1_764_500_000.5,
    "fine_tuned_model": "ft:gpt-4o-mini-2024-07-18:org:support:abc123",
    "trained_tokens": 31_000,
    "data": {
        "train_sha256": "ab" * 32,
        "eval_sha256": "cd" * 32,
        "split": {"train": 90, "eval": 10, "fraction": 0.1},
    },
    "someday": {"a key": "from a later version"},
}
LOCAL_OLD = {
    "adapter_dir": "/home/runs/r2/adapter",
    "merged_dir": None,
    "metrics": {"train_loss": 1.25},
    "log_tail": "step 6/6\n",
}
DISTILL_OLD = {
    "dataset_id": "d7",
    "failed": [[3, "timeout"]],
    "input_tokens": 1_200,
    "output_tokens": 3_400,
    "answered": 12,
    "stopped": None,
}


@pytest.mark.parametrize(
    "old", [OPENAI_OLD, LOCAL_OLD, DISTILL_OLD], ids=["openai", "local", "distill"]
)
def test_an_old_row_reads_and_writes_back_the_same_dict_plus_the_version(old):
    record = RunResult.from_json(old)
    written = record.to_json()
    assert written["version"] == VERSION
    assert {k: v for k, v in written.items() if k != "version"} == {
        k: v for k, v in old.items() if v is not None
    }
    assert RunResult.from_json(written) == record


def test_unknown_keys_are_kept_and_missing_ones_default():
    record = RunResult.from_json(OPENAI_OLD)
    assert record.extra == {"someday": {"a key": "from a later version"}}
    assert record.fine_tuned_model == OPENAI_OLD["fine_tuned_model"]
    assert record.data["split"]["eval"] == 10
    assert (record.unposted, record.submit_attempts, record.adapter_dir) == (False, 0, None)
    assert RunResult.from_json(None) == RunResult() == RunResult.from_json({})
    assert RunResult().to_json() == {"version": VERSION}


def test_changes_make_a_new_record_and_defaults_leave_the_stored_dict():
    record = RunResult.from_json({"training_file": "file-1", "submit_attempts": 2})
    sent = record.with_(submit_attempts=0, unposted=True)
    assert record.submit_attempts == 2  # frozen: the old one is unchanged
    assert sent.to_json() == {"version": VERSION, "training_file": "file-1", "unposted": True}
    assert sent.with_(unposted=False).to_json() == {"version": VERSION, "training_file": "file-1"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.unposted = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ({"trained_tokens": -5}, "RunResult.trained_tokens"),
        ({"trained_tokens": 1.5}, "RunResult.trained_tokens"),
        ({"submit_attempts": True}, "RunResult.submit_attempts"),
        ({"unposted": "yes"}, "RunResult.unposted"),
        ({"progress_edited_at": float("nan")}, "RunResult.progress_edited_at"),
        ({"fine_tuned_model": 42}, "RunResult.fine_tuned_model"),
        ({"data": ["not", "an", "object"]}, "RunResult.data"),
        ({"failed": "3"}, "RunResult.failed"),
    ],
)
def test_a_bad_field_is_named(stored, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        RunResult.from_json(stored)


def test_every_field_says_what_it_holds():
    for f in dataclasses.fields(RunResult):
        assert f.metadata.get("help"), f.name
