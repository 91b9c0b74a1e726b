"""trainers.advise: every path of the decision tree."""

from __future__ import annotations

import pytest

from trainers.advise import PATHS, Situation, advise

ALL_TRIED = frozenset({"prompting", "few_shot", "structured_outputs", "rag"})


def situation(problems, calls=5_000, examples=400, tried=ALL_TRIED - {"rag"}):
    return Situation(frozenset(problems), calls, examples, frozenset(tried))


@pytest.mark.parametrize(
    ("case", "expected_path", "needle"),
    [
        (situation({"knowledge"}, tried=set()), "rag", "retrieve"),
        (situation({"knowledge", "style"}, tried={"rag"}), "rag", "improve chunking"),
        (situation({"format"}, tried={"prompting"}), "structured_outputs", "JSON schema"),
        (situation({"style"}, tried=set()), "prompt_engineering", "system prompt"),
        (situation({"domain"}, tried={"prompting"}), "few_shot", "3-5"),
        (situation({"cost"}, calls=200, tried=set()), "prompt_engineering", "system prompt"),
        (situation({"cost"}, calls=200), "prompt_engineering", "200 calls a day"),
        (situation({"cost"}, calls=50_000, tried=set()), "distillation", "/finetune distill"),
        (situation({"style"}, calls=100), "few_shot", "revisit fine-tuning"),
        (situation({"style"}, examples=20), "few_shot", "collect reviewed examples"),
        (situation({"style", "domain"}), "fine_tuning", "/finetune train"),
        (situation({"format"}, tried=ALL_TRIED), "fine_tuning", "/finetune train"),
    ],
    ids=[
        "knowledge-no-rag",
        "knowledge-rag-tried",
        "format",
        "nothing-tried",
        "few-shot-next",
        "cost-low-volume-untried",
        "cost-low-volume",
        "cost-high-volume",
        "style-low-volume",
        "too-few-examples",
        "fine-tune",
        "format-everything-tried",
    ],
)
def test_each_path(case, expected_path, needle):
    advice = advise(case)
    assert advice.path == expected_path
    assert needle in " ".join(advice.lines())


def test_every_path_is_reachable():
    cases = [
        situation({"knowledge"}, tried=set()),
        situation({"format"}, tried={"prompting"}),
        situation({"style"}, tried=set()),
        situation({"domain"}, tried={"prompting"}),
        situation({"cost"}, calls=50_000),
        situation({"style"}),
    ]
    assert {advise(c).path for c in cases} == set(PATHS)


def test_training_advice_has_data_target_holdout_and_cost():
    advice = advise(situation({"style"}), price_per_1m=(3.0, 25.0))
    assert "a few hundred excellent examples beat thousands" in advice.data_target
    assert "you have 400" in advice.data_target
    assert "hold out 10-20%" in advice.eval_holdout
    assert advice.cost_range.startswith("about $1.35-$18.75")  # 300x500x3 at $3 .. 500x500x3 at $25


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"problems": frozenset()}, "at least one"),
        ({"problems": frozenset({"vibes"})}, "unknown problem 'vibes'"),
        ({"problems": frozenset({"style"}), "tried": frozenset({"prayer"})}, "unknown approach"),
        ({"problems": frozenset({"style"}), "calls_per_day": -1}, "negative"),
    ],
)
def test_bad_situations(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Situation(**kwargs)
