"""/finetune distill and /finetune chat: a teacher writes data; people poke at models.

Distillation is paid, so it is a run like any other (provider "distill"):
the same plan, approval card, budget and audit. Once approved the run is
claimed (owner and lease, renewed while it works) and the teacher answers
every prompt on a job thread, with one progress message edited in place; the
answers become a new dataset, validated like an upload and linked to the
prompts it came from.

It spends what was approved: the estimate prices every answer at the
``max_tokens`` the requests carry, the actual cost is recorded in the ledger
after every chunk (so a crash keeps it), and no chunk starts unless its worst
case fits the approved amount plus `MARGIN`. Cancel stops it between chunks;
what was answered is kept. A failed progress edit never stops it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from bot import egress, render
from bot.claims import ClaimLost, Held, lapsed
from bot.commands import Command
from bot.context import Context
from bot.datasets import Datasets
from bot.errors import SpendRefused, UserError, describe
from bot.plans import DistillEstimate, DistillPlan
from bot.results import RunResult

if TYPE_CHECKING:
    from bot.evaluation import Evaluations
    from bot.run_service import RunService
    from storage import Dataset, Run

log = logging.getLogger("tunebot")

MARGIN = 0.10  # spend may exceed the approved estimate by at most this share (input counts drift)


class Distiller:
    def __init__(
        self, ctx: Context, datasets: Datasets, runs: RunService, evals: Evaluations
    ) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.runs = runs  # which builds this
        self.evals = evals
        self.store = ctx.store
        self.settings = runs.settings
        from trainers.chat_worker import ChatWorker

        # `chat` on a local run: the model loads in this worker process, never in the bot's.
        self.chat_worker = ChatWorker(
            idle_seconds=self.settings.chat_idle_seconds,
            log_path=self.settings.home / "chat-worker.log",
        )

    def request(self, cmd: Command, channel: str, user: str) -> render.Message:
        """/finetune distill: cheap checks in the ack, the pricing on a job.

        Reading and tokenising the prompts takes as long as the file is big,
        so the ack only checks the dataset and the teacher, names the run it
        will be, and hands off; the job prices it and goes the usual way
        (`Runs._put_to_approvers`: the budget, the reservation, the card). A
        refusal then goes to the dataset's thread.
        """
        dataset = self.datasets.find_dataset(channel, cmd.target)
        if not dataset.report_json:  # its secret check is not done yet
            raise UserError(
                f"{dataset.id} has no report yet: it is still being checked, or the check failed."
            )
        if cmd.options.get("system"):
            egress.check_prompt(cmd.options["system"])  # it goes to the teacher with every prompt
        teacher = self._teacher(cmd.options.get("teacher"))
        self.ctx.check_room()  # busy: say so before naming a run
        with self.store.transaction():  # one commit: the id and the recorded request
            run_id = self.store.new_run_id()
            start = self.ctx.record_work(
                "price",
                f"price:{run_id}",
                {
                    "run_id": run_id, "dataset_id": dataset.id, "teacher": teacher,
                    "system": cmd.options.get("system"), "channel": channel, "user": user,
                },
                what=f"pricing {run_id}",
                channel=channel,
                thread_ts=dataset.thread_ts,
                long=True,
            )  # fmt: skip
        if start is not None:  # a fresh id: its key cannot be held
            start()
        count = f"{dataset.examples:,} prompts" if dataset.examples is not None else "the prompts"
        return render.note(
            f"{run_id}: pricing {count} of {dataset.id} for {teacher}…, "
            f"the card follows in {dataset.id}'s thread."
        )

    def price_work(self, args: dict) -> None:
        """The job behind `request` (resumed after a restart): price, then ask the approvers."""
        run_id = args["run_id"]
        if self.store.find_run(run_id) is not None:  # recorded before a restart
            return
        dataset = self.store.get_dataset(args["dataset_id"])
        plan = self.plan(dataset, args["teacher"], args.get("system"))
        self.runs._put_to_approvers(plan.to_json(), args["channel"], args["user"], run_id=run_id)

    def _teacher(self, name: str | None) -> str:
        """The teacher's full name, once it is known to have an inference price."""
        from trainers.pricing import UnknownModel, inference_cost

        if not name:
            raise UserError("Name the teacher: `/finetune distill [dataset] teacher=gpt-4.1`.")
        try:
            teacher = self.ctx.prices.resolve(name)
        except UnknownModel as exc:
            raise UserError(str(exc)) from None
        try:
            inference_cost(teacher.name, 0, 0, self.ctx.prices)
        except ValueError as exc:
            raise UserError(
                f"{teacher.name} has no inference price, so the cost is unknown: {exc}"
            ) from None
        return teacher.name

    def plan(self, dataset: Dataset, teacher_name: str, system: str | None) -> DistillPlan:
        """Read and price the prompts (as long as the file is big: on a job, never in an ack)."""
        from trainers.distill import estimate, load_prompts

        teacher = self.ctx.prices.resolve(teacher_name)
        prompts = load_prompts(self.ctx.blobs.path(dataset.sha256), system=system)
        if not prompts.items:
            where = ", ".join(f"line {n}: {why}" for n, why in prompts.problems[:3])
            raise UserError(f"{dataset.id} has no prompts the teacher can answer ({where}).")
        max_tokens = self.settings.distill_max_tokens
        # Lines that are not chat examples were never scanned by the validator: scan them all.
        secrets = egress.secret_findings(dataset) or any(
            egress.find_secrets(json.dumps(p.messages, ensure_ascii=False)) for p in prompts.items
        )
        try:
            cost = estimate(prompts.items, teacher.name, self.ctx.prices, max_tokens=max_tokens)
        except ValueError as exc:
            raise UserError(
                f"{teacher.name} has no inference price, so the cost is unknown: {exc}"
            ) from None
        return DistillPlan(
            dataset_id=dataset.id,
            dataset_sha256=dataset.sha256,
            model=teacher.name,
            system=system,
            prompts=len(prompts.items),
            max_tokens=max_tokens,
            skipped_lines=tuple(n for n, _ in prompts.problems),
            secret_hold=bool(secrets),
            estimate=DistillEstimate(
                input_tokens=cost.input_tokens,
                output_tokens=cost.output_tokens,
                cost_usd=round(cost.cost_usd, 4),
            ),
        )

    def start(self, run: Run) -> None:
        """Approved: claim the run and distil on a job thread."""
        if not self.store.claim_run(
            run.id, [run.status if run.status in ("approved", "queued") else "approved"],
            "running", owner=(token := self.runs.claim_token()), lease=self.runs.lease,
        ):  # fmt: skip
            return
        self.ctx.submit(
            f"distilling {run.id}", lambda: self._claimed(run.id, token), run.channel,
            run.thread_ts,
            long=True,
            on_busy=lambda: self.store.transition_run(
                run.id, ["running"], "approved", owner=None, lease_expires_at=None
            ),
        )  # fmt: skip

    def poll(self, run: Run) -> None:
        """Start what was approved; fail what a dead process left running (its lease lapsed)."""
        if not lapsed(run, self.runs.clock()):
            return
        if run.status in ("approved", "queued"):
            self.start(run)
        elif run.status == "running" and self.store.transition_run(
            run.id, ["running"], "failed", error="interrupted by a restart of the bot; ask again"
        ):
            entry = self.runs.gate.ledger.open("run", run.id)
            actual = (entry.actual_usd or 0.0) if entry else 0.0  # recorded after each chunk
            self.runs.gate.settle("run", run.id, actual, note="interrupted")
            self.store.update_run(run.id, actual_usd=actual)
            self.ctx.post(run.channel, run.thread_ts, render.run_result(self.store.get_run(run.id)))

    def _claimed(self, run_id: str, token: str) -> None:
        with Held(self.store, run_id, token, self.runs.lease, "running") as held:
            try:
                self._run(run_id, held)
            except Exception as exc:
                log.error("run %s: distillation failed: %s: %s", run_id, type(exc).__name__, exc)
                self._end(
                    self.store.get_run(run_id), "failed", None,
                    error=f"tunebot stopped distilling ({describe(exc, self.settings.home)})",
                )  # fmt: skip

    def _run(self, run_id: str, held: Held) -> None:
        from trainers.distill import distill, load_prompts

        run = self.store.get_run(run_id)
        plan = DistillPlan.from_json(run.plan_json)
        gate = self.runs.gate
        reservation = gate.ledger.open("run", run.id)
        prompts = load_prompts(self.ctx.blobs.path(plan.dataset_sha256), system=plan.system)
        total = len(prompts.items)
        progress_ts = self.ctx.post(
            run.channel,
            run.thread_ts,
            render.note(f"{run.id} distilling: 0/{total:,} prompts answered"),
        )
        edited = [0.0]

        def report(done: int, total: int) -> None:
            if not progress_ts or (
                done < total and time.monotonic() - edited[0] < self.settings.progress_seconds
            ):
                return
            edited[0] = time.monotonic()
            message = render.note(f"{run.id} distilling: {done:,}/{total:,} prompts answered")
            try:  # a deleted message or a Slack outage must not stop paid work midway
                self.ctx.client.chat_update(
                    channel=run.channel, ts=progress_ts, **message.to_kwargs()
                )
            except Exception as exc:
                log.warning("run %s: progress not edited: %s", run.id, exc)

        def spent(usd: float) -> None:
            if reservation is not None:
                gate.ledger.record(reservation.id, usd)

        def cancelled(_result) -> str | None:
            if self.store.get_run(run.id).status == "cancelled":
                return "cancelled"
            try:
                held.check()
            except ClaimLost:  # another tick took the run (its lease lapsed): stop paying
                return "cancelled"
            return None

        approved = run.estimate_usd or 0.0
        cap = approved * (1 + MARGIN)
        budget = self.settings.monthly_budget_usd
        if budget is not None and reservation is not None:  # the margin never breaks the budget
            others = gate.ledger.committed(gate.since(), besides=reservation.id)
            cap = min(cap, max(budget - others, 0.0))
        result = distill(
            self.evals._openai(),
            run.model,
            prompts.items,
            concurrency=self.settings.eval_concurrency,
            max_tokens=plan.max_tokens,
            on_progress=report,
            max_usd=cap,
            prices=self.ctx.prices,
            should_stop=cancelled,
            on_spend=spent,
        )
        actual = _cost(run.model, result, self.ctx.prices)
        dataset_id = None
        if result.examples:
            source = self.store.get_dataset(plan.dataset_id)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "distilled.jsonl"
                result.write(path)
                sha, size = self.ctx.blobs.put_file(path), path.stat().st_size
            name = f"{Path(source.name or source.id).stem}-{run.model}.jsonl"
            dataset, _ = self.datasets.register(
                sha, size, name=name, channel=run.channel, thread_ts=run.thread_ts,
                user=run.requested_by, source_dataset_id=source.id,
            )  # fmt: skip
            dataset_id = dataset.id
        data = {
            "dataset_id": dataset_id,
            "failed": result.failed,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "answered": result.answered,
            "stopped": result.stopped,
        }
        if result.stopped == "cancelled":
            status, error = "cancelled", None
        elif result.stopped == "budget":
            status = "failed"
            error = (
                f"stopped at the approved ${approved:,.2f} (+{MARGIN:.0%} margin) after "
                f"{result.answered:,} of {total:,} prompts"
            )
        elif not result.examples:
            status, error = "failed", f"the teacher answered none of the {total} prompts"
        else:
            status, error = "succeeded", None
        kept = self._end(run, status, actual, error=error, data=data)
        if dataset_id and kept == "succeeded":
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.distilled(run, dataset_id, len(result.examples), result.failed, actual),
            )

    def _end(
        self,
        run: Run,
        status: str,
        actual: float | None,
        *,
        error: str | None = None,
        data: dict | None = None,
    ) -> str:
        """Record how the distillation ended and what it spent, once; say so if not a success.
        Returns the status the run has now."""
        record = RunResult.of(run).with_(**(data or {})).to_json()
        if actual is None:  # an exception: what the ledger recorded is what was spent
            entry = self.runs.gate.ledger.open("run", run.id)
            actual = (entry.actual_usd or 0.0) if entry else 0.0
        moved = self.store.transition_run(
            run.id, ["running"], status, actual_usd=actual, error=error, result_json=record
        )
        if not moved:  # cancelled meanwhile: keep the status, record the spend
            self.store.update_run(run.id, actual_usd=actual, result_json=record)
            status = self.store.get_run(run.id).status
        self.runs.gate.settle("run", run.id, actual, note=status)
        self.store.audit(
            "tunebot",
            status,
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"cost_usd": actual},
        )
        log.info("run %s: distillation %s ($%.4f)", run.id, status, actual)
        if status != "succeeded":
            self.ctx.post(run.channel, run.thread_ts, render.run_result(self.store.get_run(run.id)))
        return status

    # --- /finetune chat -------------------------------------------------------------

    def chat(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Ask the base and the tuned model of a run one prompt; paid ones through the gate."""
        run = self.runs.find_run(cmd.target, channel)
        prompt = cmd.options.get("prompt") or " ".join(cmd.args[1:])
        if not prompt.strip():
            raise UserError(
                f'Give a prompt: `/finetune chat {run.id} "How do I reset my password?"`'
            )
        if run.status != "succeeded" or not (run.provider == "local" or self.evals.hosted(run)):
            raise UserError(
                f"{run.id} is not a finished training run, so there is no tuned model to ask."
            )
        ref = None
        if run.provider != "local":  # a hosted model (OpenAI, Together, a providers-file host)
            egress.check_prompt(prompt)
            gate = self.runs.gate
            gate.require(user, requester=run.requested_by, what=f"ask {run.id}'s models")
            usd = self.chat_estimate(run, prompt)
            if gate.needs_approval(usd):
                raise SpendRefused(
                    f"Asking {run.id}'s models this would cost up to ${usd:,.2f}, above the "
                    f"${self.settings.eval_approval_above_usd:,.2f} a chat may spend without an "
                    "approval (TUNEBOT_EVAL_APPROVAL_ABOVE_USD): shorten the prompt, or ask for "
                    f"`/finetune eval {run.id} eval=<dataset>`, which goes to the approvers."
                )
            ref = f"{run.id}:{uuid.uuid4().hex[:12]}"
            gate.reserve(
                "chat", ref, usd, what=f"Asking {run.id}'s models",
                run_id=run.id, channel=channel, user=user,
            )  # fmt: skip
        self.ctx.submit(
            f"asking {run.id}'s models",
            lambda: self._answer(run, prompt, ref),
            channel,
            run.thread_ts,
            long=True,
            on_busy=lambda: ref and self.runs.gate.settle("chat", ref, 0.0, note="busy"),
        )
        return render.note(
            f"Asking the base and the tuned model of {run.id}; the answers go to its thread."
        )

    def chat_estimate(self, run: Run, prompt: str) -> float:
        """The most one chat can cost: the prompt counted exactly, each answer at its limit."""
        from trainers.evaluate import CHAT_MAX_TOKENS
        from trainers.pricing import inference_cost
        from trainers.tokens import TokenCounter, chat_tokens

        tokens_in = chat_tokens(
            {"messages": [{"role": "user", "content": prompt}]}, TokenCounter()
        )[0]
        tuned = RunResult.of(run).fine_tuned_model or run.model
        try:
            return sum(
                inference_cost(model, tokens_in, CHAT_MAX_TOKENS, self.evals.prices_for(run, model))
                for model in (run.model, tuned)
            )
        except ValueError:
            raise UserError(
                f"{run.model} has no inference price in the price table, so tunebot cannot "
                "check a chat with it against the budget."
            ) from None

    def _answer(self, run: Run, prompt: str, ref: str | None) -> None:
        from trainers.evaluate import (
            CHAT_MAX_TOKENS,
            EvalExample,
            generate_openai,
            generation_cost,
        )

        example = EvalExample(0, [{"role": "user", "content": prompt}], "")
        if run.provider == "local":
            from bot.local_models import LocalModels
            from trainers.chat_worker import ChatError

            adapter = RunResult.of(run).adapter_dir
            if not adapter:
                raise UserError(f"{run.id} has no adapter to chat with.")
            base_model = LocalModels(self.settings, self.store).trained_base(run)
            try:  # in the chat worker: one chat at a time, the model kept loaded a while
                answer = self.chat_worker.ask(base_model, adapter, example.prompt)
            except ChatError as exc:
                raise UserError(f"{run.id}'s models did not answer: {exc}.") from None
            if answer.notice:
                self.ctx.post(run.channel, run.thread_ts, render.note(f"Note: {answer.notice}."))
            answers = (answer.base, answer.tuned)
        else:
            spent = 0.0
            try:
                client = self.evals.client_for(run)  # the run's host
                prices = self.evals.prices_for(run, run.model)
                tuned_model = RunResult.of(run).fine_tuned_model
                base = generate_openai(client, run.model, [example], max_tokens=CHAT_MAX_TOKENS)[0]
                spent += generation_cost(run.model, [base], prices) or 0.0
                tuned = generate_openai(client, tuned_model, [example], max_tokens=CHAT_MAX_TOKENS)[
                    0
                ]
                spent += generation_cost(tuned_model, [tuned], prices) or 0.0
            finally:
                if ref:
                    self.runs.gate.settle("chat", ref, spent)
            answers = (
                base.text or f"(failed: {base.error})",
                tuned.text or f"(failed: {tuned.error})",
            )
        self.ctx.post(run.channel, run.thread_ts, render.side_by_side(run, prompt, *answers))


def _cost(model: str, result, prices) -> float:
    from trainers.pricing import inference_cost

    return inference_cost(model, result.input_tokens, result.output_tokens, prices)
