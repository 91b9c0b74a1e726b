"""`/finetune download rN [merged]`: a Together run's weights, fetched into tunebot's home.

A succeeded Together run's output lives at Together. This fetches it
(`TogetherRunner.download`: ``fine_tuning.content``) on a long job thread into
``<TUNEBOT_HOME>/runs/<run>/together/`` — the archive as Together sent it and
its contents unpacked beside it, in ``adapter/``, ``merged/`` or ``model/`` (a
full fine-tune) — and records the folder in the run's result (``downloads``),
so local evaluation, chat and serving can load it (`/finetune eval|chat rN
local`: bot/offline.py). Who may: the run's requester or an approver, in the
run's channel (as `/finetune cancel`). One download per run and kind at a
time; a kind already fetched is not fetched again.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from bot import render
from bot.commands import Command
from bot.errors import Busy, UserError
from bot.results import RunResult
from storage import Run
from trainers.runner import RunnerError

if TYPE_CHECKING:
    from bot.context import Context
    from bot.run_service import RunService

log = logging.getLogger("tunebot")

KINDS = ("adapter", "merged")  # what `download` takes after the run; a full run has `model`


class Downloads:
    def __init__(self, ctx: Context, runs: RunService) -> None:
        self.ctx = ctx
        self.runs = runs
        self.store = ctx.store
        self._busy: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def folder(self, run: Run) -> Path:
        """Where a run's downloads go: ``<home>/runs/<run>/together``."""
        return self.runs.settings.home / "runs" / run.id / "together"

    def request(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Check who and what now (in the ack); the download itself runs on a job thread."""
        run = self.runs.find_run(cmd.target, channel)
        if user != run.requested_by and not self.runs.gate.is_approver(user):
            raise UserError(f"Only <@{run.requested_by}> or an approver can download {run.id}.")
        if self.runs.backends.kind(run.provider) != "together":
            raise UserError(
                f"{run.id} trained on {render.provider_name(run.provider)}; only Together runs "
                "have weights to download (a local run's adapter is already in tunebot's home)."
            )
        if run.status != "succeeded" or not run.external_id:
            raise UserError(f"{run.id} is {run.status}: only a succeeded run has weights.")
        asked = cmd.args[1].lower() if len(cmd.args) > 1 else None
        if asked is not None and asked not in KINDS:
            raise UserError(
                f"`{render.escape(cmd.args[1])}` is not something to download: say `merged`, "
                f"or nothing for the adapter (`/finetune download {run.id} merged`)."
            )
        full = not (run.plan_json or {}).get("lora", True)
        if full and asked is not None:
            raise UserError(f"{run.id} was a full fine-tune: it has the model's weights only.")
        kind = "model" if full else asked or "adapter"
        done = (RunResult.of(run).downloads or {}).get(kind)
        if done and (self.runs.settings.home / done).is_dir():
            return render.note(f"{run.id}'s {kind} is already in tunebot's home: `{done}`.")
        with self._lock:
            if (run.id, kind) in self._busy:
                return render.note(f"{run.id}'s {kind} is being fetched; its thread says when.")
            self._busy.add((run.id, kind))
        try:
            self.ctx.submit(
                f"downloading {run.id}'s {kind}",
                lambda: self._fetch(run.id, kind),
                channel,
                run.thread_ts,
                long=True,
                on_busy=lambda: self._done(run.id, kind),
            )
        except Busy as exc:
            raise UserError(
                f"tunebot is busy ({exc.ahead} jobs ahead); ask again in a minute."
            ) from None
        self.store.audit(user, "download_requested", run_id=run.id, detail={"kind": kind})
        return render.note(f"Fetching {run.id}'s {kind} from Together; its thread says when.")

    def _done(self, run_id: str, kind: str) -> None:
        with self._lock:
            self._busy.discard((run_id, kind))

    def _fetch(self, run_id: str, kind: str) -> None:
        try:
            self._fetch_and_record(run_id, kind)
        finally:  # only once the folder is recorded: a request meanwhile finds it done
            self._done(run_id, kind)

    def _fetch_and_record(self, run_id: str, kind: str) -> None:
        from trainers.together_ft import unpack

        run = self.store.get_run(run_id)
        home = self.runs.settings.home
        dest = self.folder(run)
        into = dest / kind
        try:
            runner = self.runs.backends.runner(run.provider)
            archive = runner.download(self.runs.backends.handle(run), dest, kind)
            if into.exists():
                shutil.rmtree(into)
            unpack(archive, into)
        except (RunnerError, UserError, OSError) as exc:  # OSError: a full disk, say
            shutil.rmtree(into, ignore_errors=True)  # a part-unpacked archive is not kept
            why = (
                exc.summary
                if isinstance(exc, UserError)
                else exc.message
                if isinstance(exc, RunnerError)
                else f"{type(exc).__name__}: {exc}"
            )
            log.error("run %s: %s download failed: %s", run_id, kind, why)
            self.ctx.post(
                run.channel,
                run.thread_ts,
                render.note(
                    f"{run_id}: the {kind} could not be downloaded: "
                    + render.escape(render.short_paths(why.replace(str(home), "TUNEBOT_HOME")))
                ),
            )
            return
        where = str(into.relative_to(home))
        size = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
        with self.store.transaction():  # what else the run recorded meanwhile stays
            record = RunResult.of(self.store.get_run(run_id))
            record = record.with_(downloads={**(record.downloads or {}), kind: where})
            self.store.update_run(run_id, result_json=record.to_json())
        self.store.audit("tunebot", "downloaded", run_id=run_id, detail={"kind": kind})
        log.info("run %s: %s downloaded to %s", run_id, kind, into)
        self.ctx.post(
            run.channel,
            run.thread_ts,
            render.note(
                f"{run_id}'s {kind} is in tunebot's home: `{where}` ({size / 1e6:,.1f} MB, "
                f"archive `{archive.relative_to(home)}`)."
                + (
                    f" `/finetune eval {run_id} local` and `/finetune chat {run_id} local "
                    '"…"` run it on this machine, with no call to Together.'
                    if kind == "adapter"
                    else ""
                )
            ),
        )
