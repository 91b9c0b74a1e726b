"""trainers.retirement: which models stop serving when, and which notice is due."""

from __future__ import annotations

import datetime as dt

import pytest

from trainers.retirement import NOTICE_DAYS, base_model, family, notice_due, serving_ends

END = dt.date(2027, 1, 14)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini-2024-07-18", END),
        ("ft:gpt-4o-mini-2024-07-18:acme::9xYz", END),
        ("ft:gpt-4.1-2025-04-14:acme:support:AbC", END),
        ("gpt-4o", END),
        ("gpt-4.1-nano-2025-04-14", None),  # a family of its own, not gpt-4.1
        ("gpt-4o-realtime", None),
        ("meta-llama/Llama-3.2-1B-Instruct", None),
    ],
)
def test_serving_ends_knows_a_fine_tune_by_its_base(model, expected):
    assert serving_ends(model) == expected


def test_base_and_family():
    assert base_model("ft:gpt-4o-mini-2024-07-18:acme::x") == "gpt-4o-mini-2024-07-18"
    assert family("gpt-4o-mini-2024-07-18") == "gpt-4o-mini" and family("gpt-4o") == "gpt-4o"


def test_each_notice_is_due_once_in_order():
    sent: set[int] = set()
    told = []
    for days_left in range(45, -3, -1):
        due = notice_due(days_left, sent)
        if due is not None:
            told.append((days_left, due))
            sent.add(due)
    assert told == [(30, 30), (7, 7), (1, 1)] and tuple(sorted(sent, reverse=True)) == NOTICE_DAYS


def test_a_bot_back_after_a_week_sends_the_nearest_notice_only():
    assert notice_due(5, set()) == 7
    assert notice_due(5, {7}) is None and notice_due(20, {7}) is None  # 30 is skipped for good
    assert notice_due(-1, set()) is None  # the day has passed: nothing to warn of
