"""Held-out data for a run, and the base-vs-tuned evaluation after it.

The split is made when the run's data is prepared, from the frozen plan
(dataset sha256, fraction, seed), so the evaluation examples are never
trained on. After a successful run the evaluation runs on the bot's job
threads: generation (OpenAI or the local adapter), scoring, then the summary,
a chart and a CSV of every row in the run's thread. A student trained on a
distilled dataset is compared with its teacher too (teacher vs base student
vs tuned student), with the price of 1,000 calls to each.

Paid parts (generation on a hosted model, the teacher, the LLM judge) go
through the spend gate: the evaluation is estimated before anything runs
(every answer at its token limit), only the run's requester or an
approver may start a paid one, an estimate above
TUNEBOT_EVAL_APPROVAL_ABOVE_USD becomes an approval request like a run, the
estimate is reserved (one open reservation per run: a second evaluation
while one is going is refused), and the actual spend is settled however it
ends. When the budget cannot cover the judge and the teacher they are left
out, with a note.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import egress, render
from bot.claims import Held, lapsed
from bot.context import Context
from bot.datasets import Datasets
from bot.errors import SpendRefused, UserError, describe, slack_error
from bot.plans import EvalEstimate, EvalPlan
from bot.results import RunResult

if TYPE_CHECKING:
    from bot.downloaded import LocalCopy
    from bot.run_service import RunService
    from storage import Run

log = logging.getLogger("tunebot")

SPLIT_SEED = 0


@dataclass(frozen=True)
class EvalCost:
    """The most an evaluation may cost, by part, in USD."""

    examples: int
    avg_prompt_tokens: float
    generation_usd: float
    teacher: str | None
    teacher_usd: float
    judge_usd: float

    @property
    def extras_usd(self) -> float:
        return self.teacher_usd + self.judge_usd

    @property
    def total_usd(self) -> float:
        return self.generation_usd + self.extras_usd


class Evaluations:
    def __init__(self, ctx: Context, datasets: Datasets, runs: RunService) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.runs = runs  # which builds this
        # Splits made in this process, by (dataset sha256, fraction, seed): the
        # same dataset requested twenty times is split once.
        self._splits: dict[tuple, dict] = {}
        self._splits_lock = threading.Lock()
        self.store = runs.store
        self.settings = runs.settings

    # --- data ------------------------------------------------------------------------

    def prepare(self, run: Run) -> dict:
        """Split (or pair) the run's data once; recorded in the run's result_json["data"]."""
        from trainers.evaluate import overlap, split_file

        existing = RunResult.of(run).data
        if existing:
            return existing
        plan = run.plan_json
        inherited = self._migrated_data(run)
        if inherited is not None:  # a migration is judged on its source's held-out set
            record = RunResult.of(run).with_(data=inherited)
            self.store.update_run(run.id, result_json=record.to_json())
            return inherited
        source = self.ctx.blobs.path(plan["dataset_sha256"])
        data: dict[str, Any] = {"train_sha256": plan["dataset_sha256"], "eval_sha256": None}
        with tempfile.TemporaryDirectory() as tmp:
            train, held = Path(tmp) / "train.jsonl", Path(tmp) / "eval.jsonl"
            if plan.get("eval_dataset_id"):
                eval_dataset = self.store.get_dataset(plan["eval_dataset_id"])
                data["eval_sha256"] = eval_dataset.sha256
                data["overlap"] = overlap(source, self.ctx.blobs.path(eval_dataset.sha256))
            elif plan.get("split"):
                key = (plan["dataset_sha256"], plan["split"], SPLIT_SEED)
                with self._splits_lock:
                    made = self._splits.get(key)
                if made and all(
                    self.ctx.blobs.exists(made[k]) for k in ("train_sha256", "eval_sha256")
                ):
                    data.update(made)  # the split is a function of (bytes, fraction, seed)
                else:
                    try:
                        info = split_file(
                            source, train, held, fraction=plan["split"], seed=SPLIT_SEED
                        )
                    except ValueError as exc:
                        data["note"] = f"no evaluation set: {exc}"
                    else:
                        data.update(
                            train_sha256=self.ctx.blobs.put_file(train),
                            eval_sha256=self.ctx.blobs.put_file(held),
                            split=info.to_dict(),
                        )
                        with self._splits_lock:
                            self._splits[key] = {
                                k: data[k] for k in ("train_sha256", "eval_sha256", "split")
                            }
        record = RunResult.of(run).with_(data=data)
        self.store.update_run(run.id, result_json=record.to_json())
        if data.get("overlap"):
            lines = ", ".join(str(n) for n in data["overlap"][:10])
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"⚠️ eval_overlap: {len(data['overlap'])} example(s) of {plan['eval_dataset_id']} "
                    f"also appear in the training data (lines {lines}); their scores will flatter the "
                    "tuned model."
                ),
            )
        return data

    def _migrated_data(self, run: Run) -> dict | None:
        """The data (training file, held-out file, split) of the run `run` migrates
        (bot/migrate.py), when it is the same dataset and its files are still here."""
        source_id = (run.plan_json or {}).get("migrated_from")
        source = self.store.find_run(source_id) if source_id else None
        if source is None or source.plan_json.get("dataset_sha256") != run.plan_json.get(
            "dataset_sha256"
        ):
            return None
        data = RunResult.of(source).data or {}
        files = [data[k] for k in ("train_sha256", "eval_sha256") if data.get(k)]
        if not data.get("train_sha256") or not all(self.ctx.blobs.exists(f) for f in files):
            return None
        return dict(data)

    # --- asking for one ----------------------------------------------------------------

    def after_success(self, run: Run) -> None:
        """A run succeeded: evaluate it on its held-out data, through the gate."""
        data = RunResult.of(run).data or {}
        if not data.get("eval_sha256"):
            note = data.get("note") or "no held-out data"
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: not evaluated ({note}). `/finetune eval {run.id} eval=<dataset>` evaluates it on another dataset."
                ),
            )
            return
        try:
            message = self._ask(run, data["eval_sha256"], None, user=None)
        except UserError as exc:
            message = render.note(f"{run.id}: not evaluated: {exc.summary}")
        if message is not None:
            self.ctx.post(run.channel, run.thread_ts, message)

    def request(
        self, run_ref: str | None, channel: str, eval_ref: str | None, user: str
    ) -> render.Message:
        run = self.runs.find_run(run_ref, channel)
        if run.status != "succeeded" or not (run.provider == "local" or self.hosted(run)):
            raise UserError(
                f"{run.id} is {run.status}: only a succeeded training run can be evaluated."
            )
        eval_sha, eval_dataset_id = self.held_out(run, channel, eval_ref)
        message = self._ask(run, eval_sha, eval_dataset_id, user=user)
        return message or render.note(f"Evaluating {run.id}; the results go to its thread.")

    def held_out(self, run: Run, channel: str, eval_ref: str | None) -> tuple[str, str | None]:
        """(sha256, dataset id or None) of what `run` is evaluated on: the dataset
        `eval=` names, else the run's recorded held-out split. UserError if neither."""
        eval_dataset_id = None
        if eval_ref:
            dataset = self.datasets.find_dataset(channel, eval_ref)
            if not dataset.report_json:  # its secret check is not done yet
                raise UserError(
                    f"{dataset.id} has no report yet: it is still being checked, or the check failed."
                )
            if (dataset.errors or 0) > 0:
                raise UserError(f"{dataset.id} has errors and cannot be an eval set.")
            eval_sha, eval_dataset_id = dataset.sha256, dataset.id
        else:
            source = run.plan_json.get("eval_dataset_id") or run.dataset_id
            self.datasets.find_dataset(channel, source)  # "d3 was forgotten on … by @x"
            eval_sha = (RunResult.of(run).data or {}).get("eval_sha256")
            if not eval_sha:
                raise UserError(f"{run.id} has no held-out data: name one with eval=<dataset>.")
        return eval_sha, eval_dataset_id

    def _ask(
        self, run: Run, eval_sha: str, eval_dataset_id: str | None, *, user: str | None
    ) -> render.Message | None:
        """Estimate, check who and how much, then reserve and start, or ask for approval.

        `user` None is tunebot itself, after a run it was approved to make.
        Returns the answer for the asker (None: started, nothing to add).
        """
        from trainers.evaluate import examples_from_file

        examples = examples_from_file(self.ctx.blobs.path(eval_sha))
        if not examples:
            raise UserError(
                f"The evaluation set of {run.id} has no example with an assistant turn."
            )
        cost = self.estimate(run, examples)
        gate = self.runs.gate
        source = eval_dataset_id or run.plan_json.get("eval_dataset_id") or run.dataset_id
        held = egress.held(self.store, [self.store.find_dataset(source)])
        if held and self.hosted(run):
            raise UserError(
                f"{run.id}'s evaluation would send {held[0].id}'s examples to "
                f"{render.provider_name(run.provider)}, but " + egress.held_words(held) + "."
            )
        if held and cost.extras_usd:
            cost = EvalCost(
                cost.examples, cost.avg_prompt_tokens, cost.generation_usd, None, 0.0, 0.0
            )
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: the LLM judge and any teacher are left out of the evaluation: "
                    + egress.held_words(held)
                    + "."
                ),
            )
        teacher = self.teacher_of(run)
        if teacher and not self.settings.openai_api_key:
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run.id}: its data was distilled from {teacher}, but OPENAI_API_KEY is not set, so the teacher is left out of the comparison."
                ),
            )
        if cost.total_usd > 0 and user is not None:
            gate.require(user, requester=run.requested_by, what=f"evaluate {run.id}")
        if self._waiting_approval(run.id):
            raise SpendRefused(f"An evaluation of {run.id} is already waiting for approval.")
        if cost.total_usd > 0 and gate.needs_approval(cost.total_usd):
            if user is None:
                return render.note(
                    f"{run.id}: its evaluation would cost about ${cost.total_usd:,.2f}, above the "
                    f"${self.settings.eval_approval_above_usd:,.2f} that needs an approval "
                    f"(TUNEBOT_EVAL_APPROVAL_ABOVE_USD): `/finetune eval {run.id}` asks for one."
                )
            return self.runs._put_to_approvers(
                self._plan(run, eval_sha, eval_dataset_id, cost).to_json(), run.channel, user
            )
        reservation, cost, left_out = self._reserve(run, cost, user)
        if left_out:
            self.ctx.post(run.channel, run.thread_ts, render.note(f"{run.id}: {left_out}"))
        self.ctx.submit(
            f"evaluating {run.id}",
            lambda: self._reserved(run.id, eval_sha, eval_dataset_id, cost, reservation.id),
            run.channel,
            run.thread_ts,
            long=True,
            on_busy=lambda: self.runs.gate.settle("eval", run.id, 0.0, note="busy"),
        )
        return None

    def _reserve(self, run: Run, cost: EvalCost, user: str | None):
        """Reserve the whole estimate; if the budget cannot take the judge and the
        teacher, reserve generation alone and say what was left out."""
        gate = self.runs.gate
        common = {
            "what": f"An evaluation of {run.id}",
            "run_id": run.id,
            "channel": run.channel,
            "user": user,
        }
        try:
            return gate.reserve("eval", run.id, cost.total_usd, **common), cost, None
        except SpendRefused as exc:
            if not cost.extras_usd or gate.ledger.open("eval", run.id) is not None:
                raise
            full = exc.summary
        reduced = EvalCost(
            cost.examples, cost.avg_prompt_tokens, cost.generation_usd, None, 0.0, 0.0
        )
        reservation = gate.reserve("eval", run.id, reduced.total_usd, **common)
        parts = [
            part
            for part, usd in (
                ("the LLM judge", cost.judge_usd),
                (f"the teacher {cost.teacher}", cost.teacher_usd),
            )
            if usd
        ]
        return reservation, reduced, f"{' and '.join(parts)} left out of the evaluation: {full}"

    def _waiting_approval(self, run_id: str) -> bool:
        open_evals = self.store.runs(
            status=["pending_approval", "approved", "running"], provider="eval", limit=None
        )
        return any(EvalPlan.from_json(r.plan_json).target_run == run_id for r in open_evals)

    def _plan(
        self, run: Run, eval_sha: str, eval_dataset_id: str | None, cost: EvalCost
    ) -> EvalPlan:
        return EvalPlan(
            dataset_id=run.dataset_id,
            dataset_sha256=run.plan_json.get("dataset_sha256"),
            model=run.model,
            target_run=run.id,
            eval_sha256=eval_sha,
            eval_dataset_id=eval_dataset_id,
            examples=cost.examples,
            teacher=cost.teacher,
            judge=cost.judge_usd > 0,
            estimate=EvalEstimate(
                cost_usd=round(cost.total_usd, 4),
                generation_usd=round(cost.generation_usd, 4),
                teacher_usd=round(cost.teacher_usd, 4),
                judge_usd=round(cost.judge_usd, 4),
            ),
        )

    def estimate(self, run: Run, examples) -> EvalCost:
        """The most this evaluation may cost: every answer at ANSWER_MAX_TOKENS.

        Raises UserError when a paid model has no price (the budget cannot be checked).
        """
        from trainers.evaluate import ANSWER_MAX_TOKENS
        from trainers.pricing import inference_cost

        n = len(examples)
        avg_prompt = sum(len(e.prompt_text) for e in examples) / n / 4  # ~4 characters a token
        tokens_in, tokens_out = round(n * avg_prompt), n * ANSWER_MAX_TOKENS

        def price(model: str | None) -> float:
            if not model:
                return 0.0
            try:
                return inference_cost(model, tokens_in, tokens_out, self.prices_for(run, model))
            except ValueError:
                raise UserError(
                    f"{model} has no inference price in the price table, so tunebot cannot "
                    "check an evaluation of it against the budget."
                ) from None

        generation = 0.0
        if self.hosted(run):
            tuned = RunResult.of(run).fine_tuned_model
            if not tuned:
                raise UserError(f"{run.id} has no fine-tuned model id to evaluate.")
            generation = price(run.model) + price(tuned)
        teacher = self.teacher_of(run) if self.settings.openai_api_key else None
        judge = self._judge_for(run)
        judge_usd = 0.0
        if judge is not None:
            answers = 3 if teacher else 2
            judge_usd = judge.estimate_cost(n, avg_prompt, rubric_answers=answers) or 0.0
        return EvalCost(n, avg_prompt, generation, teacher, price(teacher), judge_usd)

    # --- approved evaluations (provider "eval") ----------------------------------------------

    def start_approved(self, run: Run) -> None:
        if self.store.claim_run(
            run.id, ["approved"], "running", owner=(token := self.runs.claim_token()),
            lease=self.runs.lease,
        ):  # fmt: skip
            self.ctx.submit(
                f"evaluating for {run.id}",
                lambda: self._approved(run.id, token),
                run.channel,
                run.thread_ts,
                long=True,
                on_busy=lambda: self.store.transition_run(
                    run.id, ["running"], "approved", owner=None, lease_expires_at=None
                ),
            )

    def poll(self, run: Run) -> None:
        """Start what was approved; fail what a dead process left running (lease lapsed)."""
        if not lapsed(run, self.runs.clock()):
            return
        if run.status == "approved":
            self.start_approved(run)
        elif run.status == "running" and self.store.transition_run(
            run.id, ["running"], "failed", error="interrupted by a restart of the bot; ask again"
        ):
            entry = self.runs.gate.ledger.open("run", run.id)
            # What it spent before the crash is not known: count the most it could have.
            actual = max(entry.estimate_usd, entry.actual_usd or 0.0) if entry else 0.0
            self.runs.gate.settle("run", run.id, actual, note="interrupted")
            self.store.update_run(run.id, actual_usd=actual)
            self.ctx.post(run.channel, run.thread_ts, render.run_result(self.store.get_run(run.id)))

    def _approved(self, run_id: str, token: str) -> None:
        run = self.store.get_run(run_id)
        plan = EvalPlan.from_json(run.plan_json)
        gate = self.runs.gate
        entry = gate.ledger.open("run", run.id)
        spent = [0.0]

        def on_spend(usd: float) -> None:
            spent[0] = usd
            if entry is not None:
                gate.ledger.record(entry.id, usd)

        status, error = "succeeded", None
        with Held(self.store, run_id, token, self.runs.lease, "running"):
            estimate = plan.estimate
            cost = EvalCost(
                plan.examples, 0.0, estimate.generation_usd, plan.teacher,
                estimate.teacher_usd, estimate.judge_usd,
            )  # fmt: skip
            try:
                self.evaluate(
                    plan.target_run, plan.eval_sha256, plan.eval_dataset_id,
                    cost=cost, on_spend=on_spend,
                    stop=lambda: self.store.get_run(run_id).status == "cancelled",
                )  # fmt: skip
            except Exception as exc:
                status = "failed"
                error = (
                    exc.summary if isinstance(exc, UserError) else describe(exc, self.settings.home)
                )
            if not self.store.transition_run(
                run_id, ["running"], status, actual_usd=spent[0], error=error
            ):
                self.store.update_run(run_id, actual_usd=spent[0])
            gate.settle("run", run_id, spent[0], note=status)
        if status != "succeeded":
            self.ctx.post(run.channel, run.thread_ts, render.run_result(self.store.get_run(run_id)))

    # --- the evaluation -----------------------------------------------------------------

    def _reserved(
        self,
        run_id: str,
        eval_sha: str,
        eval_dataset_id: str | None,
        cost: EvalCost,
        reservation_id: int,
    ) -> None:
        """Run an evaluation whose estimate is reserved; settle at what it spent, whatever happens."""
        spent = [0.0]
        ledger = self.runs.gate.ledger

        def on_spend(usd: float) -> None:
            spent[0] = usd
            ledger.record(reservation_id, usd)

        try:
            self.evaluate(run_id, eval_sha, eval_dataset_id, cost=cost, on_spend=on_spend)
        finally:
            ledger.settle(reservation_id, spent[0])

    def evaluate(
        self,
        run_id: str,
        eval_sha: str | None = None,
        eval_dataset_id: str | None = None,
        *,
        cost: EvalCost | None = None,
        on_spend: Callable[[float], None] | None = None,
        stop: Callable[[], bool] | None = None,
        local: LocalCopy | None = None,
    ) -> None:
        """Generate, score, store and post.

        `cost` says which paid parts were reserved (None: every part the settings
        allow); `on_spend(usd)` gets the spend so far after each paid part;
        `stop()` true between parts ends it early (cancelled), nothing posted.
        `local`: a hosted run's downloaded adapter and base (bot/downloaded.py)
        answer here instead of the host, and the message says so.
        """
        from trainers.evaluate import examples_from_file, score

        run = self.store.get_run(run_id)
        data = RunResult.of(run).data or {}
        eval_sha = eval_sha or data.get("eval_sha256")
        examples = examples_from_file(self.ctx.blobs.path(eval_sha))
        if not examples:
            raise UserError(
                f"The evaluation set of {run.id} has no example with an assistant turn."
            )
        cost = cost or self.estimate(run, examples)
        spent = [0.0]

        def paid(usd: float) -> None:
            spent[0] += usd
            if on_spend is not None:
                on_spend(spent[0])

        if local is not None:
            from trainers.evaluate import generate_local

            base, tuned = generate_local(str(local.base), local.adapter, examples)
            generation_cost = 0.0
        else:
            base, tuned, generation_cost = self._generate(run, examples)
        paid(generation_cost)
        teacher_model, teacher = None, None
        if cost.teacher and not (stop and stop()):
            teacher_model, teacher, teacher_cost = self._teacher(cost.teacher, examples)
            paid(teacher_cost)
        if stop is not None and stop():
            log.info("run %s: evaluation stopped (cancelled)", run.id)
            return
        judge = self._judge_for(run) if cost.judge_usd > 0 else None
        result = score(
            examples,
            base,
            tuned,
            judge=judge,
            embedder=_embedder(),
            teacher_outputs=teacher,
            teacher_model=teacher_model,
        )
        paid(result.judge_cost_usd or 0.0)
        cost = spent[0]
        prices = {} if local else self._prices_per_1k(run, base, tuned, teacher_model, teacher)
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
        if local is not None:
            summary["local"] = {"base": local.base_name, "adapter": local.adapter_name}
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
        self.ctx.post(
            run.channel,
            run.thread_ts,
            render.eval_summary(
                run,
                result,
                cost_usd=cost,
                prices_per_1k=prices,
                local=local and local.label,
                base_name=local and local.base_name,
            ),
        )
        self._upload(run, result)

    def _generate(self, run: Run, examples) -> tuple[list, list, float]:
        from trainers.evaluate import generate_local, generate_openai, generation_cost

        if run.provider == "local":
            adapter = RunResult.of(run).adapter_dir
            if not adapter:
                raise UserError(f"{run.id} has no adapter to evaluate.")
            from bot.local_models import LocalModels

            # What the worker trained on (its spec): `model=r3` or a folder, resolved at launch.
            base_model = LocalModels(self.settings, self.store).trained_base(run)
            base, tuned = generate_local(base_model, adapter, examples)
            return base, tuned, 0.0
        client = self.client_for(run)
        tuned_model = RunResult.of(run).fine_tuned_model
        if not tuned_model:
            raise UserError(f"{run.id} has no fine-tuned model id to evaluate.")
        concurrency = self.settings.eval_concurrency
        base = generate_openai(client, run.model, examples, concurrency=concurrency)
        tuned = generate_openai(client, tuned_model, examples, concurrency=concurrency)
        prices = self.prices_for(run, run.model)
        cost = (generation_cost(run.model, base, prices) or 0.0) + (
            generation_cost(tuned_model, tuned, prices) or 0.0
        )
        return base, tuned, cost

    def teacher_of(self, run: Run) -> str | None:
        """The teacher model whose distillation wrote ``run``'s training data, if one did."""
        if not (run.provider == "local" or self.hosted(run)):
            return None
        for distill in self.store.runs(status="succeeded", provider="distill", limit=None):
            if RunResult.of(distill).dataset_id == run.dataset_id:
                return distill.model
        return None

    def _teacher(self, teacher: str, examples) -> tuple[str, list, float]:
        """(teacher, its answers, their cost) for a student of a distillation.

        The teacher answers the held-out prompts afresh, at temperature 0 like
        the students, so all three are graded the same way.
        """
        from trainers.evaluate import generate_openai, generation_cost

        answers = generate_openai(
            self._openai(), teacher, examples, concurrency=self.settings.eval_concurrency
        )
        return teacher, answers, generation_cost(teacher, answers, self.ctx.prices) or 0.0

    def _prices_per_1k(
        self, run: Run, base, tuned, teacher_model: str | None, teacher
    ) -> dict[str, dict]:
        """Price of 1,000 calls like the evaluated ones, per model; a local model has none."""
        from trainers.evaluate import price_per_1k_calls

        prices = self.ctx.prices
        out: dict[str, dict] = {}
        if teacher_model:
            out["teacher"] = {
                "model": teacher_model,
                "usd": price_per_1k_calls(teacher_model, teacher, prices),
            }
        if self.hosted(run):
            tuned_model = RunResult.of(run).fine_tuned_model
            prices = self.prices_for(run, run.model)
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

    def hosted(self, run: Run) -> bool:
        """A run whose tuned model answers through a hosted chat-completions API."""
        return self.runs.backends.kind(run.provider) in ("openai", "together")

    def client_for(self, run: Run):
        """The OpenAI client that reaches a run's models: OpenAI's for provider=openai;
        for another host its OpenAI-compatible chat completions (Together's at
        ``<base URL>/v1``, a providers-file host at its base URL), with its key."""
        if run.provider == "openai":
            return self._openai()
        import openai

        kind, api_key, base_url = self.runs.backends.credentials(run.provider)
        if kind == "together":
            from trainers.together_ft import DEFAULT_BASE_URL

            base_url = (base_url or DEFAULT_BASE_URL).rstrip("/") + "/v1"
        base_url = base_url or "https://api.openai.com/v1"  # kind openai with no URL: OpenAI
        return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=3)

    def prices_for(self, run: Run, model: str):
        """The price table `model`'s calls are priced from: the workflow's for OpenAI's
        models (the judge and the teacher included); for a run on another host, its base
        and tuned models at the host's inference price (the providers file's model, or
        the price file's Together rate for the model's size). UserError when it has none."""
        if run.provider == "openai" or not self.hosted(run):
            return self.ctx.prices
        tuned = RunResult.of(run).fine_tuned_model
        if model not in (run.model, tuned):
            return self.ctx.prices
        from trainers import pricing

        rates = self.host_rates(run.provider, run.model)
        if rates is None:
            raise UserError(
                f"{run.model} has no inference price on {render.provider_name(run.provider)} "
                "in tunebot's price table, so an evaluation of it cannot be checked against "
                "the budget; add one ("
                + (
                    "input_per_1m and output_per_1m in the providers file"
                    if run.provider in self.ctx.providers
                    else "inference_per_1m in TUNEBOT_PRICES' together.sizes"
                )
                + ")."
            )
        names = [n for n in (run.model, tuned) if n]
        return pricing.PriceTable(
            tuple(
                pricing.ModelPrice(
                    name,
                    0.0,
                    1,
                    aliases=(name.lower(),),
                    input_per_1m=rates[0],
                    output_per_1m=rates[1],
                    ft_input_per_1m=rates[0],
                    ft_output_per_1m=rates[1],
                )
                for name in names
            )
        )

    def host_rates(self, provider: str, model: str) -> tuple[float, float] | None:
        """USD per 1M tokens (in, out) of `model` and the models tuned from it on a host
        other than OpenAI: a providers-file host's own model list (input_per_1m,
        output_per_1m), or for provider=together the price file's inference_per_1m for
        the model's size (TUNEBOT_PRICES' together.sizes; the built-in table, read from
        together.ai/pricing, has none). None when no price is known."""
        from trainers import together_pricing

        configured = self.ctx.providers.get(provider)
        if configured is not None:
            listed = configured.model(model)
            rates = (listed.input_per_1m, listed.output_per_1m) if listed else (None, None)
        else:
            size = together_pricing.params_billions(model)
            rate = self.ctx.prices.together.inference(size) if size else None
            rates = (rate, rate)
        return None if None in rates else rates  # type: ignore[return-value]

    def _openai(self):
        import openai

        if not self.settings.openai_api_key:
            raise UserError("OPENAI_API_KEY is not set, so tunebot cannot reach OpenAI.")
        return openai.OpenAI(
            api_key=self.settings.openai_api_key,
            base_url=self.settings.openai_base_url or "https://api.openai.com/v1",
            max_retries=3,
        )

    def _judge_for(self, run: Run):
        """The LLM judge when OpenAI and a judge model are configured, else None."""
        from trainers.scorers import Judge

        if not self.settings.openai_api_key or not self.settings.judge_model:
            return None
        return Judge(
            self._openai(), self.settings.judge_model, concurrency=self.settings.eval_concurrency
        )

    def _upload(self, run: Run, result) -> None:
        from bot.charts import score_bars

        png = self.ctx.draw(
            score_bars,
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
            if content is None:  # the chart could not be drawn (logged)
                continue
            try:
                self.ctx.client.files_upload_v2(
                    channel=run.channel,
                    thread_ts=run.thread_ts,
                    content=content,
                    filename=filename,
                    title=title,
                )
            except Exception as exc:  # Slack refused, or could not be reached
                log.error("%s for %s not uploaded: %s", filename, run.id, slack_error(exc))


def _embedder():
    try:
        from trainers.scorers import EmbeddingScorer
    except ImportError:
        return None
    return EmbeddingScorer() if EmbeddingScorer.available() else None
