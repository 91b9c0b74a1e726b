"""The local GPU queue: ``provider=local`` runs, oldest first, on TUNEBOT_LOCAL_SLOTS.

A queued run is claimed (bot/claims.py: an owner and a lease, as every
submission is) and launched on a job thread: its model allowed and fetched
(bot/local_models.py), its files prepared, its worker started by the local
runner (`Backends.runner("local")`: a process on this machine, or a Ray job
when ``TUNEBOT_LOCAL_RUNNER=ray``, bot/ray_runs.py). Each scheduler tick
polls the worker and edits the run's progress message; the end records the
adapter, the metrics and the log tail, and frees the slot. `/finetune resume`
queues a failed or cancelled run again from its newest complete checkpoint.

The run lifecycle around this (the claim's lease, `_finish` for a launch
that failed, the success hooks, the Home tabs) is bot/runs.py's, which
builds this as `Runs.local`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import render
from bot.claims import Held, lapsed
from bot.commands import Command
from bot.config import Settings
from bot.errors import Busy, UserError, describe, slack_error
from bot.plans import TrainingPlan
from bot.results import RunResult
from storage import Run
from trainers.runner import RunnerError, RunState

if TYPE_CHECKING:
    from bot.context import Context
    from bot.evaluation import Evaluations
    from bot.run_service import RunService

log = logging.getLogger("tunebot")

UNREACHABLE_NOTICE_SECONDS = 600.0  # a running job unanswered this long: its thread is told once
RAY_RETRY_SECONDS = 30.0  # a local run whose Ray cluster did not answer is tried again after


class LocalQueue:
    """The local runs of one installation; `runs` is the run service that builds it."""

    def __init__(self, ctx: Context, runs: RunService, evals: Evaluations) -> None:
        self.runs = runs  # which builds this
        self.evals = evals
        self.ctx = ctx
        self.store = ctx.store
        self.backends = runs.backends
        self._lock = threading.Lock()  # one dispatch at a time: slots are counted, then taken

    @property
    def settings(self) -> Settings:
        return self.runs.settings

    def dispatch(self) -> None:
        """Start queued local runs, oldest first, while slots are free (FIFO)."""
        with self._lock:
            running = len(self.store.runs(status="running", limit=None, provider="local"))
            queued = sorted(
                self.store.runs(status="queued", limit=None, provider="local"),
                key=lambda r: r.created_at,
            )
            for run in queued[: max(0, self.settings.local_slots - running)]:
                # Claimed here, launched on a job thread: fetching or converting a
                # model can take minutes and must not hold this lock or the poller.
                token = self.runs.claim_token()
                if self.store.claim_run(
                    run.id, ["queued"], "running", owner=token, lease=self.runs.lease,
                    external_id=None,
                ):  # fmt: skip
                    try:
                        self.ctx.submit(
                            f"starting {run.id}",
                            lambda run_id=run.id, token=token: self._launch_claimed(run_id, token),
                            run.channel,
                            run.thread_ts,
                            long=True,
                            on_busy=lambda run_id=run.id, token=token: self.store.release_claim(
                                run_id, token, from_status="running", to_status="queued"
                            ),
                        )
                    except Busy:  # queued again: a later tick starts it
                        break
            for position, run in enumerate(
                queued[max(0, self.settings.local_slots - running) :], 1
            ):
                self._show_position(run, position, len(queued))

    def _launch_claimed(self, run_id: str, token: str) -> None:
        """Launch a claimed local run; whatever goes wrong ends it, visibly."""
        with Held(self.store, run_id, token, self.runs.lease, "running"):
            run = self.store.get_run(run_id)
            try:
                self._launch_local(run)
            except RunnerError as exc:
                if not (exc.retryable and self.backends.on_ray):
                    raise
                # No Ray cluster answers (yet): the run keeps its place and is tried again.
                log.info("run %s: Ray cluster unavailable (%s); queued again", run_id, exc.message)
                retry = self.runs.clock() + dt.timedelta(seconds=RAY_RETRY_SECONDS)
                self.store.release_claim(
                    run_id, token, from_status="running", to_status="queued", retry_at=retry
                )
                message = render.ray_unavailable(run, exc.summary, RAY_RETRY_SECONDS)
                if run.progress_ts:
                    self._update(run, run.progress_ts, message)
                else:
                    self.store.update_run(
                        run_id, progress_ts=self.ctx.post(run.channel, run.thread_ts, message)
                    )
                return
            except Exception as exc:
                log.error("run %s: launch failed: %s: %s", run_id, type(exc).__name__, exc)
                self.runs._finish(
                    run, "running", "failed",
                    error=f"the worker could not start ({describe(exc, self.settings.home)})",
                )  # fmt: skip
            finally:
                self.store.release_claim(run_id, token, from_status="running")
        self.dispatch()  # a failed launch frees its slot

    def _launch_local(self, run: Run) -> None:
        from bot.local_models import LocalModels
        from trainers.local import complete_checkpoints
        from trainers.runner import TrainingSpec

        plan = TrainingPlan.from_json(run.plan_json)
        run_dir = self.backends.run_dir(run.id)
        try:  # allowed when requested; still allowed now? (a link may have moved, a run gone)
            model = LocalModels(self.settings, self.store).for_launch(
                plan.model, run.channel, run_dir
            )
        except Exception as exc:
            self.runs._finish(
                run, "running", "failed", error=f"cannot get model {plan.model}: {exc}"
            )
            return
        data = self._training_files(run)
        spec = TrainingSpec(
            run_id=run.id,
            model=model,
            train_file=Path(data["train"]),
            eval_file=Path(data["eval"]) if data.get("eval") else None,
            hyperparameters=self._hyperparameters(run),
            output_dir=run_dir,
        )
        if self.backends.on_ray:
            from bot import ray_runs

            attempt = RunResult.of(run).attempt
            worker, resume = ray_runs.submit(
                self.backends.runner("local"), spec, self.backends.key(run.id), attempt
            )
            detail: dict[str, Any] = {"ray_job": worker.id, "adopted": worker.reused}
        else:
            resume = bool(complete_checkpoints(run_dir))
            worker = self.backends.runner("local").submit(spec, self.backends.key(run.id))
            detail = {"pid": int(worker.id.removeprefix("pid:"))}
        self.store.update_run(run.id, external_id=worker.id)
        self.store.audit(
            "tunebot", "resumed" if resume else "started", run_id=run.id,
            plan_hash=run.plan_hash, detail=detail,
        )  # fmt: skip
        log.info("run %s: local worker %s%s", run.id, worker.id, " (resuming)" if resume else "")
        message = render.local_progress(self.store.get_run(run.id), None)
        if run.progress_ts:
            self._update(run, run.progress_ts, message)
        else:
            ts = self.ctx.post(run.channel, run.thread_ts, message)
            self.store.update_run(run.id, progress_ts=ts)

    def _hyperparameters(self, run: Run) -> dict[str, Any]:
        return {
            **TrainingPlan.from_json(run.plan_json).hyperparameters(),
            **self.runs.local_overrides,
        }

    def _training_files(self, run: Run) -> dict[str, str]:
        data = self.evals.prepare(run)
        files = {"train": str(self.ctx.blobs.path(data["train_sha256"]))}
        if data.get("eval_sha256"):
            files["eval"] = str(self.ctx.blobs.path(data["eval_sha256"]))
        return files

    def _show_position(self, run: Run, position: int, total: int) -> None:
        waiting = None
        if self.backends.on_ray:
            from bot import ray_runs

            gpus = ray_runs.gpus_needed(self._hyperparameters(run))
            waiting = ray_runs.waiting_for(self.backends.runner("local"), gpus)
        message = render.queued(run, position, total, waiting=waiting)
        if run.progress_ts:
            self._update(run, run.progress_ts, message)
        else:
            ts = self.ctx.post(run.channel, run.thread_ts, message)
            self.store.update_run(run.id, progress_ts=ts)

    def _update(self, run: Run, ts: str, message: render.Message) -> None:
        try:
            self.ctx.client.chat_update(channel=run.channel, ts=ts, **message.to_kwargs())
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot update %s's message: %s", run.id, slack_error(exc))

    def poll(self, run: Run) -> None:
        """One scheduler tick for a local run: a queued one is dispatched, a launch
        whose claim lapsed is queued again, a running worker is polled (its progress
        message edited every TUNEBOT_PROGRESS_SECONDS) and a finished one ended."""
        if run.status in ("approved", "queued"):
            self.dispatch()
            return
        if not run.external_id:  # being launched, or its launcher died
            if lapsed(run, self.runs.clock()) and self.store.transition_run(
                run.id, ["running"], "queued", owner=None, lease_expires_at=None
            ):
                log.info("run %s: launch interrupted; queued again", run.id)
                self.dispatch()
            return
        try:
            state = self.backends.runner("local").poll(self.backends.handle(run))
        except RunnerError as exc:  # the cluster did not answer: the next tick asks again
            log.info("run %s: poll failed (%s); next time", run.id, exc.message)
            self._unanswered(run, exc)
            return
        run = self._answered(run)
        if state.terminal:
            self._finish_local(run, state)
            self.dispatch()  # a slot is free
            return
        data = RunResult.of(run)
        now = time.time()
        if now - data.progress_edited_at >= self.settings.progress_seconds and run.progress_ts:
            data = data.with_(progress_edited_at=now)
            waiting = None
            if (
                self.backends.on_ray and state.step is None
            ):  # Ray (or Ray Train) has not started it yet
                from bot import ray_runs

                gpus = ray_runs.gpus_needed(self._hyperparameters(run))
                waiting = ray_runs.waiting_for(self.backends.runner("local"), gpus)
            self._update(run, run.progress_ts, render.local_progress(run, state, waiting=waiting))
            self.store.update_run(run.id, result_json=data.to_json())

    def _unanswered(self, run: Run, exc: RunnerError) -> None:
        """A poll failed: record since when; after UNREACHABLE_NOTICE_SECONDS of failures,
        tell the run's thread once (the job may still train; tunebot keeps asking)."""
        data = RunResult.of(run)
        now = time.time()
        if data.unreachable_since is None:
            self.store.update_run(run.id, result_json=data.with_(unreachable_since=now).to_json())
            return
        if data.unreachable_said or now - data.unreachable_since < UNREACHABLE_NOTICE_SECONDS:
            return
        # Recorded before the post: a second poller reads it and stays quiet.
        self.store.update_run(run.id, result_json=data.with_(unreachable_said=True).to_json())
        minutes = int((now - data.unreachable_since) // 60)
        self.ctx.post(run.channel, run.thread_ts, render.unanswered(run, minutes, exc.summary))

    def _answered(self, run: Run) -> Run:
        """A poll answered: forget the failures; a thread told of them hears it is back."""
        data = RunResult.of(run)
        if data.unreachable_since is None:
            return run
        cleared = data.with_(unreachable_since=None, unreachable_said=False)
        self.store.update_run(run.id, result_json=cleared.to_json())
        if data.unreachable_said:
            self.ctx.post(run.channel, run.thread_ts, render.answered_again(run))
        return self.store.get_run(run.id)

    def _finish_local(self, run: Run, state: RunState) -> None:
        if self.backends.on_ray and state.status == "succeeded":
            from bot import ray_runs

            if state.output.get("unreachable"):  # followed from the job's log: no copy
                home = dict.fromkeys(ray_runs.FOLDERS)
                log.warning("run %s: the artifacts are out of reach; adapter not copied", run.id)
            else:
                try:  # the evaluation and /finetune chat load the adapter from this machine
                    home = ray_runs.copy_home(
                        self.backends.runner("local"), state, self.backends.run_dir(run.id)
                    )
                except RunnerError as exc:
                    log.error("run %s: adapter not copied home: %s", run.id, exc.message)
                    return  # the next tick tries again
            state = replace(state, output={**state.output, **home})
        data = RunResult.of(run).with_(
            adapter_dir=state.output.get("adapter_dir"),
            merged_dir=state.output.get("merged_dir"),
            metrics=state.output.get("metrics"),
            log_tail=state.log_tail,
        )
        error = state.error
        if not self.store.transition_run(
            run.id,
            ["running"],
            state.status,
            actual_usd=0.0,
            result_json=data.to_json(),
            error=error,
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
        self.ctx.post(run.channel, run.thread_ts, render.local_result(done, state))
        self.runs._refresh_homes(done)
        self.runs._after_end(
            done, state.metrics, state.log_tail if state.status == "failed" else None
        )

    def resume(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune resume <run>`: a failed or cancelled local run queued again, to
        continue from its newest complete checkpoint (on Ray: a new job, the next
        attempt). For its requester or an approver; UserError otherwise, or when
        the run is not local, has no complete checkpoint, or is not failed or cancelled, and
        on Ray while the run's last job is still waiting or stopping on the cluster (a
        second job would share its folder) or the cluster does not answer."""
        from trainers import local

        run = self.runs.find_run(cmd.target, channel)
        if run.provider != "local":
            raise UserError(f"{run.id} ran on OpenAI; only local runs resume from a checkpoint.")
        if user != run.requested_by and user not in self.runs.approvers.policy().approvers:
            raise UserError(f"Only <@{run.requested_by}> or an approver can resume {run.id}.")
        data = RunResult.of(run)
        if self.backends.on_ray:  # the checkpoints are in the run's artifacts folder; a new Ray job
            from bot import ray_runs

            runner = self.backends.runner("local")
            if run.external_id:
                try:
                    held = ray_runs.still_held(runner, self.backends.key(run.id), run.external_id)
                except RunnerError as exc:
                    raise UserError(
                        f"The Ray cluster did not answer, so {run.id}'s last job cannot be "
                        f"checked: {exc.summary.rstrip('.')}. Try again when it answers."
                    ) from None
                if held:
                    raise UserError(
                        f"{run.id}'s last Ray job is still waiting or stopping on the cluster; "
                        f"`/finetune resume {run.id}` once it has stopped."
                    )
            try:
                names = ray_runs.checkpoints(runner, self.backends.key(run.id))
            except RunnerError as exc:  # an s3 root whose store does not answer
                log.warning("run %s: checkpoints not listed: %s", run.id, exc.message)
                raise UserError(
                    f"The artifacts store did not answer, so {run.id}'s checkpoints cannot be "
                    "listed. Try again in a minute."
                ) from None
            data = data.with_(attempt=data.attempt + 1)
        else:
            names = [p.name for p in local.complete_checkpoints(self.backends.run_dir(run.id))]
        if not names:
            raise UserError(f"{run.id} has no complete checkpoint to resume from.")
        if not self.store.transition_run(
            run.id, ["failed", "cancelled"], "queued", error=None, result_json=data.to_json()
        ):
            raise UserError(f"{run.id} is {run.status}; only a failed or cancelled run resumes.")
        self.store.audit(
            user,
            "resume_requested",
            run_id=run.id,
            plan_hash=run.plan_hash,
            detail={"checkpoint": names[-1]},
        )
        self.ctx.submit(f"resuming {run.id}", self.dispatch, channel, run.thread_ts)
        return render.note(f"{run.id} resumes from {names[-1]}.", in_channel=True)

    def cancel(self, run: Run, user: str) -> render.Message:
        """Stop a running local run (`/finetune cancel`): its worker saves a checkpoint
        first. UserError when its worker is not running any more."""
        if self.backends.on_ray and run.external_id:
            return self._cancel_ray_job(run, user)
        from trainers import local

        if not local.alive(local.worker_of(self.backends.run_dir(run.id))):
            raise UserError(
                f"{run.id}'s worker is not running; the next poll will say how it ended."
            )
        self.backends.runner("local").cancel(self.backends.handle(run))
        self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
        return render.note(
            f"Stopping {run.id}: it saves a checkpoint first (`/finetune resume {run.id}` continues).",
            in_channel=True,
        )

    def _cancel_ray_job(self, run: Run, user: str) -> render.Message:
        """Ray's stop_job: SIGTERM, the worker saves a checkpoint, then stops. A job Ray has
        not started (waiting for GPUs) would only stop once it could start, so the run ends
        here and now; the stop request waits at the cluster."""
        runner = self.backends.runner("local")
        try:
            pending = runner.poll(self.backends.handle(run)).status == "queued"
            runner.cancel(self.backends.handle(run))
        except RunnerError as exc:
            raise UserError(f"The Ray cluster did not stop {run.id}: {exc.summary}") from None
        self.store.audit(user, "cancel_requested", run_id=run.id, plan_hash=run.plan_hash)
        if pending and self.store.transition_run(run.id, ["running"], "cancelled", actual_usd=0.0):
            self.store.audit(user, "cancelled", run_id=run.id, plan_hash=run.plan_hash)
            done = self.store.get_run(run.id)
            if done.progress_ts:
                self._update(done, done.progress_ts, render.cancelled_before_start(done))
            self.runs._refresh_homes(done)
            self.ctx.submit(f"updating {run.id}", self.dispatch, run.channel, run.thread_ts)
            return render.note(
                f"{run.id} left the Ray cluster's queue and is cancelled.", in_channel=True
            )
        return render.note(
            f"Stopping {run.id}: it saves a checkpoint first (`/finetune resume {run.id}` continues).",
            in_channel=True,
        )
