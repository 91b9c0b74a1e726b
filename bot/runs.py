"""Training runs: request -> approve -> start -> poll -> report.

The database is the source of truth. Every state change is a conditional
UPDATE (`Store.transition_run`), so twenty simultaneous clicks, a Slack retry
or a scheduler tick racing a click move a run once, and only the caller that
moved it acts on it: one job submitted, one completion message.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slack_sdk.errors import SlackApiError

from bot import approvals, render
from bot.approvals import Policy
from bot.commands import Command
from bot.workflow import UserError, Workflow
from storage import Dataset, Run
from trainers import pricing

if TYPE_CHECKING:
    from trainers.openai_ft import OpenAIFineTuner

log = logging.getLogger("tunebot")

ACTIVE = ("approved", "queued", "running")  # committed at their estimate
FINISHED = ("succeeded", "failed", "cancelled")
SPLIT_DEFAULT = 0.1


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Runs:
    def __init__(
        self,
        workflow: Workflow,
        *,
        tuner: Callable[[], OpenAIFineTuner] | None = None,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.wf = workflow
        self.store = workflow.store
        self.settings = workflow.settings
        self.clock = clock
        self._tuner_factory = tuner or self._default_tuner
        self._tuner: OpenAIFineTuner | None = None
        self._local_lock = threading.Lock()
        # Extra worker spec fields (tests shorten runs with max_steps, save_steps).
        self.local_overrides: dict[str, Any] = {}
        from bot.evaluation import Evaluations

        self.evals = Evaluations(self)
        from bot.distillation import Distiller

        self.distiller = Distiller(self)

    # --- collaborators -------------------------------------------------------------

    def _default_tuner(self) -> OpenAIFineTuner:
        from trainers.openai_ft import OpenAIFineTuner

        if not self.settings.openai_api_key:
            raise UserError("OPENAI_API_KEY is not set, so tunebot cannot reach OpenAI.")
        return OpenAIFineTuner.from_settings(
            self.settings.openai_api_key, self.settings.openai_base_url or None
        )

    @property
    def tuner(self) -> OpenAIFineTuner:
        if self._tuner is None:
            self._tuner = self._tuner_factory()
        return self._tuner

    def policy(self) -> Policy:
        s = self.settings
        return Policy(
            approvers=frozenset(self._resolve_approvers(s.approvers)),
            required=s.required_approvals,
            two_approvals_above_usd=s.two_approvals_above_usd,
            max_run_usd=s.max_run_usd,
            monthly_budget_usd=s.monthly_budget_usd,
            ttl=dt.timedelta(hours=s.approval_ttl_hours),
            local_needs_approval=s.local_needs_approval,
        )

    def _resolve_approvers(self, ids: tuple[str, ...]) -> set[str]:
        users = set()
        for ident in ids:
            if ident.startswith("S"):  # a user group: its members approve
                try:
                    users.update(self.wf.client.usergroups_users_list(usergroup=ident)["users"])
                except SlackApiError as exc:
                    log.error("cannot list user group %s: %s", ident, exc.response.get("error"))
            else:
                users.add(ident)
        return users

    def committed_usd(self) -> float:
        """This calendar month's spend: active runs at estimate, finished at actual, evals."""
        since = approvals.month_start(self.clock())
        total = 0.0
        for run in self.store.runs(limit=None):
            if run.created_at < since:
                continue
            if run.status in ACTIVE:
                total += run.estimate_usd or 0.0
            elif run.status in FINISHED:
                total += run.actual_usd or 0.0
            total += sum(e.cost_usd or 0.0 for e in self.store.evals(run.id))
        return total

    # --- /finetune train --------------------------------------------------------------

    def request(self, cmd: Command, channel: str, user: str) -> render.Message:
        if cmd.name == "distill":
            return self._put_to_approvers(self.distiller.plan(cmd, channel), channel, user)
        dataset = self.wf.find_dataset(channel, cmd.target)
        report = self.wf.stored_report(dataset)
        if report.has_errors:
            codes = ", ".join(f"{c} ×{n}" for c, n in _error_codes(dataset).items())
            raise UserError(
                f"{dataset.id} has {len(report.errors):,} error(s) and cannot be trained: {codes}.",
                "Fix them and upload the file again; `/finetune validate` shows where they are.",
            )
        opts = cmd.options
        provider = opts.get("provider", self.settings.default_provider).lower()
        if provider not in ("openai", "local"):
            raise UserError(f"provider must be openai or local, not `{provider}`.")
        if provider == "local":
            plan = self._local_plan(dataset, report, opts, channel)
        else:
            plan = self._openai_plan(dataset, report, opts, channel)
        return self._put_to_approvers(plan, channel, user)

    def _put_to_approvers(self, plan: dict, channel: str, user: str) -> render.Message:
        """Check a frozen plan against the policy, record the run, and post its card."""
        dataset = self.store.get_dataset(plan["dataset_id"])
        provider = plan["provider"]
        policy = self.policy()
        estimate_usd = plan["estimate"]["cost_usd"]
        committed = self.committed_usd()
        reasons = approvals.refusals(
            policy,
            provider=provider,
            estimate_usd=estimate_usd,
            committed_usd=committed,
            requester=user,
        )
        digest = approvals.plan_hash(plan)
        if reasons:
            self.store.audit(
                user,
                "refused",
                dataset_id=dataset.id,
                plan_hash=digest,
                detail={"reasons": reasons},
            )
            raise UserError("This run cannot be requested: " + "; ".join(reasons) + ".")
        now = self.clock()
        run = self.store.add_run(
            dataset_id=dataset.id,
            eval_dataset_id=plan.get("eval_dataset_id"),
            provider=provider,
            model=plan["model"],
            status="pending_approval",
            plan_json=plan,
            plan_hash=digest,
            estimate_usd=estimate_usd,
            requested_by=user,
            channel=channel,
            thread_ts=dataset.thread_ts,
            expires_at=now + policy.ttl,
        )
        self.store.audit(
            user, "requested", run_id=run.id, dataset_id=dataset.id, plan_hash=digest, detail=plan
        )
        log.info(
            "run %s requested by %s: %s %s, $%.2f",
            run.id,
            user,
            provider,
            plan["model"],
            estimate_usd,
        )
        self.wf.submit(
            f"posting {run.id}'s approval card",
            lambda: self._post_card(run.id),
            channel,
            dataset.thread_ts,
        )
        if not approvals.needs_approval(policy, provider):
            return render.note(
                f"{run.id} accepted: it goes to the local GPU queue (see {dataset.id}'s thread)."
            )
        return render.note(f"{run.id} needs approval: the card is in {dataset.id}'s thread.")

    def _openai_plan(self, dataset: Dataset, report, opts: dict[str, str], channel: str) -> dict:
        try:
            model = self.wf.prices.resolve(opts.get("model", self.settings.default_model))
            epochs = pricing.parse_epochs(opts.get("epochs"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not model.trainable:
            raise UserError(model.retired or f"{model.name} cannot be fine-tuned.")
        if self.clock().date() >= pricing.OPENAI_FINE_TUNING_CUTOFF:
            raise UserError(pricing.openai_notices(self.clock().date())[0])
        lr_mult = _positive(opts, "lr_mult", float)
        batch = _positive(opts, "batch", int)
        suffix = opts.get("suffix")
        if suffix is not None and (
            len(suffix) > 40 or not suffix.replace("-", "").replace("_", "").isalnum()
        ):
            raise UserError("suffix= takes up to 40 letters, digits, - and _.")
        eval_id, split = self._eval_choice(opts, channel, dataset)
        counts = _training_share(report.token_counts, split)
        estimate = pricing.estimate(counts, model, epochs, today=self.clock().date())
        return {
            "dataset_id": dataset.id,
            "dataset_sha256": dataset.sha256,
            "provider": "openai",
            "model": model.name,
            "epochs": estimate.epochs,
            "epochs_auto": epochs is None,
            "lr_mult": lr_mult,
            "batch": batch,
            "suffix": suffix,
            "eval_dataset_id": eval_id,
            "split": split,
            "secret_hold": "possible_secret" in (dataset.report_json or {}).get("codes", {}),
            "estimate": {
                "billed_tokens": estimate.billed_tokens,
                "cost_usd": round(estimate.cost_usd, 4),
                "price_per_1m": model.training_per_1m,
            },
        }

    def _local_plan(self, dataset: Dataset, report, opts: dict[str, str], channel: str) -> dict:
        unknown = sorted(set(opts) & {"lr_mult", "suffix"})
        if unknown:
            raise UserError(
                f"`{unknown[0]}=` is for provider=openai; local runs take lr=, r=, alpha=, …"
            )
        try:
            epochs = pricing.parse_epochs(opts.get("epochs")) or pricing.DEFAULT_EPOCHS
        except ValueError as exc:
            raise UserError(str(exc)) from None
        model = opts.get("model", self.settings.local_base_model)
        targets = opts.get("targets", "all-linear")
        if targets != "all-linear" and not all(t.strip() for t in targets.split(",")):
            raise UserError("targets= takes all-linear, or module names like q,k,v,o.")
        max_length = _positive(opts, "max_length", int) or 2048
        eval_id, split = self._eval_choice(opts, channel, dataset)
        params = _params_billions(model)
        qlora = _flag(opts, "qlora")
        local = pricing.local_estimate(
            _training_share(report.token_counts, split),
            params_billions=params,
            epochs=epochs,
            max_length=max_length,
            qlora=bool(qlora),
        )
        return {
            "dataset_id": dataset.id,
            "dataset_sha256": dataset.sha256,
            "provider": "local",
            "model": model,
            "epochs": epochs,
            "epochs_auto": False,
            "lr": _positive(opts, "lr", float) or 2e-4,
            "batch": _positive(opts, "batch", int) or 4,
            "r": _positive(opts, "r", int) or 16,
            "alpha": _positive(opts, "alpha", int) or 32,
            "targets": targets,
            "max_length": max_length,
            "qlora": qlora,
            "merge": bool(_flag(opts, "merge")),
            "eval_dataset_id": eval_id,
            "split": split,
            "secret_hold": False,  # the data stays on our machines
            "estimate": {
                "billed_tokens": 0,
                "cost_usd": 0.0,
                "price_per_1m": 0.0,
                "tokens": local.tokens,
                "gpu_hours": round(local.gpu_hours, 4),
                "params_billions": params,
            },
        }

    def _eval_choice(
        self, opts: dict[str, str], channel: str, dataset: Dataset
    ) -> tuple[str | None, float | None]:
        if "eval" in opts and "split" in opts:
            raise UserError("Give eval=<dataset> or split=<fraction>, not both.")
        if "eval" in opts:
            held_out = self.wf.find_dataset(channel, opts["eval"])
            if held_out.id == dataset.id:
                raise UserError("The eval set must be another dataset than the training set.")
            if (held_out.errors or 0) > 0:
                raise UserError(f"{held_out.id} has errors and cannot be the eval set.")
            return held_out.id, None
        split = _positive(opts, "split", float)
        if split is not None and not 0 < split < 0.5:
            raise UserError("split= takes a fraction between 0 and 0.5, e.g. split=0.1.")
        return None, split if split is not None else SPLIT_DEFAULT

    # --- the card and decisions ---------------------------------------------------------

    def card(self, run: Run) -> render.Message:
        policy = self.policy()
        decisions = [(a.user, a.decision) for a in self.store.approvals(run.id)]
        needed = approvals.quorum(policy, run.estimate_usd or 0.0)
        t = approvals.tally(decisions, needed, secret_hold=run.plan_json.get("secret_hold", False))
        committed = self.committed_usd()
        return render.approval_card(
            run,
            t,
            approvers=sorted(policy.approvers - {run.requested_by}),
            budget=policy.monthly_budget_usd,
            committed_usd=committed,
            reasons=[
                a.reason
                for a in self.store.approvals(run.id)
                if a.decision == "reject" and a.reason
            ],
        )

    def _post_card(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        self.evals.prepare(run)  # the held-out split, before anyone approves the plan
        run = self.store.get_run(run_id)
        if not approvals.needs_approval(self.policy(), run.provider):
            self._approve_without_card(run)
            return
        ts = self.wf.post(run.channel, run.thread_ts, self.card(run))
        self.store.update_run(run.id, card_ts=ts)
        self._ask_approvers(run)
        self._refresh_homes(run)

    def _approve_without_card(self, run: Run) -> None:
        if self.store.transition_run(run.id, ["pending_approval"], "approved"):
            self.store.audit("tunebot", "auto_approved", run_id=run.id, plan_hash=run.plan_hash)
            self.wf.post(run.channel, run.thread_ts, render.local_accepted(run))
            self.start(run.id)

    def _ask_approvers(self, run: Run) -> None:
        for approver in sorted(self.policy().approvers - {run.requested_by}):
            try:
                dm = self.wf.client.conversations_open(users=approver)["channel"]["id"]
                text = (
                    f"<@{run.requested_by}> asks for your approval of {run.id} "
                    f"({run.provider} {run.model}, about ${run.estimate_usd:,.2f}) in <#{run.channel}>."
                )
                self.wf.client.chat_postMessage(channel=dm, text=text)
            except SlackApiError as exc:
                log.error(
                    "cannot DM approver %s about %s: %s",
                    approver,
                    run.id,
                    exc.response.get("error"),
                )

    def _refresh_homes(self, run: Run) -> None:
        """A run changed state: the Home tabs of the people it concerns show it."""
        for user in {run.requested_by, *self.policy().approvers} - {None}:
            self.wf.refresh_home(user)

    def refresh_card(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if not run.card_ts:
            return
        message = self.card(run)
        try:
            self.wf.client.chat_update(channel=run.channel, ts=run.card_ts, **message.to_kwargs())
        except SlackApiError as exc:
            log.error("cannot update %s's card: %s", run.id, exc.response.get("error"))

    def click_refusal(self, run_id: str, user: str) -> str | None:
        """Checked before anything else, on the signed user id of the click."""
        run = self.store.find_run(run_id)
        if run is None:
            return f"there is no run {run_id}"
        expired = run.expires_at is not None and run.expires_at <= self.clock()
        return approvals.click_refusal(
            self.policy(),
            user=user,
            requester=run.requested_by or "",
            status=run.status,
            expired=expired,
        )

    def decide(
        self, run_id: str, user: str, decision: str, reason: str | None = None
    ) -> str | None:
        """Record one decision. Returns why it was refused, or None when it counted."""
        refusal = self.click_refusal(run_id, user)
        run = self.store.find_run(run_id)
        if refusal:
            if run is not None:
                self.store.audit(
                    user,
                    f"refused_{decision}",
                    run_id=run_id,
                    plan_hash=run.plan_hash,
                    detail={"why": refusal},
                )
            return refusal
        if decision == "override_secret" and not run.plan_json.get("secret_hold"):
            return "this run's data has no secret warnings to override"
        if not self.store.add_approval(
            run_id, user, decision, reason=reason, plan_hash=run.plan_hash
        ):
            return None  # the same click again (a double click or Slack's retry): already counted
        self.store.audit(
            user,
            decision,
            run_id=run_id,
            plan_hash=run.plan_hash,
            detail={"reason": reason} if reason else None,
        )
        log.info("run %s: %s by %s", run_id, decision, user)
        if decision == "reject":
            if self.store.transition_run(run_id, ["pending_approval"], "rejected"):
                self.refresh_card(run_id)
                why = f": {reason}" if reason else ""
                self.wf.post(
                    run.channel,
                    run.thread_ts,
                    render.note(f"<@{run.requested_by}> {run_id} was rejected by <@{user}>{why}."),
                )
            return None
        decisions = [(a.user, a.decision) for a in self.store.approvals(run_id)]
        needed = approvals.quorum(self.policy(), run.estimate_usd or 0.0)
        t = approvals.tally(decisions, needed, secret_hold=run.plan_json.get("secret_hold", False))
        if t.approved and self.store.transition_run(run_id, ["pending_approval"], "approved"):
            self.store.audit(
                "tunebot",
                "approved",
                run_id=run_id,
                plan_hash=run.plan_hash,
                detail={"by": list(t.approvals)},
            )
            self.refresh_card(run_id)
            self.start(run_id)
        else:
            self.refresh_card(run_id)
        return None

    # --- starting and following a job ------------------------------------------------

    def start(self, run_id: str) -> None:
        """Submit an approved run. Safe to call again: the tuner finds a job it made before."""
        if not self.store.transition_run(run_id, ["approved"], "queued"):
            return  # someone else is starting it, or it is no longer approved
        run = self.store.get_run(run_id)
        if run.provider == "local":
            self.dispatch_local()
        elif run.provider == "distill":
            self.distiller.start(run)
        else:
            self._submit(run)

    def _submit(self, run: Run) -> None:
        from trainers.openai_ft import OpenAIError

        plan = run.plan_json
        data = self.evals.prepare(run)
        path = self.wf.blobs.path(data["train_sha256"])
        try:
            job = self.tuner.start(
                run.id,
                str(path),
                run.model,
                epochs=None if plan.get("epochs_auto") else plan["epochs"],
                batch_size=plan.get("batch"),
                lr_multiplier=plan.get("lr_mult"),
                suffix=plan.get("suffix"),
            )
        except OpenAIError as exc:
            if exc.retryable:
                log.info(
                    "run %s: OpenAI unavailable (%s); retrying at the next poll",
                    run.id,
                    exc.message,
                )
                return  # stays queued without a job: the poller tries again
            self._finish(run, "queued", "failed", error=_openai_text(exc))
            return
        self.store.transition_run(
            run.id,
            ["queued"],
            "running",
            external_id=job.id,
            result_json={
                **(self.store.get_run(run.id).result_json or {}),
                "training_file": job.training_file,
            },
        )
        self.store.audit(
            "tunebot", "submitted", run_id=run.id, plan_hash=run.plan_hash, detail={"job": job.id}
        )
        log.info("run %s: submitted as %s", run.id, job.id)
        ts = self.wf.post(
            run.channel, run.thread_ts, render.progress(self.store.get_run(run.id), None)
        )
        self.store.update_run(run.id, progress_ts=ts)

    def poll_all(self) -> None:
        """One scheduler tick: start what is approved, follow what runs."""
        for run in self.store.runs(status=["approved", "queued", "running"], limit=None):
            try:
                self._poll_one(run)
            except UserError as exc:
                log.error("run %s: %s", run.id, exc.summary)
            except Exception as exc:  # one run's trouble must not stop the others
                self.wf.unexpected(exc, f"polling {run.id}")

    def _poll_one(self, run: Run) -> None:
        from trainers.openai_ft import OpenAIError

        if run.status == "approved":
            self.start(run.id)
            return
        if run.provider == "local":
            self._poll_local(run)
            return
        if run.provider == "distill":
            if run.status == "running":
                self.distiller.poll(run)
            elif run.status == "queued":
                self.distiller.start(run)
            return
        if run.status == "queued" and not run.external_id:
            self._submit(run)  # a crash or an outage between approval and submission
            return
        state_data = dict(run.result_json or {})
        try:
            state = self.tuner.poll(run.external_id, after_event_id=state_data.get("last_event_id"))
        except OpenAIError as exc:
            log.info("run %s: poll failed (%s); next time", run.id, exc.message)
            return
        for event in state.events:
            self.store.add_event(
                run.id,
                "openai_event",
                {"id": event.id, "message": event.message, "at": event.created_at},
            )
        if state.last_event_id:
            state_data["last_event_id"] = state.last_event_id
        if state.status in ("succeeded", "failed", "cancelled"):
            self._finish(run, run.status, state.status, state=state, data=state_data)
            return
        now = time.time()
        if now - state_data.get("progress_edited_at", 0) >= self.settings.progress_seconds:
            state_data["progress_edited_at"] = now
            self._edit_progress(run, state)
        self.store.update_run(run.id, result_json=state_data)

    def _edit_progress(self, run: Run, state) -> None:
        if not run.progress_ts:
            return
        message = render.progress(run, state)
        try:
            self.wf.client.chat_update(
                channel=run.channel, ts=run.progress_ts, **message.to_kwargs()
            )
        except SlackApiError as exc:
            log.error("cannot update %s's progress: %s", run.id, exc.response.get("error"))

    def _finish(
        self,
        run: Run,
        from_status: str,
        status: str,
        *,
        state=None,
        error: str | None = None,
        data: dict | None = None,
    ) -> None:
        data = dict(data or run.result_json or {})
        actual = None
        if state is not None:
            data.update(
                fine_tuned_model=state.fine_tuned_model, trained_tokens=state.trained_tokens
            )
            if state.trained_tokens:
                actual = state.trained_tokens / 1e6 * run.plan_json["estimate"]["price_per_1m"]
            if state.error:
                error = _state_error(state.error)
        if not self.store.transition_run(
            run.id, [from_status], status, actual_usd=actual, result_json=data, error=error
        ):
            return  # another tick finished it: report once
        self.store.audit(
            "tunebot",
            status,
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"error": error} if error else None,
        )
        log.info("run %s: %s", run.id, status)
        done = self.store.get_run(run.id)
        if state is not None:
            self._edit_progress(done, state)
        self.wf.post(run.channel, run.thread_ts, render.run_result(done))
        self._refresh_homes(done)
        if status == "succeeded":
            self.evals.after_success(done)
        if state is not None and state.metrics:
            self._upload_loss_curve(done, state.metrics)

    def _upload_loss_curve(self, run: Run, metrics) -> None:
        from bot.charts import loss_curve

        png = loss_curve(
            [m[0] for m in metrics], [m[1] for m in metrics], title=f"{run.id}: training loss"
        )
        try:
            self.wf.client.files_upload_v2(
                channel=run.channel,
                thread_ts=run.thread_ts,
                content=png,
                filename=f"loss-{run.id}.png",
                title=f"Training loss of {run.id}",
            )
        except SlackApiError as exc:
            log.error("loss curve for %s not uploaded: %s", run.id, exc.response.get("error"))

    def expire_all(self) -> None:
        now = self.clock()
        for run in self.store.runs(status="pending_approval", limit=None):
            if (
                run.expires_at
                and run.expires_at <= now
                and self.store.transition_run(run.id, ["pending_approval"], "expired")
            ):
                self.store.audit("tunebot", "expired", run_id=run.id, plan_hash=run.plan_hash)
                log.info("run %s: expired", run.id)
                self.refresh_card(run.id)
                self._refresh_homes(run)

    # --- the local runner ------------------------------------------------------------

    def run_dir(self, run_id: str):
        return self.settings.home / "runs" / run_id

    def dispatch_local(self) -> None:
        """Start queued local runs, oldest first, while slots are free (FIFO)."""
        with self._local_lock:
            running = len(self.store.runs(status="running", limit=None, provider="local"))
            queued = sorted(
                self.store.runs(status="queued", limit=None, provider="local"),
                key=lambda r: r.created_at,
            )
            for run in queued[: max(0, self.settings.local_slots - running)]:
                if self.store.transition_run(run.id, ["queued"], "running"):
                    self._launch_local(self.store.get_run(run.id))
            for position, run in enumerate(
                queued[max(0, self.settings.local_slots - running) :], 1
            ):
                self._show_queue_position(run, position, len(queued))

    def _launch_local(self, run: Run) -> None:
        from trainers import local, models

        plan = run.plan_json
        run_dir = self.run_dir(run.id)
        resume = bool(local.complete_checkpoints(run_dir))
        try:
            model = models.resolve(plan["model"], self.settings.home / "models")
        except (models.ModelFetchError, ValueError) as exc:
            self._finish(run, "running", "failed", error=f"cannot get model {plan['model']}: {exc}")
            return
        data = self._training_files(run)
        spec = {
            "run_id": run.id,
            "model": model,
            "train_file": data["train"],
            "eval_file": data.get("eval"),
            "output_dir": str(run_dir),
            "epochs": plan["epochs"],
            "lr": plan["lr"],
            "batch": plan["batch"],
            "r": plan["r"],
            "alpha": plan["alpha"],
            "targets": plan["targets"],
            "max_length": plan["max_length"],
            "qlora": bool(plan.get("qlora")),
            "merge": plan.get("merge", False),
            "resume": resume,
            **self.local_overrides,
        }
        worker = local.launch(
            run_dir,
            spec,
            processes=self.settings.local_processes,
            accelerate_config=self.settings.accelerate_config or None,
        )
        self.store.update_run(run.id, external_id=f"pid:{worker.pid}")
        self.store.audit(
            "tunebot",
            "resumed" if resume else "started",
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"pid": worker.pid},
        )
        log.info(
            "run %s: local worker pid %d%s", run.id, worker.pid, " (resuming)" if resume else ""
        )
        message = render.local_progress(self.store.get_run(run.id), None)
        if run.progress_ts:
            self._update(run, run.progress_ts, message)
        else:
            ts = self.wf.post(run.channel, run.thread_ts, message)
            self.store.update_run(run.id, progress_ts=ts)

    def _training_files(self, run: Run) -> dict[str, str]:
        data = self.evals.prepare(run)
        files = {"train": str(self.wf.blobs.path(data["train_sha256"]))}
        if data.get("eval_sha256"):
            files["eval"] = str(self.wf.blobs.path(data["eval_sha256"]))
        return files

    def _show_queue_position(self, run: Run, position: int, total: int) -> None:
        message = render.queued(run, position, total)
        if run.progress_ts:
            self._update(run, run.progress_ts, message)
        else:
            ts = self.wf.post(run.channel, run.thread_ts, message)
            self.store.update_run(run.id, progress_ts=ts)

    def _update(self, run: Run, ts: str, message: render.Message) -> None:
        try:
            self.wf.client.chat_update(channel=run.channel, ts=ts, **message.to_kwargs())
        except SlackApiError as exc:
            log.error("cannot update %s's message: %s", run.id, exc.response.get("error"))

    def _poll_local(self, run: Run) -> None:
        from trainers import local

        if run.status in ("approved", "queued"):
            self.dispatch_local()
            return
        run_dir = self.run_dir(run.id)
        state = local.read_state(run_dir, local.worker_of(run_dir))
        if state.status in ("succeeded", "failed", "cancelled"):
            self._finish_local(run, state)
            self.dispatch_local()  # a slot is free
            return
        data = dict(run.result_json or {})
        now = time.time()
        if (
            now - data.get("progress_edited_at", 0) >= self.settings.progress_seconds
            and run.progress_ts
        ):
            data["progress_edited_at"] = now
            self._update(run, run.progress_ts, render.local_progress(run, state))
            self.store.update_run(run.id, result_json=data)

    def _finish_local(self, run: Run, state) -> None:
        data = dict(run.result_json or {})
        data.update(
            adapter_dir=state.result.get("adapter_dir"),
            merged_dir=state.result.get("merged_dir"),
            metrics=state.result.get("metrics"),
            log_tail=state.log_tail,
        )
        error = state.error
        if not self.store.transition_run(
            run.id, ["running"], state.status, actual_usd=0.0, result_json=data, error=error
        ):
            return
        self.store.audit(
            "tunebot",
            state.status,
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"error": error} if error else None,
        )
        log.info("run %s: %s", run.id, state.status)
        done = self.store.get_run(run.id)
        if done.progress_ts:
            self._update(done, done.progress_ts, render.local_progress(done, state))
        self.wf.post(run.channel, run.thread_ts, render.local_result(done, state))
        self._refresh_homes(done)
        if state.status == "succeeded":
            self.evals.after_success(done)
        if state.metrics:
            self._upload_loss_curve(done, state.metrics)

    def resume(self, cmd: Command, channel: str, user: str) -> render.Message:
        from trainers import local

        run = self._find_run(cmd.target, channel)
        if run.provider != "local":
            raise UserError(f"{run.id} ran on OpenAI; only local runs resume from a checkpoint.")
        if user != run.requested_by and user not in self.policy().approvers:
            raise UserError(f"Only <@{run.requested_by}> or an approver can resume {run.id}.")
        checkpoints = local.complete_checkpoints(self.run_dir(run.id))
        if not checkpoints:
            raise UserError(f"{run.id} has no complete checkpoint to resume from.")
        if not self.store.transition_run(run.id, ["failed", "cancelled"], "queued", error=None):
            raise UserError(f"{run.id} is {run.status}; only a failed or cancelled run resumes.")
        self.store.audit(
            user,
            "resume_requested",
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"checkpoint": checkpoints[-1].name},
        )
        self.wf.submit(f"resuming {run.id}", self.dispatch_local, channel, run.thread_ts)
        return render.note(f"{run.id} resumes from {checkpoints[-1].name}.", in_channel=True)

    # --- cancel, forget, audit -------------------------------------------------------

    def cancel(self, cmd: Command, channel: str, user: str) -> render.Message:
        run = self._find_run(cmd.target, channel)
        if user != run.requested_by and user not in self.policy().approvers:
            raise UserError(f"Only <@{run.requested_by}> or an approver can cancel {run.id}.")
        if run.status in ("pending_approval", "approved") and self.store.transition_run(
            run.id, [run.status], "cancelled"
        ):
            self.store.audit(user, "cancelled", run_id=run.id, plan_hash=run.plan_hash)
            self.wf.submit(
                f"updating {run.id}", lambda: self.refresh_card(run.id), channel, run.thread_ts
            )
            return render.note(f"{run.id} is cancelled.", in_channel=True)
        if (
            run.provider == "local"
            and run.status == "queued"
            and self.store.transition_run(run.id, ["queued"], "cancelled")
        ):
            self.store.audit(user, "cancelled", run_id=run.id, plan_hash=run.plan_hash)
            return render.note(f"{run.id} left the queue and is cancelled.", in_channel=True)
        if run.provider == "local" and run.status == "running":
            from trainers import local

            if not local.stop(local.worker_of(self.run_dir(run.id))):
                raise UserError(
                    f"{run.id}'s worker is not running; the next poll will say how it ended."
                )
            self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
            return render.note(
                f"Stopping {run.id}: it saves a checkpoint first (`/finetune resume {run.id}` continues).",
                in_channel=True,
            )
        if run.status in ("queued", "running") and run.external_id:
            from trainers.openai_ft import OpenAIError

            try:
                self.tuner.cancel(run.external_id)
            except OpenAIError as exc:
                raise UserError(f"OpenAI did not cancel {run.id}: {_openai_text(exc)}") from None
            self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
            return render.note(
                f"Cancelling {run.id}; the thread says when OpenAI has stopped it.", in_channel=True
            )
        raise UserError(f"{run.id} is {run.status.replace('_', ' ')}: there is nothing to cancel.")

    def forget(self, cmd: Command, channel: str, user: str) -> render.Message:
        from trainers.openai_ft import OpenAIError

        dataset = self.wf.find_dataset(channel, cmd.target)
        if user != dataset.user and user not in self.policy().approvers:
            raise UserError(f"Only <@{dataset.user}> or an approver can forget {dataset.id}.")
        removed_remote = []
        for run in self.store.runs(channel=channel, limit=None):
            file_id = (run.result_json or {}).get("training_file")
            if run.dataset_id == dataset.id and file_id:
                try:
                    self.tuner.delete_file(file_id)
                    removed_remote.append(file_id)
                except OpenAIError as exc:
                    if exc.status != 404:
                        raise UserError(
                            f"OpenAI did not delete {file_id}: {_openai_text(exc)}"
                        ) from None
        self.wf.blobs.delete(dataset.sha256)
        record = dict(dataset.report_json or {})
        record["forgotten_at"] = self.clock().isoformat()
        self.store.update_dataset(dataset.id, report_json=record)
        self.store.audit(
            user, "forgot", dataset_id=dataset.id, detail={"openai_files": removed_remote}
        )
        where = f" and {len(removed_remote)} copy(ies) on OpenAI" if removed_remote else ""
        return render.note(f"{dataset.id}'s stored file{where} deleted.", in_channel=True)

    def budget(self, channel: str) -> render.Message:
        """This month's spend, by run and by person (all channels: the budget is shared)."""
        now = self.clock()
        since = approvals.month_start(now)
        rows = [
            r for r in self.store.runs(limit=None)
            if r.created_at >= since and r.provider != "local" and r.status not in ("rejected", "expired")
        ]  # fmt: skip
        return render.budget_report(
            rows,
            spent_usd=self.committed_usd(),
            budget_usd=self.settings.monthly_budget_usd,
            month=f"{now:%B %Y}",
        )

    def audit(self, cmd: Command, channel: str) -> render.Message:
        if cmd.target:
            run = self._find_run(cmd.target, channel)
            rows = self.store.audit_log(run_id=run.id, limit=50)
        else:
            ids = {r.id for r in self.store.runs(channel=channel, limit=None)}
            rows = [e for e in self.store.audit_log(limit=200) if e.run_id in ids][:50]
        return render.audit_log(rows, cmd.target)

    def _find_run(self, ref: str | None, channel: str) -> Run:
        if ref is None:
            raise UserError("Name the run, e.g. `r3`: `/finetune runs` lists them.")
        run = self.store.find_run(ref.lower())
        if run is None or run.channel != channel:
            raise UserError(f"No run `{ref}` in this channel. `/finetune runs` lists them.")
        return run


def _positive(opts: dict[str, str], key: str, kind: type) -> Any:
    if key not in opts:
        return None
    try:
        value = kind(opts[key])
    except ValueError:
        raise UserError(
            f"{key}= must be a {'whole ' if kind is int else ''}number, not `{opts[key]}`."
        ) from None
    if value <= 0:
        raise UserError(f"{key}= must be positive, not `{opts[key]}`.")
    return value


def _error_codes(dataset: Dataset) -> dict[str, int]:
    from trainers.data import CODES, ERROR

    codes = (dataset.report_json or {}).get("codes", {})
    return {c: n for c, n in codes.items() if CODES.get(c, ("",))[0] == ERROR}


def _openai_text(exc) -> str:
    text = f"{exc.message}"
    if exc.code:
        text += f" ({exc.code})"
    if exc.meaning:
        text += f": {exc.meaning}"
    return text


def _state_error(error: Any) -> str:
    if isinstance(error, dict):
        return error.get("message") or str(error)
    return getattr(error, "message", None) or str(error)


def _flag(opts: dict[str, str], key: str) -> bool | None:
    if key not in opts:
        return None
    value = opts[key].lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise UserError(f"{key}= takes true or false, not `{opts[key]}`.")


def _params_billions(model: str) -> float:
    """A size guess from the name (Llama-3.1-8B -> 8), for the GPU-time estimate."""
    if model.lower() == "smollm2":
        return 0.135
    found = re.search(r"(\d+(?:\.\d+)?)\s*([bm])\b", model.lower().replace("_", "-"))
    if not found:
        return 1.0
    size = float(found.group(1))
    return size / 1000 if found.group(2) == "m" else size


def _training_share(counts, split: float | None) -> list[int]:
    """The token counts the run trains on: the held-out share is left out.

    The split itself is made later, from the frozen plan; which examples it
    holds out is seeded, so this takes the same number of the mean-sized
    examples off: an estimate, labelled as such.
    """
    from bot.evaluation import held_out_count

    counts = list(counts)
    held = held_out_count(len(counts), split) if split else 0
    if not held:
        return counts
    mean = sum(counts) / len(counts)
    ordered = sorted(counts, key=lambda c: abs(c - mean))
    return ordered[held:]
