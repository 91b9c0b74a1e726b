"""trainers.pricing: OpenAI's epoch rule, billed tokens, the price table, GPU time."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from trainers.pricing import (
    PriceTable,
    UnknownModel,
    auto_epochs,
    cost_table,
    estimate,
    local_estimate,
    parse_epochs,
)


@pytest.mark.parametrize(
    ("n", "epochs"),
    [
        (1, 25),
        (4, 25),
        (5, 20),
        (10, 10),
        (33, 3),
        (34, 3),
        (100, 3),
        (8333, 3),
        (8334, 2),
        (25001, 1),
    ],
)
def test_auto_epochs_at_the_edges(n, epochs):
    assert auto_epochs(n) == epochs


def test_cost_by_hand():
    table = PriceTable()
    model = table.resolve("gpt-4o-mini")
    counts = [1_000] * 50 + [70_000]  # one example over the 65,536 context
    e = estimate(counts, model, today=dt.date(2026, 11, 28))
    assert e.epochs == 3  # 51 examples: 153 passes, within 100..25,000
    assert e.billed_tokens == 3 * (50 * 1_000 + 65_536)
    assert e.cost_usd == pytest.approx(3 * 115_536 / 1e6 * 3.00)
    assert e.truncated_examples == 1


def test_explicit_epochs_override_auto():
    model = PriceTable().resolve("gpt-4.1-2025-04-14")
    e = estimate([2_000] * 10, model, 4)
    assert (e.epochs, e.billed_tokens, e.cost_usd) == (4, 80_000, pytest.approx(0.08 * 25))


def test_short_names_resolve_to_snapshots():
    table = PriceTable()
    assert table.resolve("gpt-4o-mini").name == "gpt-4o-mini-2024-07-18"
    assert table.resolve("GPT-4.1-mini").training_per_1m == 5.00
    assert table.resolve("gpt-4o").training_per_1m == 25.00
    assert table.resolve("gpt-4.1").context == 65_536


def test_retired_models_say_so():
    table = PriceTable()
    for name in ("gpt-3.5-turbo", "gpt-4.1-nano"):
        model = table.resolve(name)
        assert not model.trainable
        assert "retired" in estimate([100] * 10, model).notices[0]
    assert {m.name for m in table.trainable()} == {
        "gpt-4o-mini-2024-07-18",
        "gpt-4.1-mini-2025-04-14",
        "gpt-4.1-2025-04-14",
        "gpt-4o-2024-08-06",
    }


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModel, match="gpt-4o-mini-2024-07-18"):
        PriceTable().resolve("gpt-5-turbo-max")


def test_cutoff_notice_moves_with_the_clock():
    model = PriceTable().resolve("gpt-4o-mini")
    before = estimate([100] * 10, model, today=dt.date(2027, 1, 5)).notices
    after = estimate([100] * 10, model, today=dt.date(2027, 1, 6)).notices
    assert "2027-01-06 (1 day from today)" in before[0]
    assert "no longer accepts" in after[0]


def test_price_file_overrides_and_extends(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "gpt-4o-mini-2024-07-18": {"training_per_1m": 2.5},
                    "acme-ft-1": {"training_per_1m": 1.0, "context": 8192, "aliases": ["acme"]},
                }
            }
        )
    )
    table = PriceTable.from_file(path)
    assert table.resolve("gpt-4o-mini").training_per_1m == 2.5
    assert table.resolve("acme").context == 8192
    assert table.resolve("gpt-4.1").training_per_1m == 25.0  # untouched defaults stay


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"models": []}',
        '{"models": {"x": {"training_per_1m": -1}}}',
        '{"models": {"x": {"colour": 1}}}',
    ],
)
def test_bad_price_files_are_value_errors(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path)):
        PriceTable.from_file(path)


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (None, None), ("3", 3), (25, 25)])
def test_parse_epochs(value, expected):
    assert parse_epochs(value) == expected


@pytest.mark.parametrize("value", ["0", "26", "three", "2.5"])
def test_parse_epochs_rejects(value):
    with pytest.raises(ValueError, match="epochs"):
        parse_epochs(value)


def test_cost_table_covers_every_trainable_model():
    costs = cost_table([500] * 200, PriceTable(), "gpt-4.1-mini", None, today=dt.date(2026, 11, 28))
    assert costs.selected.model == "gpt-4.1-mini-2025-04-14"
    assert len(costs.estimates) == 4
    assert costs.to_dict()["estimate"]["billed_tokens"] == 3 * 200 * 500


def test_local_estimate_is_tokens_over_throughput():
    e = local_estimate([1_000] * 3_600, params_billions=8, epochs=2)
    assert e.tokens == 7_200_000
    assert e.gpu_hours == pytest.approx(7_200_000 / e.tokens_per_second / 3600)
    q = local_estimate([1_000] * 3_600, params_billions=8, epochs=2, qlora=True)
    assert q.gpu_hours > e.gpu_hours
    assert local_estimate([9_000], max_length=2048).tokens == 3 * 2048
