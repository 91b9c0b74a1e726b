"""/finetune distill and /finetune chat: a teacher writes data; people poke at models.

Distillation is paid, so it is a run like any other (provider "distill"):
the same plan, approval card, budget and audit. Once approved the teacher
answers every prompt on a job thread, with one progress message edited in
place; the answers become a new dataset, validated like an upload and linked
to the prompts it came from.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from bot import render
from bot.commands import Command
from bot.workflow import UserError

if TYPE_CHECKING:
    from bot.runs import Runs
    from storage import Run

log = logging.getLogger("tunebot")


class Distiller:
    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.wf = runs.wf
        self.store = runs.store
        self.settings = runs.settings
        self._active: set[str] = set()  # runs distilling in this process
        self._lock = threading.Lock()

    def plan(self, cmd: Command, channel: str) -> dict:
        from trainers.distill import estimate, load_prompts
        from trainers.pricing import UnknownModel

        dataset = self.wf.find_dataset(channel, cmd.target)
        teacher_name = cmd.options.get("teacher")
        if not teacher_name:
            raise UserError("Name the teacher: `/finetune distill [dataset] teacher=gpt-4.1`.")
        try:
            teacher = self.wf.prices.resolve(teacher_name)
        except UnknownModel as exc:
            raise UserError(str(exc)) from None
        prompts = load_prompts(self.wf.blobs.path(dataset.sha256), system=cmd.options.get("system"))
        if not prompts.items:
            where = ", ".join(f"line {n}: {why}" for n, why in prompts.problems[:3])
            raise UserError(f"{dataset.id} has no prompts the teacher can answer ({where}).")
        try:
            cost = estimate(prompts.items, teacher.name, self.wf.prices)
        except ValueError as exc:
            raise UserError(
                f"{teacher.name} has no inference price, so the cost is unknown: {exc}"
            ) from None
        return {
            "kind": "distill",
            "dataset_id": dataset.id,
            "dataset_sha256": dataset.sha256,
            "provider": "distill",
            "model": teacher.name,
            "system": cmd.options.get("system"),
            "prompts": len(prompts.items),
            "skipped_lines": [n for n, _ in prompts.problems],
            "secret_hold": "possible_secret" in (dataset.report_json or {}).get("codes", {}),
            "estimate": {
                "billed_tokens": cost.input_tokens + cost.output_tokens,
                "input_tokens": cost.input_tokens,
                "output_tokens": cost.output_tokens,
                "cost_usd": round(cost.cost_usd, 4),
                "price_per_1m": 0.0,
            },
        }

    def start(self, run: Run) -> None:
        """Approved: distil on a job thread (the poller notices if this process dies)."""
        if not self.store.transition_run(
            run.id, ["queued"], "running", external_id=f"distill:{run.id}"
        ):
            return
        with self._lock:
            self._active.add(run.id)
        self.wf.submit(
            f"distilling {run.id}", lambda: self._run(run.id), run.channel, run.thread_ts
        )

    def poll(self, run: Run) -> None:
        """A distillation this process is not running was cut off by a restart."""
        with self._lock:
            if run.id in self._active:
                return
        if self.store.transition_run(
            run.id, ["running"], "failed", error="interrupted by a restart of the bot; ask again"
        ):
            self.wf.post(run.channel, run.thread_ts, render.run_result(self.store.get_run(run.id)))

    def _run(self, run_id: str) -> None:
        from trainers.distill import distill, load_prompts
        from trainers.pricing import inference_cost

        run = self.store.get_run(run_id)
        plan = run.plan_json
        try:
            prompts = load_prompts(
                self.wf.blobs.path(plan["dataset_sha256"]), system=plan.get("system")
            )
            progress_ts = self.wf.post(
                run.channel,
                run.thread_ts,
                render.note(f"{run.id} distilling: 0/{len(prompts.items):,} prompts answered"),
            )

            def report(done: int, total: int) -> None:
                if progress_ts:
                    message = render.note(
                        f"{run.id} distilling: {done:,}/{total:,} prompts answered"
                    )
                    self.wf.client.chat_update(
                        channel=run.channel, ts=progress_ts, **message.to_kwargs()
                    )

            result = distill(
                self.runs.evals._openai(),
                run.model,
                prompts.items,
                concurrency=self.settings.eval_concurrency,
                on_progress=report,
            )
            actual = inference_cost(
                run.model, result.input_tokens, result.output_tokens, self.wf.prices
            )
            if not result.examples:
                self._end(
                    run,
                    "failed",
                    actual,
                    error=f"the teacher answered none of the {len(prompts.items)} prompts",
                )
                return
            source = self.store.get_dataset(plan["dataset_id"])
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "distilled.jsonl"
                result.write(path)
                sha, size = self.wf.blobs.put_file(path), path.stat().st_size
            name = f"{Path(source.name or source.id).stem}-{run.model}.jsonl"
            dataset, _ = self.wf.register(
                sha, size, name=name, channel=run.channel, thread_ts=run.thread_ts,
                user=run.requested_by, source_dataset_id=source.id,
            )  # fmt: skip
            self._end(
                run,
                "succeeded",
                actual,
                data={
                    "dataset_id": dataset.id,
                    "failed": result.failed,
                    "input_tokens": result.input_tokens,
                    "output_tokens": result.output_tokens,
                },
            )
            self.wf.post(
                run.channel,
                run.thread_ts,
                render.distilled(run, dataset.id, len(result.examples), result.failed, actual),
            )
        finally:
            with self._lock:
                self._active.discard(run_id)

    def _end(
        self,
        run: Run,
        status: str,
        actual: float,
        *,
        error: str | None = None,
        data: dict | None = None,
    ) -> None:
        record = {**(run.result_json or {}), **(data or {})}
        if self.store.transition_run(
            run.id, ["running"], status, actual_usd=actual, error=error, result_json=record
        ):
            self.store.audit(
                "tunebot",
                status,
                run_id=run.id,
                plan_hash=run.plan_hash,
                detail={"cost_usd": actual},
            )
            log.info("run %s: distillation %s ($%.4f)", run.id, status, actual)
            if error:
                self.wf.post(
                    run.channel, run.thread_ts, render.run_result(self.store.get_run(run.id))
                )

    # --- /finetune chat -------------------------------------------------------------

    def chat(self, cmd: Command, channel: str) -> render.Message:
        run = self.runs._find_run(cmd.target, channel)
        prompt = cmd.options.get("prompt") or " ".join(cmd.args[1:])
        if not prompt.strip():
            raise UserError(
                f'Give a prompt: `/finetune chat {run.id} "How do I reset my password?"`'
            )
        if run.status != "succeeded" or run.provider not in ("openai", "local"):
            raise UserError(
                f"{run.id} is not a finished training run, so there is no tuned model to ask."
            )
        self.wf.submit(
            f"asking {run.id}'s models", lambda: self._answer(run, prompt), channel, run.thread_ts
        )
        return render.note(
            f"Asking the base and the tuned model of {run.id}; the answers go to its thread."
        )

    def _answer(self, run: Run, prompt: str) -> None:
        from trainers.evaluate import EvalExample, generate_local, generate_openai

        example = EvalExample(0, [{"role": "user", "content": prompt}], "")
        if run.provider == "local":
            from trainers import models

            base_model = models.resolve(run.model, self.settings.home / "models")
            base, tuned = generate_local(
                base_model, (run.result_json or {})["adapter_dir"], [example]
            )
            answers = (base[0], tuned[0])
        else:
            client = self.runs.evals._openai()
            tuned_model = (run.result_json or {}).get("fine_tuned_model")
            base = generate_openai(client, run.model, [example])[0]
            tuned = generate_openai(client, tuned_model, [example])[0]
            answers = (
                base.text or f"(failed: {base.error})",
                tuned.text or f"(failed: {tuned.error})",
            )
        self.wf.post(run.channel, run.thread_ts, render.side_by_side(run, prompt, *answers))
