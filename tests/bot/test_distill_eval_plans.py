"""Distillation and evaluation plans as data (bot/plans.py): the dicts stored
before the dataclasses existed read back and write the same dict plus the
version, and a bad field is named in the error."""

from __future__ import annotations

import dataclasses

import pytest

from bot import approvals
from bot.plans import VERSION, DistillEstimate, DistillPlan, EvalEstimate, EvalPlan

# As bot/distillation.py and bot/evaluation.py stored them before.
DISTILL_OLD = {
    "kind": "distill",
    "dataset_id": "d1",
    "dataset_sha256": "ab" * 32,
    "provider": "distill",
    "model": "gpt-4.1-2025-04-14",
    "system": "Answer briefly.",
    "prompts": 40,
    "max_tokens": 1024,
    "skipped_lines": [3, 17],
    "secret_hold": False,
    "estimate": {
        "billed_tokens": 41_960,
        "input_tokens": 1_000,
        "output_tokens": 40_960,
        "cost_usd": 0.3297,
        "price_per_1m": 0.0,
    },
}
EVAL_OLD = {
    "kind": "eval",
    "dataset_id": "d1",
    "dataset_sha256": "ab" * 32,
    "provider": "eval",
    "model": "gpt-4o-mini-2024-07-18",
    "target_run": "r2",
    "eval_sha256": "cd" * 32,
    "eval_dataset_id": None,
    "examples": 12,
    "teacher": None,
    "judge": True,
    "secret_hold": False,
    "estimate": {
        "cost_usd": 0.0123,
        "generation_usd": 0.01,
        "teacher_usd": 0.0,
        "judge_usd": 0.0023,
        "billed_tokens": 0,
        "price_per_1m": 0.0,
    },
}


@pytest.mark.parametrize(
    ("kind", "old"), [(DistillPlan, DISTILL_OLD), (EvalPlan, EVAL_OLD)], ids=["distill", "eval"]
)
def test_an_old_dict_reads_and_writes_back_the_same_dict_plus_the_version(kind, old):
    plan = kind.from_json(old)
    assert plan.to_json() == {"version": VERSION, **old}
    assert kind.from_json(plan.to_json()) == plan
    # The hash approvers signed is over the stored dict: stable for the same plan.
    assert approvals.plan_hash(plan.to_json()) == approvals.plan_hash(
        kind.from_json(plan.to_json()).to_json()
    )


def test_the_billed_tokens_of_a_distillation_are_its_input_and_output():
    estimate = DistillEstimate(input_tokens=10, output_tokens=20, cost_usd=0.5)
    assert estimate.to_json()["billed_tokens"] == 30


@pytest.mark.parametrize(
    ("kind", "old", "change", "named"),
    [
        (DistillPlan, DISTILL_OLD, {"prompts": -1}, "DistillPlan.prompts"),
        (DistillPlan, DISTILL_OLD, {"max_tokens": 0}, "DistillPlan.max_tokens"),
        (DistillPlan, DISTILL_OLD, {"model": ""}, "DistillPlan.model"),
        (DistillPlan, DISTILL_OLD, {"skipped_lines": ["x"]}, "DistillPlan.skipped_lines"),
        (DistillPlan, DISTILL_OLD, {"secret_hold": "no"}, "DistillPlan.secret_hold"),
        (
            DistillPlan,
            DISTILL_OLD,
            {"estimate": {"cost_usd": -1.0}},
            "DistillEstimate.cost_usd",
        ),
        (EvalPlan, EVAL_OLD, {"target_run": None}, "EvalPlan.target_run"),
        (EvalPlan, EVAL_OLD, {"examples": 1.5}, "EvalPlan.examples"),
        (EvalPlan, EVAL_OLD, {"judge": 1}, "EvalPlan.judge"),
        (EvalPlan, EVAL_OLD, {"estimate": {"judge_usd": float("inf")}}, "EvalEstimate.judge_usd"),
        (EvalPlan, EVAL_OLD, {"version": 2}, "EvalPlan.version"),
    ],
)
def test_a_bad_field_is_named(kind, old, change, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        kind.from_json({**old, **change})


@pytest.mark.parametrize("kind", [DistillPlan, DistillEstimate, EvalPlan, EvalEstimate])
def test_every_field_says_what_it_holds(kind):
    for f in dataclasses.fields(kind):
        assert f.metadata.get("help"), f"{kind.__name__}.{f.name}"


def test_plans_are_frozen():
    plan = DistillPlan.from_json(DISTILL_OLD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.prompts = 1  # type: ignore[misc]
