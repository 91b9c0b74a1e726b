"""Together AI's price table per model size (trainers/together_pricing.py) and the price
file's `together` section."""

from __future__ import annotations

import json

import pytest

from trainers.pricing import PriceTable
from trainers.together_pricing import DEFAULT_RATES, TogetherRates, estimate, params_billions


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("Qwen/Qwen3-8B", 8.0),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", 8.0),
        ("Qwen/Qwen3-32B", 32.0),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 56.0),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.135),
        ("mystery-model", None),
    ],
)
def test_the_size_comes_from_the_name(model, size):
    assert params_billions(model) == size


def test_the_bracket_decides_the_rate_and_lora_or_full():
    assert DEFAULT_RATES.rate(8, lora=True) == 0.48 and DEFAULT_RATES.rate(8, lora=False) == 0.54
    assert DEFAULT_RATES.rate(32, lora=True) == 1.50 and DEFAULT_RATES.rate(70, lora=False) == 3.20
    with pytest.raises(ValueError, match="no Together price for a 405B model"):
        DEFAULT_RATES.rate(405, lora=True)
    cost = estimate([100, 200, 300], 8.0, epochs=3, lora=True)
    assert cost.billed_tokens == 1_800 and cost.cost_usd == pytest.approx(1_800 / 1e6 * 0.48)


def test_the_price_file_replaces_the_table_with_its_date_and_source(tmp_path):
    path = tmp_path / "prices.json"
    sizes = [
        {"up_to_billions": 70, "lora_per_1m": 2.0, "full_per_1m": 3.0},
        {"up_to_billions": 16, "lora_per_1m": 0.5, "full_per_1m": 0.6, "inference_per_1m": 0.2},
    ]
    path.write_text(json.dumps({"together": {"read": "2026-11-30", "source": "s", "sizes": sizes}}))
    table = PriceTable.from_file(path)
    assert (table.together.read, table.together.source) == ("2026-11-30", "s")
    assert table.together.rate(8, lora=True) == 0.5  # brackets sorted by size
    assert table.together.inference(8) == 0.2 and table.together.inference(32) is None
    assert table.resolve("gpt-4o-mini")  # the OpenAI models stay


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ({"sizes": []}, "together.read must say when"),
        ({"read": "2026-11-30", "sizes": []}, "together.sizes must be a list"),
        ({"read": "x", "sizes": [{"up_to_billions": 8}]}, "together.sizes[0] needs"),
        (
            {"read": "x", "sizes": [{"up_to_billions": 8, "lora_per_1m": -1, "full_per_1m": 1}]},
            "sizes above 0 and prices of 0 or more",
        ),
    ],
)
def test_a_bad_together_section_is_named(section, said):
    with pytest.raises(ValueError, match=said.replace("[", r"\[").replace("]", r"\]")):
        TogetherRates.from_json(section, "price file p.json")
