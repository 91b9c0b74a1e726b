"""Admin commands: `/finetune release`, `forget`, `budget` and `audit`.

They act on datasets, the spend ledger and the audit log rather than on one
run's life, so they live apart from bot/runs.py; they use the run service
(`Runs`) for what touches runs: cancelling those waiting on a forgotten
dataset, deleting provider uploads, refreshing cards.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bot import approvals, egress, render
from bot.commands import Command
from bot.context import Context
from bot.datasets import Datasets
from bot.errors import UserError
from bot.results import RunResult
from bot.runs import WAITING, Runs

if TYPE_CHECKING:
    from storage import Dataset, Run

log = logging.getLogger("tunebot")


class Admin:
    """The admin commands; Workflow._commands() dispatches to them."""

    def __init__(self, ctx: Context, datasets: Datasets, runs: Runs) -> None:
        self.ctx = ctx
        self.datasets = datasets
        self.runs = runs
        self.store = runs.store
        self.settings = runs.settings
        self.gate = runs.gate
        self.clock = runs.clock

    def release(self, cmd: Command, channel: str, user: str) -> render.Message:
        """An approver lets a dataset that may hold secrets go to hosted models."""
        dataset = self.datasets.find_dataset(channel, cmd.target)
        if not self.gate.is_approver(user):
            raise UserError(f"Only an approver can release {dataset.id} (TUNEBOT_APPROVERS).")
        if user == dataset.user:
            raise UserError(f"You uploaded {dataset.id}, so another approver must release it.")
        if not egress.secret_findings(dataset):
            return render.note(
                f"{dataset.id} has no possible secrets: there is nothing to release."
            )
        if not egress.release(self.store, dataset, user):
            return render.note(
                f"{dataset.id} was already released by <@{egress.released_by(self.store, dataset.id)}>."
            )
        log.info("dataset %s released for hosted models by %s", dataset.id, user)
        return render.note(
            f"<@{user}> released {dataset.id} ({egress.secret_findings(dataset):,} possible "
            "secret(s)): it may now go to hosted models for evaluation and chat.",
            in_channel=True,
        )

    def forget(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Forget a dataset: its bytes (if no other dataset has them), its splits, its
        uploads to providers, and the runs still waiting on it."""
        dataset = self.datasets.find_dataset(channel, cmd.target)
        if user != dataset.user and not self.gate.is_approver(user):
            raise UserError(f"Only <@{dataset.user}> or an approver can forget {dataset.id}.")
        self.store.update_dataset(dataset.id, forgotten_at=self.clock(), forgotten_by=user)
        cancelled = []
        for run in self.store.runs(status=list(WAITING), limit=None):
            if dataset.id not in (run.dataset_id, run.eval_dataset_id):
                continue
            if run.external_id and run.provider not in ("local", "distill", "eval"):
                continue  # already training: cancel it by name if it should stop
            if self.store.transition_run(
                run.id, [run.status], "cancelled", error=f"its dataset {dataset.id} was forgotten"
            ):
                self.gate.settle("run", run.id, 0.0, note="dataset forgotten")
                self.store.audit(user, "cancelled", run_id=run.id, detail={"why": "forgotten"})
                cancelled.append(run)
        self.ctx.submit(
            f"forgetting {dataset.id}",
            lambda: self._forget_files(dataset, user, cancelled),
            channel,
            dataset.thread_ts,
        )
        also = f"; {', '.join(r.id for r in cancelled)} cancelled" if cancelled else ""
        return render.note(f"{dataset.id} is forgotten{also}.", in_channel=True)

    def _forget_files(self, dataset: Dataset, user: str, cancelled: list[Run]) -> None:
        shas = {dataset.sha256}
        for run in self.store.runs(channel=dataset.channel, limit=None):
            if run.dataset_id == dataset.id:
                data = RunResult.of(run).data or {}
                shas.update(v for k, v in data.items() if k.endswith("_sha256") and v)
        report = dataset.report_json or {}
        shas.update(report.get(k) for k in ("counts_sha256", "findings_sha256") if report.get(k))
        removed_blobs = 0
        for sha in shas:
            if not self.store.sha_in_use(sha, besides=dataset.id) and self.ctx.blobs.delete(sha):
                removed_blobs += 1
        removed_remote = self.runs.delete_run_files(dataset_id=dataset.id)  # each provider's
        self.store.audit(
            user,
            "forgot",
            dataset_id=dataset.id,
            detail={
                "blobs": removed_blobs,
                "provider_files": removed_remote,
                "cancelled": [r.id for r in cancelled],
            },
        )
        for run in cancelled:
            if run.provider not in ("local", "distill", "eval") and self.runs.backends.reachable(
                run.provider
            ):
                self.runs.cancel_job_by_key(run.id)  # a lost reply may have made one
            self.runs.refresh_card(run.id)
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"<@{run.requested_by}> {run.id} is cancelled: its dataset {dataset.id} "
                    f"was forgotten by <@{user}>."
                ),
            )
        where = f" and {removed_remote} upload(s) to OpenAI" if removed_remote else ""
        self.ctx.post(
            dataset.channel,
            dataset.thread_ts,
            render.note(
                f"{dataset.id} was forgotten by <@{user}>: its stored file(s){where} deleted."
            ),
        )

    def budget(self, channel: str) -> render.Message:
        """This month's spend: the shared total, this channel's paid runs by run and by
        person, and all other channels as one sum (their runs, models and people stay
        in their channels). Totals come from the spend ledger."""
        now = self.clock()
        since = approvals.month_start(now)
        rows = [
            r for r in self.store.runs(channel=channel, limit=None)
            if r.created_at >= since and r.provider != "local" and r.status not in ("rejected", "expired")
        ]  # fmt: skip
        total = self.gate.committed_usd()
        here = self.gate.ledger.committed(self.gate.since(), channel=channel)
        return render.budget_report(
            rows,
            spent_usd=total,
            budget_usd=self.settings.monthly_budget_usd,
            month=f"{now:%B %Y}",
            here_usd=here,
            others_usd=max(total - here, 0.0),
        )

    def audit(self, cmd: Command, channel: str) -> render.Message:
        if cmd.target:
            run = self.runs.find_run(cmd.target, channel)
            rows = self.store.audit_log(run_id=run.id, limit=50)
        else:
            ids = {r.id for r in self.store.runs(channel=channel, limit=None)}
            rows = [e for e in self.store.audit_log(limit=200) if e.run_id in ids][:50]
        return render.audit_log(rows, cmd.target)
