"""Training runs: request -> approve -> start -> poll -> report.

The database is the source of truth. Every state change is a conditional
UPDATE (`Store.transition_run`), so twenty simultaneous clicks, a Slack retry
or a scheduler tick racing a click move a run once, and only the caller that
moved it acts on it: one job submitted, one completion message.

Money goes through the spend gate (bot/spend.py): a paid run's estimate is
reserved when it is requested and settled at its actual cost when it ends.
External submissions go through a claim (bot/claims.py): the run moves to
``submitting`` with an owner and a lease before the slow upload, only the
claimant uploads and creates, and the job carries an idempotency key unique
to this installation, so a poll, a retry or a restart finds the job instead
of making a second one.

What a run is asked to do is its plan, built and frozen by bot/plans.py
(`Planner`, `TrainingPlan`) and stored as `plan.to_json()`. The admin
commands (release, forget, budget, audit) are bot/admin.py's. When a run
succeeds, the callables in `Runs.on_success` run on a job thread (the
workflow registers the evaluation there). Which runner trains for which
provider is bot/backends.py's (`Runs.backends`), who approves
bot/approvers.py's (`Runs.approvers`), and the queue of local runs
bot/local_queue.py's (`Runs.local`).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import approvals, egress, render
from bot.approvals import Policy
from bot.approvers import Approvers
from bot.backends import OWN, Backends
from bot.claims import ClaimLost, Held, lapsed, new_owner
from bot.commands import Command
from bot.context import Context
from bot.datasets import Datasets
from bot.errors import Busy, SpendRefused, UserError, describe, slack_error
from bot.plans import Planner, TrainingPlan
from bot.results import RunResult
from bot.spend import SpendGate
from storage import Dataset, Run
from trainers.runner import Handle, RunnerError, RunState

if TYPE_CHECKING:
    from trainers.openai_ft import OpenAIFineTuner

log = logging.getLogger("tunebot")

ACTIVE = ("approved", "queued", "submitting", "running")
WAITING = ("pending_approval", "approved", "queued", "submitting")  # no external work yet
FINISHED = ("succeeded", "failed", "cancelled")
PROVIDER_NAMES = render.PROVIDER_NAMES  # as people write them
RETRY_BASE_SECONDS = 5.0  # first back-off after a retryable submission error; doubles
RETRY_MAX_SECONDS = 600.0
# How far Together's own estimate (asked after the upload, before the job) may exceed the
# approved one before the run is stopped: tunebot counts tokens with tiktoken, Together
# with the model's tokenizer, so the two differ a little for the same file.
QUOTE_TOLERANCE = 0.10


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Runs:
    def __init__(
        self,
        ctx: Context,
        datasets: Datasets,
        *,
        tuner: Callable[[], OpenAIFineTuner] | None = None,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.store = ctx.store
        self.settings = ctx.settings
        self.clock = clock
        self.backends = Backends(ctx, tuner=tuner)  # which runner trains for which provider
        self.approvers = Approvers(ctx)  # who approves, and the policy they approve under
        # Called with the run, on a job thread, when a run succeeds; the workflow
        # registers the evaluation here (bot/evaluation.py, Evaluations.after_success).
        self.on_success: list[Callable[[Run], None]] = []
        # Called with a user id when a run they care about changed; the workflow
        # points it at App Home (bot/home.py, Home.refresh_home).
        self.refresh_home: Callable[[str], None] = lambda user: None
        # Extra worker spec fields (tests shorten runs with max_steps, save_steps).
        self.local_overrides: dict[str, Any] = {}
        self.owner = new_owner()  # this process's name: each claim adds a part of its own
        self.lease = dt.timedelta(seconds=self.settings.claim_lease_seconds)
        self.gate = SpendGate(self.store, self.settings, approvers=self.approvers.ids, clock=clock)
        self.planner = Planner(
            self.settings, self.store, ctx.prices, datasets.find_dataset, clock,
            providers=ctx.providers,
        )  # fmt: skip
        from bot.evaluation import Evaluations

        self.evals = Evaluations(ctx, datasets, self)
        from bot.distillation import Distiller

        self.distiller = Distiller(ctx, datasets, self, self.evals)
        from bot.migrate import Migrations

        self.migrations = Migrations(ctx, datasets, self, self.evals)
        from bot.weights import Downloads

        self.downloads = Downloads(ctx, self)
        from bot.local_queue import LocalQueue

        self.local = LocalQueue(
            ctx, self, self.evals
        )  # provider=local runs: the queue, launch, poll, resume

    # --- collaborators -------------------------------------------------------------

    def claim_token(self) -> str:
        """A name for one claim: two threads of this bot never hold the same run."""
        return f"{self.owner}:{uuid.uuid4().hex[:8]}"

    def key(self, run_id: str) -> str:
        """The idempotency key for run `run_id`'s external work (`Backends.key`)."""
        return self.backends.key(run_id)

    def run_dir(self, run_id: str) -> Path:
        """A local run's folder (`Backends.run_dir`)."""
        return self.backends.run_dir(run_id)

    def committed_usd(self) -> float:
        """This calendar month's spend (the ledger: reserved at estimate, settled at actual)."""
        return self.gate.committed_usd()

    # --- /finetune train --------------------------------------------------------------

    def request(self, cmd: Command, channel: str, user: str) -> render.Message:
        if cmd.name == "distill":
            return self.distiller.request(cmd, channel, user)
        dataset = self.datasets.find_dataset(channel, cmd.target)
        report = self.datasets.stored_report(dataset)
        if report.has_errors:
            codes = ", ".join(f"{c} ×{n}" for c, n in _error_codes(dataset).items())
            raise UserError(
                f"{dataset.id} has {report.error_count:,} error(s) and cannot be trained: {codes}.",
                "Fix them and upload the file again; `/finetune validate` shows where they are.",
            )
        if report.kind != "supervised":
            raise UserError(
                f"{dataset.id} is a {report.kind_label} file; tunebot trains supervised chat "
                "files today (its report says who else can train it)."
            )
        opts = cmd.options
        provider = opts.get("provider", self.settings.default_provider).lower()
        if provider not in ("openai", *OWN) and provider in self.planner.names():
            self.backends.credentials(
                provider
            )  # refused now when its key is not set, not at approval
        plan = self.planner.plan(provider, dataset, report, opts, channel).to_json()
        return self.request_plan(plan, dataset, channel, user)

    def request_plan(self, plan: dict, dataset: Dataset, channel: str, user: str) -> render.Message:
        """Ask for a run of a frozen `plan` (its `to_json()`, extra keys allowed) on
        `dataset`: the policy checked read-only, the request recorded under its run id,
        then the job records the run and posts its card. Returns the ack's answer.
        `/finetune train` and `/finetune migrate` (bot/migrate.py) both end here."""
        provider = plan["provider"]
        policy = self.approvers.policy()
        self._refuse(plan, policy, user)  # read-only; the job checks again, in its transaction
        # One small write before the ack (the request, under the id it will have);
        # the run, its reservation and its card are the job's (`request_work`).
        with self.store.transaction():
            run_id = self.store.new_run_id()
            start = self.ctx.record_work(
                "request", f"request:{run_id}",
                {"run_id": run_id, "plan": plan, "channel": channel, "user": user},
                what=f"recording {run_id}", channel=channel, thread_ts=dataset.thread_ts,
                long=False,
            )  # fmt: skip
        if start is not None:  # a fresh id: its key cannot be held
            start()
        if not approvals.needs_approval(policy, provider):
            return render.note(
                f"{run_id} accepted: it goes to the local GPU queue (see {dataset.id}'s thread)."
            )
        if plan.get("kind") == "together":
            return render.note(
                f"{run_id} needs approval: {dataset.id} is checked against Together's data "
                f"rules first, then the card follows in its thread."
            )
        return render.note(f"{run_id} needs approval: the card is in {dataset.id}'s thread.")

    def request_work(self, args: dict) -> None:
        """The job behind `request` (resumed after a restart): the run recorded with its
        reservation if the budget still allows it, then its card. A Together plan's file
        is checked against Together's data rules first (a whole-file read, too slow for
        the ack): a file Together would refuse gets one sentence in its thread, no run."""
        run = self.store.find_run(args["run_id"])
        plan = args["plan"]
        if run is None and plan.get("kind") == "together":
            from bot.plans import together_refusal

            why = together_refusal(
                self.ctx.blobs.path(plan["dataset_sha256"]), plan["dataset_id"], plan["provider"]
            )
            if why is not None:
                self.store.audit(
                    args["user"], "refused", dataset_id=plan["dataset_id"],
                    plan_hash=approvals.plan_hash(plan), detail={"reasons": [why]},
                )  # fmt: skip
                dataset = self.store.get_dataset(plan["dataset_id"])
                self.ctx.post(
                    args["channel"], dataset.thread_ts,
                    render.note(f"<@{args['user']}> ⚠️ {args['run_id']} cannot be requested: {why}"),
                )  # fmt: skip
                return
        if run is None:
            self._put_to_approvers(
                args["plan"], args["channel"], args["user"], run_id=args["run_id"]
            )
        elif run.status == "pending_approval" and not run.card_ts:  # stopped before the card
            self._post_card(run.id)

    def _refuse(self, plan: dict, policy: Policy, user: str) -> None:
        """Raise SpendRefused (audited) when the policy refuses `plan` now."""
        reasons = approvals.refusals(
            policy,
            provider=plan["provider"],
            estimate_usd=plan["estimate"]["cost_usd"],
            committed_usd=self.committed_usd(),
            requester=user,
        )
        if reasons:
            self.store.audit(
                user, "refused", dataset_id=plan["dataset_id"],
                plan_hash=approvals.plan_hash(plan), detail={"reasons": reasons},
            )  # fmt: skip
            raise SpendRefused("This run cannot be requested: " + "; ".join(reasons) + ".")

    def _put_to_approvers(
        self, plan: dict, channel: str, user: str, *, run_id: str | None = None
    ) -> render.Message:
        """Check a frozen plan against the policy, record the run, and post its card.

        `run_id`: an id the ack already named (`Store.new_run_id`), for plans
        priced after the ack (distillation)."""
        dataset = self.store.get_dataset(plan["dataset_id"])
        provider = plan["provider"]
        policy = self.approvers.policy()
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
        run = None
        if not reasons:
            now = self.clock()
            try:
                # One transaction: the run exists only if its reservation fits the budget,
                # and only if its dataset was not forgotten meanwhile (forget cancels the
                # runs it finds in a transaction of its own: one of the two comes first).
                with self.store.transaction():
                    if self.store.get_dataset(dataset.id).forgotten_at:
                        raise UserError(
                            f"{run_id or 'This run'} cannot be requested: its dataset "
                            f"{dataset.id} was forgotten meanwhile."
                        )
                    run = self.store.add_run(
                        id=run_id,
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
                    if provider != "local":
                        self.gate.reserve(
                            "run", run.id, estimate_usd, what="This run",
                            run_id=run.id, channel=channel, user=user,
                        )  # fmt: skip
                    # In the same transaction: one commit in the ack, not two.
                    self.store.audit(
                        user, "requested", run_id=run.id, dataset_id=dataset.id,
                        plan_hash=digest, detail=plan,
                    )  # fmt: skip
            except SpendRefused as exc:
                reasons = [exc.reason]
        if reasons or run is None:
            self.store.audit(
                user,
                "refused",
                dataset_id=dataset.id,
                plan_hash=digest,
                detail={"reasons": reasons},
            )
            raise SpendRefused(
                f"{run_id or 'This run'} cannot be requested: " + "; ".join(reasons) + "."
            )
        log.info(
            "run %s requested by %s: %s %s, $%.2f",
            run.id,
            user,
            provider,
            plan["model"],
            estimate_usd,
        )
        self.ctx.submit(
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

    # --- the card and decisions ---------------------------------------------------------

    def card(self, run: Run) -> render.Message:
        policy = self.approvers.policy()
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
        if run.provider != "eval":
            self.evals.prepare(run)  # the held-out split, before anyone approves the plan
            run = self.store.get_run(run_id)
        if not approvals.needs_approval(self.approvers.policy(), run.provider):
            self._approve_without_card(run)
            return
        ts = self.ctx.post(run.channel, run.thread_ts, self.card(run))
        self.store.update_run(run.id, card_ts=ts)
        self._ask_approvers(run)
        self._refresh_homes(run)

    def _approve_without_card(self, run: Run) -> None:
        if self.store.transition_run(run.id, ["pending_approval"], "approved"):
            self.store.audit("tunebot", "auto_approved", run_id=run.id, plan_hash=run.plan_hash)
            self.ctx.post(run.channel, run.thread_ts, render.local_accepted(run))
            self.start(run.id)

    def _ask_approvers(self, run: Run) -> None:
        for approver in sorted(self.approvers.policy().approvers - {run.requested_by}):
            try:
                dm = self.ctx.client.conversations_open(users=approver)["channel"]["id"]
                text = (
                    f"<@{run.requested_by}> asks for your approval of {run.id} "
                    f"({run.provider} {render.escape(run.model)}, about ${run.estimate_usd:,.2f}) "
                    f"in <#{run.channel}>."
                )
                self.ctx.client.chat_postMessage(channel=dm, text=text)
            except Exception as exc:  # Slack refused, or could not be reached
                log.error(
                    "cannot DM approver %s about %s: %s",
                    approver,
                    run.id,
                    slack_error(exc),
                )

    def _refresh_homes(self, run: Run) -> None:
        """A run changed state: the Home tabs of the people it concerns show it."""
        for user in {run.requested_by, *self.approvers.policy().approvers} - {None}:
            self.refresh_home(user)

    def refresh_card(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if not run.card_ts:
            return
        message = self.card(run)
        try:
            self.ctx.client.chat_update(channel=run.channel, ts=run.card_ts, **message.to_kwargs())
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot update %s's card: %s", run.id, slack_error(exc))

    def click_refusal(self, run_id: str, user: str) -> str | None:
        """Checked before anything else, on the signed user id of the click."""
        run = self.store.find_run(run_id)
        if run is None:
            return f"there is no run {run_id}"
        expired = run.expires_at is not None and run.expires_at <= self.clock()
        return approvals.click_refusal(
            self.approvers.policy(),
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
        if decision == "override_secret":  # names what it releases: the run's datasets
            for dataset_id in {run.dataset_id, run.eval_dataset_id} - {None}:
                egress.release(self.store, self.store.get_dataset(dataset_id), user, run_id=run_id)
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
                self.gate.settle("run", run_id, 0.0, note="rejected")
                self.refresh_card(run_id)
                why = f": {render.escape(reason)}" if reason else ""
                self.ctx.post(
                    run.channel,
                    run.thread_ts,
                    render.note(f"<@{run.requested_by}> {run_id} was rejected by <@{user}>{why}."),
                )
            return None
        decisions = [(a.user, a.decision) for a in self.store.approvals(run_id)]
        needed = approvals.quorum(self.approvers.policy(), run.estimate_usd or 0.0)
        t = approvals.tally(decisions, needed, secret_hold=run.plan_json.get("secret_hold", False))
        if t.approved and (why := self._budget_changed(run)):
            if self.store.transition_run(run_id, ["pending_approval"], "rejected", error=why):
                self.gate.settle("run", run_id, 0.0, note="over budget at approval")
                self.store.audit("tunebot", "refused_budget", run_id=run_id, detail={"why": why})
                self.refresh_card(run_id)
                self.ctx.post(
                    run.channel,
                    run.thread_ts,
                    render.note(f"<@{run.requested_by}> {run_id} cannot start: {why}."),
                )
            return None
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

    def _budget_changed(self, run: Run) -> str | None:
        """Checked again at the last approval: why the run no longer fits, or None."""
        if run.provider == "local":
            return None
        reservation = self.gate.ledger.open("run", run.id)
        if reservation is None and self.gate.ledger.has_row("run", run.id):
            return "its request has ended meanwhile (cancelled, rejected or expired)"
        if reservation is None:  # requested before the ledger existed: reserve now
            try:
                self.gate.reserve(
                    "run", run.id, run.estimate_usd or 0.0, what=run.id,
                    run_id=run.id, channel=run.channel, user=run.requested_by,
                )  # fmt: skip
            except SpendRefused as exc:
                return exc.reason
            return None
        return self.gate.fits(reservation)

    # --- starting and following a job ------------------------------------------------

    def start(self, run_id: str) -> None:
        """Start an approved run. Safe to call from racing threads: one claim wins.

        The work goes to the long-job pool; when it is full the run is left
        approved (its claim released) and the scheduler starts it once a
        thread is free, which the thread is told.
        """
        run = self.store.get_run(run_id)
        try:
            if run.provider == "local":
                if self.store.transition_run(run_id, ["approved"], "queued"):
                    self.local.dispatch()
            elif run.provider == "distill":
                self.distiller.start(run)
            elif run.provider == "eval":
                self.evals.start_approved(run)
            elif self.store.claim_run(
                run_id, ["approved"], "submitting", owner=(token := self.claim_token()),
                lease=self.lease,
            ):  # fmt: skip
                self.ctx.submit(
                    f"submitting {run_id}", lambda: self._submit(run_id, token), run.channel,
                    run.thread_ts, long=True,
                    on_busy=lambda: self.store.release_claim(
                        run_id, token, from_status="submitting"
                    ),
                )  # fmt: skip
        except Busy as exc:
            log.info("run %s: approved; its start waits (%s)", run_id, exc.summary)
            self.ctx.post(
                run.channel, run.thread_ts,
                render.note(f"{run_id} is approved; it starts as soon as a job thread is free "
                            f"({exc.ahead} jobs ahead)."),
            )  # fmt: skip

    def _submit(self, run_id: str, token: str) -> None:
        """Submit once, holding the claim on `run_id` throughout.

        Every way out leaves the run somewhere a person can see: running with
        its job, back to be retried after a back-off (a retryable error), or
        failed with the reason posted once and its reservation released.
        """
        with Held(self.store, run_id, token, self.lease, "submitting") as held:
            run = self.store.get_run(run_id)
            try:
                job = self._create_job(run, held)
            except ClaimLost:
                log.info("run %s: claim lost while submitting (cancelled?)", run_id)
                self._cleanup_after_cancel(run_id)
                return
            except RunnerError as exc:
                if exc.retryable:
                    self._retry_later(run, token, exc.message)
                else:
                    self._fail_submission(run_id, exc.summary)
                return
            except UserError as exc:
                self._fail_submission(run_id, exc.summary)
                return
            except Exception as exc:  # anything else still ends the run, visibly
                log.error("run %s: submission failed: %s: %s", run_id, type(exc).__name__, exc)
                self._fail_submission(
                    run_id, f"tunebot could not submit it ({describe(exc, self.settings.home)})"
                )
                return
            record = RunResult.of(self.store.get_run(run_id)).with_(submit_attempts=0)
            if job.files:
                record = record.with_(training_file=job.files[0])
            if not self.store.release_claim(
                run_id, token, from_status="submitting", to_status="running",
                external_id=job.id, result_json=record.to_json(),
            ):  # fmt: skip
                now = self.store.get_run(run_id)
                if now.status == "cancelled" and now.external_id in (None, job.id):
                    self._cancel_orphan_job(run_id, job.id)  # cancelled while being created
                # else: a taker adopted this very job (found by its key): leave it be
                return
        self.store.audit(
            "tunebot",
            "adopted" if job.reused else "submitted",
            run_id=run_id,
            plan_hash=run.plan_hash,
            detail={"job": job.id},
        )
        log.info("run %s: %s as %s", run_id, "found" if job.reused else "submitted", job.id)
        ts = self.ctx.post(
            run.channel, run.thread_ts, render.progress(self.store.get_run(run_id), None)
        )
        self.store.update_run(run_id, progress_ts=ts)

    def _create_job(self, run: Run, held: Held) -> Handle:
        """The job for the run's key: found if it exists, else submitted now."""
        from trainers.runner import TrainingSpec

        plan = TrainingPlan.from_json(run.plan_json)
        dataset = self.store.get_dataset(run.dataset_id)
        if dataset.forgotten_at:
            raise UserError(f"its dataset {dataset.id} was forgotten")
        data = self.evals.prepare(run)
        spec = TrainingSpec(
            run_id=run.id,
            model=run.model,
            train_file=self.ctx.blobs.path(data["train_sha256"]),
            hyperparameters=plan.hyperparameters(),
            suffix=getattr(plan, "suffix", None),
        )

        def step(what: str, value: str) -> None:
            if what == "uploaded":  # recorded first: a cancel from here on deletes it
                self._record_upload(run, value)
            held.check()  # cancelled, or taken over: stop before the next side effect

        runner = self.backends.runner(run.provider)
        if self.backends.kind(run.provider) == "together" and runner.find(self.key(run.id)) is None:
            self._check_quote(run, runner, spec, held)  # a job made already is adopted as is
        return runner.submit(spec, self.key(run.id), step=step)

    def _check_quote(self, run: Run, runner: Any, spec: Any, held: Held) -> None:
        """Together's own price for the uploaded file (its estimate endpoint), checked
        against what was approved before the job is created: more than QUOTE_TOLERANCE
        above it, or more than Together will let the account spend, stops the run here
        (UserError; the upload is deleted, nothing is billed). When Together cannot
        estimate, the approved table estimate stands."""
        quote = runner.quote(spec, self.key(run.id))  # uploads once; `submit` reuses it
        for file_id in quote.files:
            self._record_upload(run, file_id)
        held.check()
        quoted = {
            "available": quote.available,
            "usd": quote.total_usd,
            "tokens": quote.train_tokens,
            "reason": quote.reason,
        }
        record = RunResult.of(self.store.get_run(run.id)).with_(together_quote=quoted)
        self.store.update_run(run.id, result_json=record.to_json())
        if not quote.available or quote.total_usd is None:
            log.info("run %s: Together gave no estimate (%s)", run.id, quote.reason)
            return
        approved = run.estimate_usd or 0.0
        log.info(
            "run %s: Together estimates $%.4f (approved $%.4f)", run.id, quote.total_usd, approved
        )
        if quote.allowed is False:
            limit = f" (its limit: ${quote.limit_usd:,.2f})" if quote.limit_usd is not None else ""
            raise UserError(
                f"Together estimates ${quote.total_usd:,.2f} and says the account cannot spend "
                f"that{limit}; nothing was trained"
            )
        if quote.total_usd > approved * (1 + QUOTE_TOLERANCE) + 0.005:
            raise UserError(
                f"Together estimates ${quote.total_usd:,.2f} for this job, more than the "
                f"${approved:,.2f} approved (from {run.plan_json.get('prices_source')}); nothing "
                "was trained: ask again with fewer epochs or a smaller model, or update the "
                "price table"
            )

    def _record_upload(self, run: Run, file_id: str) -> None:
        """A file the provider holds for the run: recorded, so that it can be deleted."""
        if RunResult.of(self.store.get_run(run.id)).training_file == file_id:
            return
        self.store.add_provider_file(
            run.provider, file_id, run_id=run.id, dataset_id=run.dataset_id
        )
        record = RunResult.of(self.store.get_run(run.id)).with_(training_file=file_id)
        self.store.update_run(run.id, result_json=record.to_json())

    def _retry_later(self, run: Run, token: str, why: str) -> None:
        record = RunResult.of(self.store.get_run(run.id))
        attempts = record.submit_attempts + 1
        record = record.with_(submit_attempts=attempts)
        delay = min(RETRY_BASE_SECONDS * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
        delay = max(delay, self.settings.poll_seconds)
        self.store.release_claim(
            run.id, token, from_status="submitting",
            retry_at=self.clock() + dt.timedelta(seconds=delay), result_json=record.to_json(),
        )  # fmt: skip
        log.info(
            "run %s: %s unavailable (%s); retrying in %.0f s",
            run.id, PROVIDER_NAMES.get(run.provider, run.provider), why, delay,
        )  # fmt: skip

    def _fail_submission(self, run_id: str, error: str) -> None:
        if not self.store.transition_run(
            run_id, ["submitting"], "failed", error=error, owner=None, lease_expires_at=None
        ):
            return
        self.delete_run_files(run_id)
        self.gate.settle("run", run_id, 0.0, note="failed before training")
        run = self.store.get_run(run_id)
        self.store.audit(
            "tunebot", "failed", run_id=run_id, plan_hash=run.plan_hash, detail={"error": error}
        )
        log.info("run %s: failed before training: %s", run_id, error)
        self.ctx.post(run.channel, run.thread_ts, render.run_result(run))
        self._refresh_homes(run)

    def _cancel_orphan_job(self, run_id: str, job_id: str) -> None:
        run = self.store.get_run(run_id)
        try:
            self.backends.runner(run.provider).cancel(
                Handle(self.backends.kind(run.provider), job_id)
            )
        except RunnerError as exc:
            log.error("run %s: cannot cancel job %s: %s", run_id, job_id, exc.message)
        self.store.update_run(run_id, external_id=job_id)
        self._cleanup_after_cancel(run_id)
        self.store.audit("tunebot", "cancelled_job", run_id=run_id, detail={"job": job_id})

    def cancel_job_by_key(self, run_id: str, attempts: int = 3) -> None:
        run = self.store.get_run(run_id)
        runner = self.backends.runner(run.provider)
        for attempt in range(attempts):
            try:
                job = runner.find(self.key(run_id))
            except RunnerError as exc:
                log.warning(
                    "run %s: job lookup failed (%s), try %d", run_id, exc.message, attempt + 1
                )
                time.sleep(min(2.0**attempt, 5.0))
                continue
            if job is not None and job.status not in FINISHED:
                self._cancel_orphan_job(run_id, job.id)
            return
        self.ctx.post(
            run.channel, run.thread_ts,
            render.note(f"{run_id} is cancelled, but {run.provider} could not be asked whether "
                        "a job was made for it before; check its fine-tuning jobs."),
        )  # fmt: skip

    def _cleanup_after_cancel(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        if run.status in FINISHED:
            self.delete_run_files(run_id)

    def delete_run_files(self, run_id: str | None = None, dataset_id: str | None = None) -> int:
        """Delete what was uploaded to providers for a run (or a dataset); returns how many."""
        files = self.store.provider_files(run_id=run_id, dataset_id=dataset_id)
        deleted = 0
        for row in files:
            try:
                self.backends.runner(row["provider"]).delete_file(row["file_id"])
            except (RunnerError, UserError) as exc:
                log.error("cannot delete %s: %s", row["file_id"], getattr(exc, "message", exc))
                continue
            self.store.provider_file_deleted(row["provider"], row["file_id"])
            deleted += 1
        return deleted

    def poll_all(self) -> None:
        """One scheduler tick: start what is approved, follow what runs.

        Nothing slow happens here: submissions and launches go to job threads.
        """
        self.gate.ledger.settle_ended_runs()  # a crash between a run's end and its settlement
        for ended in self.store.runs(status=list(FINISHED), limit=20):
            if RunResult.of(ended).unposted:
                self._post_result_again(ended)
        for run in self.store.runs(status=list(ACTIVE), limit=None):
            try:
                self._poll_one(run)
            except UserError as exc:
                log.error("run %s: %s", run.id, exc.summary)
            except Exception as exc:  # one run's trouble must not stop the others
                self.ctx.unexpected(exc, f"polling {run.id}")

    def _post_result_again(self, run: Run) -> None:
        """A result Slack did not take when the run ended: posted once it answers."""
        if self.ctx.post(run.channel, run.thread_ts, render.run_result(run)) is not None:
            record = RunResult.of(run).with_(unposted=False)
            self.store.update_run(run.id, result_json=record.to_json())

    def _take_over(self, run: Run, from_status: str) -> None:
        """Claim a submission nobody holds (a crash, a back-off over) and finish it on a job thread."""
        token = self.claim_token()
        if self.store.claim_run(run.id, [from_status], "submitting", owner=token, lease=self.lease):
            log.info("run %s: taking over its submission", run.id)
            self.ctx.submit(
                f"submitting {run.id}", lambda: self._submit(run.id, token), run.channel,
                run.thread_ts, long=True,
                on_busy=lambda: self.store.release_claim(run.id, token, from_status="submitting"),
            )  # fmt: skip

    def _poll_one(self, run: Run) -> None:
        if run.provider == "local":
            if run.status == "approved":
                self.start(run.id)
            else:
                self.local.poll(run)
            return
        if run.provider == "distill":
            self.distiller.poll(run)
            return
        if run.provider == "eval":
            self.evals.poll(run)
            return
        if run.status in ("approved", "queued", "submitting"):
            if lapsed(run, self.clock()):
                self._take_over(run, run.status)
            return
        state_data = RunResult.of(run)
        try:
            state = self.backends.runner(run.provider).poll(
                self.backends.handle(run), cursor=state_data.last_event_id
            )
        except RunnerError as exc:
            log.info("run %s: poll failed (%s); next time", run.id, exc.message)
            return
        for event in state.events:
            self.store.add_event(
                run.id,
                f"{run.provider}_event",
                {"id": event.id, "message": event.message, "at": event.created_at},
            )
        if state.events and state.events[-1].message:
            state_data = state_data.with_(last_event=state.events[-1].message[:500])
        if state.cursor:
            state_data = state_data.with_(last_event_id=state.cursor)
        if state.terminal:
            self._finish(run, run.status, state.status, state=state, data=state_data)
            return
        now = time.time()
        if now - state_data.progress_edited_at >= self.settings.progress_seconds:
            state_data = state_data.with_(progress_edited_at=now)
            self._edit_progress(run, state, state_data.last_event)
        self.store.update_run(run.id, result_json=state_data.to_json())

    def _edit_progress(self, run: Run, state, last_event: str | None = None) -> None:
        if not run.progress_ts:
            return
        message = render.progress(run, state, last_event)
        try:
            self.ctx.client.chat_update(
                channel=run.channel, ts=run.progress_ts, **message.to_kwargs()
            )
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot update %s's progress: %s", run.id, slack_error(exc))

    def _finish(
        self,
        run: Run,
        from_status: str,
        status: str,
        *,
        state: RunState | None = None,
        error: str | None = None,
        data: RunResult | None = None,
    ) -> None:
        data = data if data is not None else RunResult.of(run)
        actual = None
        if state is not None:
            data = data.with_(
                fine_tuned_model=state.output.get("fine_tuned_model"),
                trained_tokens=state.trained_tokens,
            )
            if state.cost_usd is not None:
                actual = state.cost_usd  # the provider's own figure
            elif state.trained_tokens:
                actual = state.trained_tokens / 1e6 * run.plan_json["estimate"]["price_per_1m"]
            elif status == "cancelled" and state.step and state.total_steps:
                # Stopped partway with no token count: the steps done, at the estimate's rate.
                share = min(state.step / state.total_steps, 1.0)
                actual = (run.estimate_usd or 0.0) * share
            if state.error:
                error = state.error
        if not self.store.transition_run(
            run.id,
            [from_status],
            status,
            actual_usd=actual,
            result_json=data.to_json(),
            error=error,
        ):
            return  # another tick finished it: report once
        self.gate.settle("run", run.id, actual or 0.0, note=status)
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
        if self.ctx.post(run.channel, run.thread_ts, render.run_result(done)) is None:
            # Slack refused or could not be reached: the poller posts it once Slack answers.
            self.store.update_run(
                run.id, result_json=RunResult.of(done).with_(unposted=True).to_json()
            )
        self._refresh_homes(done)
        metrics = state.metrics if state is not None else ()
        self._after_end(done, metrics)

    def _upload_loss_curve(self, run: Run, metrics) -> None:
        from bot.charts import loss_curve

        png = self.ctx.draw(
            loss_curve,
            [m[0] for m in metrics],
            [m[1] for m in metrics],
            title=f"{run.id}: training loss",
        )
        if png is None:
            return
        try:
            self.ctx.client.files_upload_v2(
                channel=run.channel,
                thread_ts=run.thread_ts,
                content=png,
                filename=f"loss-{run.id}.png",
                title=f"Training loss of {run.id}",
            )
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("loss curve for %s not uploaded: %s", run.id, slack_error(exc))

    def _upload_worker_log(self, run: Run, log_tail: str) -> None:
        """A failed local run's last log lines, as a file in its thread (never in a message)."""
        try:
            self.ctx.client.files_upload_v2(
                channel=run.channel,
                thread_ts=run.thread_ts,
                content=log_tail.encode("utf-8", "replace"),
                filename=render.log_name(run),
                title=f"Last lines of {run.id}'s worker log",
            )
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("worker log of %s not uploaded: %s", run.id, slack_error(exc))

    def expire_all(self) -> None:
        now = self.clock()
        for run in self.store.runs(status="pending_approval", limit=None):
            if (
                run.expires_at
                and run.expires_at <= now
                and self.store.transition_run(run.id, ["pending_approval"], "expired")
            ):
                self.gate.settle("run", run.id, 0.0, note="expired")
                self.store.audit("tunebot", "expired", run_id=run.id, plan_hash=run.plan_hash)
                log.info("run %s: expired", run.id)
                self.refresh_card(run.id)
                self._refresh_homes(run)

    # --- after a run ends (a local run's end: bot/local_queue.py) -------------------

    def _after_end(self, done: Run, metrics, log_tail: str | None = None) -> None:
        """The success hooks (the evaluation), charts and logs, on a job thread: never
        on the scheduler's."""

        def report() -> None:
            if done.status == "succeeded":
                for hook in list(self.on_success):
                    hook(done)
            if metrics:
                self._upload_loss_curve(done, metrics)
            if log_tail:
                self._upload_worker_log(done, log_tail)

        self.ctx.submit(f"reporting the end of {done.id}", report, done.channel, done.thread_ts)

    # --- cancel (a local run: bot/local_queue.py) -----------------------------

    def cancel(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Cancel a run from any state that is not final, whatever its provider."""
        run = self.find_run(cmd.target, channel)
        if user != run.requested_by and not self.gate.is_approver(user):
            raise UserError(f"Only <@{run.requested_by}> or an approver can cancel {run.id}.")
        if run.status in WAITING and not (run.provider not in OWN and run.external_id):
            if self.store.transition_run(run.id, [run.status], "cancelled"):
                self.gate.settle("run", run.id, 0.0, note="cancelled before it started")
                self.store.audit(user, "cancelled", run_id=run.id, plan_hash=run.plan_hash)
                self.ctx.submit(
                    f"updating {run.id}", lambda: self._after_cancel(run.id), channel,
                    run.thread_ts,
                )  # fmt: skip
                where = "left the queue and " if run.status == "queued" else ""
                return render.note(f"{run.id} {where}is cancelled.", in_channel=True)
            run = self.store.get_run(run.id)  # it moved on meanwhile: act on where it is now
        if run.provider == "local" and run.status == "running":
            return self.local.cancel(run, user)
        if (
            run.provider in ("distill", "eval")
            and run.status == "running"
            and self.store.transition_run(run.id, ["running"], "cancelled")
        ):
            self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
            return render.note(
                f"Stopping {run.id}: no new model calls start; what was done is kept and "
                "its spend recorded.",
                in_channel=True,
            )
        if run.status in ("submitting", "running") and run.external_id:
            provider = PROVIDER_NAMES.get(run.provider, run.provider)
            try:
                self.backends.runner(run.provider).cancel(self.backends.handle(run))
            except RunnerError as exc:
                raise UserError(f"{provider} did not cancel {run.id}: {exc.summary}") from None
            self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
            return render.note(
                f"Cancelling {run.id}; the thread says when {provider} has stopped it.",
                in_channel=True,
            )
        raise UserError(f"{run.id} is {run.status.replace('_', ' ')}: there is nothing to cancel.")

    def _after_cancel(self, run_id: str) -> None:
        """A run cancelled before it started: its card says so and its uploads go; a job
        a lost reply created for it (found by its key) is cancelled too."""
        run = self.store.get_run(run_id)
        if (
            run.provider not in OWN
            and not run.external_id
            and self.backends.reachable(run.provider)
        ):
            self.cancel_job_by_key(run_id)
        self._cleanup_after_cancel(run_id)
        self.refresh_card(run_id)
        self._refresh_homes(self.store.get_run(run_id))

    def find_run(self, ref: str | None, channel: str) -> Run:
        if ref is None:
            raise UserError("Name the run, e.g. `r3`: `/finetune runs` lists them.")
        run = self.store.find_run(ref.lower())
        if run is None or run.channel != channel:
            raise UserError(
                f"No run `{render.escape(ref)}` in this channel. `/finetune runs` lists them."
            )
        return run


def _error_codes(dataset: Dataset) -> dict[str, int]:
    from trainers.data import CODES, ERROR

    codes = (dataset.report_json or {}).get("codes", {})
    return {c: n for c, n in codes.items() if CODES.get(c, ("",))[0] == ERROR}
