"""Held-out data for a run, and the base-vs-tuned evaluation after it.

The split is made when the run's data is prepared, from the frozen plan
(dataset sha256, fraction, seed), so the evaluation examples are never
trained on. After a successful run the evaluation runs on the bot's job
threads: generation (OpenAI or the local adapter), scoring, then the summary,
a chart and a CSV of every row in the run's thread. A student trained on a
distilled dataset is compared with its teacher too (teacher vs base student
vs tuned student), with the price of 1,000 calls to each.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError

from bot import render
from bot.workflow import UserError

if TYPE_CHECKING:
    from bot.runs import Runs
    from storage import Run

log = logging.getLogger("tunebot")

SPLIT_SEED = 0
MIN_HELD_OUT, MAX_HELD_OUT, MIN_TRAIN = 5, 200, 10


def held_out_count(valid_examples: int, fraction: float) -> int:
    """How many examples the split holds out (the same rule as trainers.evaluate.split_file)."""
    if valid_examples < MIN_HELD_OUT + MIN_TRAIN:
        return 0
    wanted = max(round(valid_examples * fraction), MIN_HELD_OUT)
    return min(wanted, MAX_HELD_OUT, valid_examples - MIN_TRAIN)


class Evaluations:
    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.wf = runs.wf
        self.store = runs.store
        self.settings = runs.settings

    # --- data ------------------------------------------------------------------------

    def prepare(self, run: Run) -> dict:
        """Split (or pair) the run's data once; recorded in the run's result_json["data"]."""
        from trainers.evaluate import overlap, split_file

        existing = (run.result_json or {}).get("data")
        if existing:
            return existing
        plan = run.plan_json
        source = self.wf.blobs.path(plan["dataset_sha256"])
        data: dict[str, Any] = {"train_sha256": plan["dataset_sha256"], "eval_sha256": None}
        with tempfile.TemporaryDirectory() as tmp:
            train, held = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
            if plan.get("eval_dataset_id"):
                eval_dataset = self.store.get_dataset(plan["eval_dataset_id"])
                data["eval_sha256"] = eval_dataset.sha256
                data["overlap"] = overlap(source, self.wf.blobs.path(eval_dataset.sha256))
            elif plan.get("split"):
                try:
                    info = split_file(source, train, held, fraction=plan["split"], seed=SPLIT_SEED)
                except ValueError as exc:
                    data["note"] = f"no evaluation set: {exc}"
                else:
                    data.update(
                        train_sha256=self.wf.blobs.put_file(train),
                        eval_sha256=self.wf.blobs.put_file(held),
                        split=info.to_dict(),
                    )
        record = {**(run.result_json or {}), "data": data}
        self.store.update_run(run.id, result_json=record)
        if data.get("overlap"):
            lines = ", ".join(str(n) for n in data["overlap"][:10])
            self.wf.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"⚠️ eval_overlap: {len(data['overlap'])} example(s) of {plan['eval_dataset_id']} "
                    f"also appear in the training data (lines {lines}); their scores will flatter the "
                    "tuned model."
                ),
            )
        return data

    # --- the evaluation -----------------------------------------------------------------

    def after_success(self, run: Run) -> None:
        data = (run.result_json or {}).get("data") or {}
        if not data.get("eval_sha256"):
            note = data.get("note") or "no held-out data"
            self.wf.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: not evaluated ({note}). `/finetune eval {run.id} eval=<dataset>` evaluates it on another dataset."
                ),
            )
            return
        self.wf.submit(
            f"evaluating {run.id}", lambda: self.evaluate(run.id), run.channel, run.thread_ts
        )

    def request(self, run_ref: str | None, channel: str, eval_ref: str | None) -> render.Message:
        run = self.runs._find_run(run_ref, channel)
        if run.status != "succeeded":
            raise UserError(f"{run.id} is {run.status}: only a succeeded run can be evaluated.")
        eval_sha = None
        if eval_ref:
            dataset = self.wf.find_dataset(channel, eval_ref)
            if (dataset.errors or 0) > 0:
                raise UserError(f"{dataset.id} has errors and cannot be an eval set.")
            eval_sha = dataset.sha256
        elif not ((run.result_json or {}).get("data") or {}).get("eval_sha256"):
            raise UserError(f"{run.id} has no held-out data: name one with eval=<dataset>.")
        self.wf.submit(
            f"evaluating {run.id}",
            lambda: self.evaluate(run.id, eval_sha, eval_ref),
            channel,
            run.thread_ts,
        )
        return render.note(f"Evaluating {run.id}; the results go to its thread.")

    def evaluate(
        self, run_id: str, eval_sha: str | None = None, eval_dataset_id: str | None = None
    ) -> None:
        from trainers.evaluate import examples_from_file, score

        run = self.store.get_run(run_id)
        data = (run.result_json or {}).get("data") or {}
        eval_sha = eval_sha or data.get("eval_sha256")
        examples = examples_from_file(self.wf.blobs.path(eval_sha))
        if not examples:
            raise UserError(
                f"The evaluation set of {run.id} has no example with an assistant turn."
            )
        base, tuned, generation_cost = self._generate(run, examples)
        avg_prompt = (
            sum(len(e.prompt_text) for e in examples) / len(examples) / 4
        )  # ~4 chars a token
        teacher_model, teacher, teacher_cost = self._teacher(
            run, examples, avg_prompt, spent_usd=generation_cost
        )
        judge = self._judge(
            run,
            len(examples),
            avg_prompt,
            answers=3 if teacher_model else 2,
            spent_usd=generation_cost + teacher_cost,
        )
        embedder = _embedder()
        result = score(
            examples,
            base,
            tuned,
            judge=judge,
            embedder=embedder,
            teacher_outputs=teacher,
            teacher_model=teacher_model,
        )
        cost = (result.judge_cost_usd or 0.0) + generation_cost + teacher_cost
        prices = self._prices_per_1k(run, base, tuned, teacher_model, teacher)
        summary = {
            "primary": result.primary,
            "means": {
                s.name: {"base": s.base, "tuned": s.tuned, "delta": s.delta}
                for s in result.summaries
            },
            "win_tie_loss": {"win": result.wins, "tie": result.ties, "loss": result.losses},
            "examples": len(examples),
        }
        if teacher_model:
            summary["teacher"] = {"model": teacher_model, "kept": result.kept()}
        if prices:
            summary["price_per_1k_calls"] = prices
        self.store.add_eval(
            run.id,
            eval_dataset_id=eval_dataset_id or run.plan_json.get("eval_dataset_id"),
            summary=summary,
            rows=result.to_dict(),
            cost_usd=cost,
        )
        self.store.audit(
            "tunebot",
            "evaluated",
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"cost_usd": cost},
        )
        log.info(
            "run %s: evaluated on %d examples, %s %s",
            run.id,
            len(examples),
            result.primary,
            summary["means"].get(result.primary),
        )
        self.wf.post(
            run.channel,
            run.thread_ts,
            render.eval_summary(run, result, cost_usd=cost, prices_per_1k=prices),
        )
        self._upload(run, result)

    def _generate(self, run: Run, examples) -> tuple[list, list, float]:
        from trainers.evaluate import generate_local, generate_openai, generation_cost

        if run.provider == "local":
            result = run.result_json or {}
            adapter = result.get("adapter_dir")
            if not adapter:
                raise UserError(f"{run.id} has no adapter to evaluate.")
            from trainers import models

            base_model = models.resolve(run.model, self.settings.home / "models")
            base, tuned = generate_local(base_model, adapter, examples)
            return base, tuned, 0.0
        client = self._openai()
        tuned_model = (run.result_json or {}).get("fine_tuned_model")
        if not tuned_model:
            raise UserError(f"{run.id} has no fine-tuned model id to evaluate.")
        concurrency = self.settings.eval_concurrency
        base = generate_openai(client, run.model, examples, concurrency=concurrency)
        tuned = generate_openai(client, tuned_model, examples, concurrency=concurrency)
        prices = self.wf.prices
        cost = (generation_cost(run.model, base, prices) or 0.0) + (
            generation_cost(tuned_model, tuned, prices) or 0.0
        )
        return base, tuned, cost

    def teacher_of(self, run: Run) -> str | None:
        """The teacher model whose distillation wrote ``run``'s training data, if one did."""
        if run.provider not in ("openai", "local"):
            return None
        for distill in self.store.runs(status="succeeded", provider="distill", limit=None):
            if (distill.result_json or {}).get("dataset_id") == run.dataset_id:
                return distill.model
        return None

    def _teacher(
        self, run: Run, examples, avg_prompt_tokens: float, *, spent_usd: float = 0.0
    ) -> tuple[str | None, list | None, float]:
        """(teacher, its answers, their cost) for a student of a distillation; else (None, None, 0).

        The teacher answers the held-out prompts afresh, at temperature 0 like
        the students, so all three are graded the same way. It is skipped, with
        a note in the thread, when OpenAI is not configured or its estimated
        cost would break the month's budget.
        """
        from trainers.evaluate import generate_openai, generation_cost
        from trainers.pricing import inference_cost

        teacher = self.teacher_of(run)
        if teacher is None:
            return None, None, 0.0
        if not self.settings.openai_api_key:
            self.wf.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: its data was distilled from {teacher}, but OPENAI_API_KEY is not set, so the teacher is left out of the comparison."
                ),
            )
            return None, None, 0.0
        avg_answer = sum(len(e.reference) for e in examples) / len(examples) / 4
        n = len(examples)
        try:
            estimate = inference_cost(
                teacher, round(n * avg_prompt_tokens), round(n * avg_answer), self.wf.prices
            )
        except ValueError:
            estimate = 0.0  # it had a price when distilled; a price file dropped it since
        if self._over_budget(
            run,
            spent_usd + estimate,
            f"asking the teacher {teacher} (about ${estimate:,.2f})",
            "so it is left out of the comparison",
        ):
            return None, None, 0.0
        answers = generate_openai(
            self._openai(), teacher, examples, concurrency=self.settings.eval_concurrency
        )
        return teacher, answers, generation_cost(teacher, answers, self.wf.prices) or 0.0

    def _prices_per_1k(
        self, run: Run, base, tuned, teacher_model: str | None, teacher
    ) -> dict[str, dict]:
        """Price of 1,000 calls like the evaluated ones, per model; a local model has none."""
        from trainers.evaluate import price_per_1k_calls

        prices = self.wf.prices
        out: dict[str, dict] = {}
        if teacher_model:
            out["teacher"] = {
                "model": teacher_model,
                "usd": price_per_1k_calls(teacher_model, teacher, prices),
            }
        if run.provider == "openai":
            tuned_model = (run.result_json or {}).get("fine_tuned_model")
            out["base"] = {"model": run.model, "usd": price_per_1k_calls(run.model, base, prices)}
            out["tuned"] = {
                "model": tuned_model,
                "usd": price_per_1k_calls(tuned_model, tuned, prices),
            }
        elif out:
            out["base"] = {"model": run.model, "usd": None, "self_hosted": True}
            out["tuned"] = {
                "model": f"{run.model} + LoRA {run.id}",
                "usd": None,
                "self_hosted": True,
            }
        return out

    def _openai(self):
        import openai

        if not self.settings.openai_api_key:
            raise UserError("OPENAI_API_KEY is not set, so tunebot cannot reach OpenAI.")
        return openai.OpenAI(
            api_key=self.settings.openai_api_key,
            base_url=self.settings.openai_base_url or "https://api.openai.com/v1",
            max_retries=3,
        )

    def _judge(
        self,
        run: Run,
        n_examples: int,
        avg_prompt_tokens: float,
        *,
        answers: int = 2,
        spent_usd: float = 0.0,
    ):
        """The LLM judge when OpenAI is configured and its estimated cost, after what this
        evaluation has already spent, fits the budget."""
        from trainers.scorers import Judge

        if not self.settings.openai_api_key or not self.settings.judge_model:
            return None
        judge = Judge(
            self._openai(), self.settings.judge_model, concurrency=self.settings.eval_concurrency
        )
        estimate = judge.estimate_cost(n_examples, avg_prompt_tokens, rubric_answers=answers) or 0.0
        if self._over_budget(
            run,
            spent_usd + estimate,
            f"the LLM judge (about ${estimate:,.2f})",
            "so only the offline scorers run",
        ):
            return None
        return judge

    def _over_budget(self, run: Run, usd: float, what: str, consequence: str) -> bool:
        """Whether spending ``usd`` more would break the month's budget; if so, says so."""
        budget = self.settings.monthly_budget_usd
        if budget is None or self.runs.committed_usd() + usd <= budget:
            return False
        self.wf.post(
            run.channel,
            run.thread_ts,
            render.note(f"{run.id}: {what} would exceed this month's budget, {consequence}."),
        )
        return True

    def _upload(self, run: Run, result) -> None:
        from bot.charts import score_bars

        png = score_bars(
            [s.name for s in result.summaries],
            [s.base or 0.0 for s in result.summaries],
            [s.tuned or 0.0 for s in result.summaries],
            title=f"{run.id}: {'teacher, ' if result.teacher_model else ''}base vs tuned on held-out examples",
            teacher=[s.teacher or 0.0 for s in result.summaries] if result.teacher_model else None,
        )
        for content, filename, title in (
            (png, f"eval-{run.id}.png", f"Scores of {run.id}"),
            (result.rows_csv(), f"eval-{run.id}.csv", f"Every evaluated example of {run.id}"),
        ):
            try:
                self.wf.client.files_upload_v2(
                    channel=run.channel,
                    thread_ts=run.thread_ts,
                    content=content,
                    filename=filename,
                    title=title,
                )
            except SlackApiError as exc:
                log.error("%s for %s not uploaded: %s", filename, run.id, exc.response.get("error"))


def _embedder():
    try:
        from trainers.scorers import EmbeddingScorer
    except ImportError:
        return None
    return EmbeddingScorer() if EmbeddingScorer.available() else None
