"""The use-cases behind the listeners: ingest a dropped file, answer /finetune.

Listeners only parse and hand off. Slow work (downloads, validation, uploads)
runs here, on the bot's own job threads, never on Bolt's listener pool; the
CPU-bound validation runs in a worker process so it never slows the acks.
Every failure in a job reaches the thread through one path: `_job` catches
it and posts `render.error`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import render
from bot.commands import Command
from bot.config import Settings
from storage import BlobStore, BlobTooLarge, Dataset, Store
from trainers import pricing
from trainers.data import Finding, Report, TokenStats

log = logging.getLogger("tunebot")

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")


class UserError(Exception):
    """A problem a person can act on; `summary` and `detail` are shown as they are."""

    def __init__(self, summary: str, detail: str | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail


@dataclass(frozen=True)
class FileDrop:
    file_id: str
    channel: str
    user: str | None
    thread_ts: str | None = None  # where to reply; looked up when unknown
    file: dict | None = None  # the Slack file object, when the event carried it


def validate_file(path: str, context_tokens: int, max_file_bytes: int, encoding: str) -> Report:
    """Runs in the validation worker process."""
    from trainers.data import validate

    return validate(
        path, context_tokens=context_tokens, max_file_bytes=max_file_bytes, encoding=encoding
    )


class Workflow:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: BlobStore,
        client: WebClient,
        *,
        jobs: Executor | None = None,
        validation_pool: Executor | None = None,
        tuner: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.client = client
        self.prices = _price_table(settings)
        self.jobs = jobs or ThreadPoolExecutor(max_workers=4, thread_name_prefix="tunebot-job")
        self._validation_pool = validation_pool
        self._pending: set[Future] = set()
        self._pending_lock = threading.Lock()
        from bot.runs import Runs  # runs build on this class

        self.runs = Runs(self, tuner=tuner)

    # --- plumbing -------------------------------------------------------------

    @property
    def validation_pool(self) -> Executor:
        if self._validation_pool is None:
            import multiprocessing

            # forkserver: the bot is multi-threaded, and fork would copy held locks.
            self._validation_pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("forkserver")
            )
        return self._validation_pool

    def close(self) -> None:
        self.jobs.shutdown(wait=True, cancel_futures=True)
        if self._validation_pool is not None:
            self._validation_pool.shutdown(wait=True, cancel_futures=True)

    def submit(
        self, what: str, fn: Callable[[], Any], channel: str, thread_ts: str | None
    ) -> Future:
        future = self.jobs.submit(self._job, what, fn, channel, thread_ts)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every job started so far (and the jobs they start). False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._pending_lock:
                pending = list(self._pending)
            if not pending:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait(pending, timeout=left)

    def _job(self, what: str, fn: Callable[[], Any], channel: str, thread_ts: str | None) -> None:
        try:
            fn()
        except UserError as exc:
            log.info("%s: %s", what, exc.summary)
            if channel:
                self.post(channel, thread_ts, render.error(exc.summary, exc.detail))
        except Exception as exc:  # every unexpected job error ends here, and in the thread
            message = self.unexpected(exc, what)
            if channel:
                self.post(channel, thread_ts, message)

    def unexpected(self, exc: BaseException, what: str) -> render.Message:
        """Log an unexpected error in one line and word it for the person who asked."""
        log.error(
            "%s failed: %s: %s",
            what,
            type(exc).__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        return render.error(
            f"Something went wrong while {what}.", "The details are in the bot's log."
        )

    def first_delivery(self, event_id: str | None) -> bool:
        """False for a delivery of an event already seen (Slack retries)."""
        return not event_id or self.store.mark_seen(f"event:{event_id}")

    def post(self, channel: str, thread_ts: str | None, message: render.Message) -> str | None:
        try:
            resp = self.client.chat_postMessage(
                channel=channel, thread_ts=thread_ts, unfurl_links=False, **message.to_kwargs()
            )
        except SlackApiError as exc:
            log.error("cannot post to %s: %s", channel, exc.response.get("error"))
            return None
        return resp.get("ts")

    # --- file drops -------------------------------------------------------------

    def file_dropped(self, drop: FileDrop) -> bool:
        """Dedupe and hand off. True when this call scheduled the work.

        Slack retries deliveries and sends both message/file_share and
        file_shared for one file: the first of them wins, atomically.
        """
        if not self.settings.serves(drop.channel):
            return False
        if drop.file and not _is_jsonl(drop.file):
            return False
        if not self.store.mark_seen(f"file:{drop.file_id}"):
            return False
        self.submit(
            f"checking file {drop.file_id}", lambda: self.ingest(drop), drop.channel, drop.thread_ts
        )
        return True

    def ingest(self, drop: FileDrop) -> Dataset | None:
        started = time.monotonic()
        file = (
            drop.file
            if drop.file and drop.file.get("url_private_download")
            else self._file_info(drop.file_id)
        )
        if not _is_jsonl(file):
            return None
        thread_ts = drop.thread_ts or _share_ts(file, drop.channel)
        name = file.get("name") or drop.file_id
        size = int(file.get("size") or 0)
        limit = self.settings.max_file_bytes
        if size > limit:
            log.info(
                "file %s (%s) refused: %d bytes over the %d limit", drop.file_id, name, size, limit
            )
            raise UserError(
                f"{name} is {size / 2**20:,.1f} MiB; the limit is {self.settings.max_file_mb:,} MiB, "
                "so it was not downloaded.",
                "Split it, sample it, or raise TUNEBOT_MAX_FILE_MB.",
            )
        sha, size = self._download(file, limit)
        dataset, report = self.register(
            sha,
            size,
            name=name,
            channel=drop.channel,
            thread_ts=thread_ts,
            user=drop.user or file.get("user"),
            file_id=drop.file_id,
        )
        log.info(
            "file %s -> %s: %d examples, %d valid, %d errors, %d warnings (%.1f s)",
            drop.file_id, dataset.id, report.examples, report.valid_examples,
            len(report.errors), len(report.warnings), time.monotonic() - started,
        )  # fmt: skip
        return self.store.get_dataset(dataset.id)

    def register(
        self,
        sha: str,
        size: int,
        *,
        name: str,
        channel: str,
        thread_ts: str | None,
        user: str | None,
        file_id: str | None = None,
        source_dataset_id: str | None = None,
    ) -> tuple[Dataset, Report]:
        """Record a stored file as a dataset, validate it, and post its report in the thread."""
        dataset = self.store.add_dataset(
            sha256=sha,
            name=name,
            channel=channel,
            thread_ts=thread_ts,
            file_id=file_id,
            user=user,
            size_bytes=size,
            source_dataset_id=source_dataset_id,
        )
        model = self.prices.resolve(self.settings.default_model)
        report = self.validation_pool.submit(
            validate_file,
            str(self.blobs.path(sha)),
            model.context,
            self.settings.max_file_bytes,
            model.encoding,
        ).result()
        report.path = name
        costs, local = self._costs(report.token_counts, model.name, None)
        counts_sha = self.blobs.put_bytes(report.token_counts.tobytes())
        findings_sha = self.blobs.put_bytes(
            json.dumps([f.to_dict() for f in report.findings]).encode("utf-8")
        )
        self.store.update_dataset(
            dataset.id,
            examples=report.examples,
            valid_examples=report.valid_examples,
            errors=len(report.errors),
            warnings=len(report.warnings),
            tokens_total=report.tokens.total,
            report_json=_report_record(report, counts_sha, findings_sha),
        )
        self.post(
            channel,
            thread_ts,
            render.validation_report(name, report, costs, local, dataset_id=dataset.id),
        )
        self._upload_histogram(channel, thread_ts, dataset.id, name, report, model.context)
        return dataset, report

    def _file_info(self, file_id: str) -> dict:
        try:
            return self.client.files_info(file=file_id)["file"]
        except SlackApiError as exc:
            raise UserError(
                f"Slack would not describe file {file_id} ({exc.response.get('error')})."
            ) from None

    def _download(self, file: dict, limit: int) -> tuple[str, int]:
        url = file.get("url_private_download") or file.get("url_private")
        if not url:
            raise UserError(f"Slack gave no download link for {file.get('name')}.")
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {self.settings.slack_bot_token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                # Slack answers a bad token with its HTML sign-in page and a 200.
                if resp.headers.get_content_type() == "text/html":
                    raise UserError(
                        f"Could not download {file.get('name')}: Slack sent a sign-in page.",
                        "Check that the bot has the files:read scope and is in this channel.",
                    )
                return self.blobs.put_stream(resp, max_bytes=limit)
        except BlobTooLarge:
            raise UserError(
                f"{file.get('name')} is over the {self.settings.max_file_mb:,} MiB limit."
            ) from None
        except urllib.error.HTTPError as exc:
            raise UserError(
                f"Could not download {file.get('name')}: Slack answered HTTP {exc.code}."
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise UserError(
                f"Could not download {file.get('name')}: {getattr(exc, 'reason', exc)}."
            ) from None

    def _upload_histogram(
        self,
        channel: str,
        thread_ts: str | None,
        dataset_id: str,
        name: str,
        report: Report,
        context: int,
    ) -> None:
        from bot.charts import token_histogram

        png = token_histogram(
            list(report.token_counts),
            title=f"{name} ({dataset_id}): tokens per example",
            limit=context,
        )
        try:
            self.client.files_upload_v2(
                channel=channel,
                thread_ts=thread_ts,
                content=png,
                filename=f"tokens-{dataset_id}.png",
                title=f"Token lengths of {dataset_id}",
            )
        except SlackApiError as exc:
            log.error("histogram for %s not uploaded: %s", dataset_id, exc.response.get("error"))

    def _costs(self, counts: Any, model: str, epochs: int | None):
        costs = pricing.cost_table(counts, self.prices, model, epochs)
        local = pricing.local_estimates(counts)
        return costs, local

    def refresh_home(self, user: str) -> None:
        self.submit("refreshing the Home tab", lambda: self.publish_home(user), "", None)

    def home(self, user: str) -> dict:
        """The Home tab for `user`; channels outside TUNEBOT_CHANNELS stay out of it."""
        runs = [r for r in self.store.runs(limit=200) if self.settings.serves(r.channel)]
        approvers = self.runs.policy().approvers
        waiting = [
            r for r in runs
            if r.status == "pending_approval" and user in approvers and r.requested_by != user
        ]  # fmt: skip
        active = [r for r in runs if r.status in ("approved", "queued", "running")]
        evals = [e for r in runs[:20] for e in self.store.evals(r.id)][-5:]
        datasets = [d for d in self.store.datasets(limit=20) if self.settings.serves(d.channel)][:5]
        return render.home_view(
            user=user,
            active=active,
            waiting=waiting,
            datasets=datasets,
            evals=evals,
            spent_usd=self.runs.committed_usd(),
            budget_usd=self.settings.monthly_budget_usd,
        )

    def publish_home(self, user: str) -> None:
        self.client.views_publish(user_id=user, view=self.home(user))

    # --- datasets and reports ------------------------------------------------------

    def find_dataset(self, channel: str, ref: str | None) -> Dataset:
        if ref is None:
            dataset = self.store.latest_dataset(channel)
            if dataset is None:
                raise UserError("No dataset in this channel yet: drop a .jsonl file here first.")
            return dataset
        dataset = self.store.find_dataset(ref.lower())
        if dataset is None or dataset.channel != channel:
            raise UserError(f"No dataset `{ref}` in this channel. `/finetune datasets` lists them.")
        return dataset

    def stored_report(self, dataset: Dataset) -> Report:
        record = dataset.report_json
        if not record:
            raise UserError(
                f"{dataset.id} has no report yet: it is still being checked, or the check failed."
            )
        counts = array("q")
        counts.frombytes(self.blobs.path(record["counts_sha256"]).read_bytes())
        return Report(
            path=dataset.name or dataset.id,
            size_bytes=dataset.size_bytes or 0,
            examples=record["examples"],
            valid_examples=record["valid_examples"],
            findings=[
                Finding(**f)
                for f in json.loads(self.blobs.path(record["findings_sha256"]).read_bytes())
            ],
            tokens=TokenStats(**record["tokens"]),
            token_counts=counts,
            encoding=record.get("encoding", "o200k_base"),
            context_tokens=record.get("context_tokens", 65_536),
        )

    def repost_report(self, dataset: Dataset) -> None:
        report = self.stored_report(dataset)
        costs, local = self._costs(report.token_counts, self.settings.default_model, None)
        self.post(
            dataset.channel,
            dataset.thread_ts,
            render.validation_report(report.path, report, costs, local, dataset_id=dataset.id),
        )

    def post_estimate(self, dataset: Dataset, model: str, epochs: int | None) -> None:
        report = self.stored_report(dataset)
        costs, local = self._costs(report.token_counts, model, epochs)
        message = render.estimate_summary(f"{report.path} ({dataset.id})", report, costs, local)
        self.post(dataset.channel, dataset.thread_ts, message)

    # --- /finetune ---------------------------------------------------------------

    def command(self, cmd: Command, channel: str, user: str) -> render.Message:
        """Answer a parsed /finetune within the ack; slow parts go to a job.

        Returns the ack's message. `Message.in_channel` marks answers everyone
        needs; the rest are ephemeral.
        """
        if not self.settings.serves(channel):
            return render.error("tunebot does not serve this channel (see TUNEBOT_CHANNELS).")
        if cmd.name == "help":
            return render.help_text(unknown=cmd.target)
        if cmd.name == "datasets":
            return render.datasets_list(self.store.datasets(channel=channel, limit=15))
        if cmd.name == "runs":
            return render.runs_list(self.store.runs(channel=channel, limit=15))
        if cmd.name == "status":
            return self._status(cmd, channel)
        if cmd.name in ("train", "distill"):
            return self.runs.request(cmd, channel, user)
        if cmd.name == "chat":
            return self.runs.distiller.chat(cmd, channel)
        if cmd.name == "cancel":
            return self.runs.cancel(cmd, channel, user)
        if cmd.name == "eval":
            return self.runs.evals.request(cmd.target, channel, cmd.options.get("eval"))
        if cmd.name == "budget":
            return self.runs.budget(channel)
        if cmd.name == "resume":
            return self.runs.resume(cmd, channel, user)
        if cmd.name == "audit":
            return self.runs.audit(cmd, channel)
        if cmd.name == "forget":
            return self.runs.forget(cmd, channel, user)
        if cmd.name == "validate":
            dataset = self.find_dataset(channel, cmd.target)
            self.stored_report(dataset)  # fail now, in the ack, if there is nothing to show
            self.submit(
                f"reposting {dataset.id}'s report",
                lambda: self.repost_report(dataset),
                channel,
                dataset.thread_ts,
            )
            return render.note(f"Posting {dataset.id}'s report in its thread.")
        if cmd.name == "estimate":
            dataset = self.find_dataset(channel, cmd.target)
            try:
                model = self.prices.resolve(cmd.options.get("model", self.settings.default_model))
                epochs = pricing.parse_epochs(cmd.options.get("epochs"))
            except ValueError as exc:
                raise UserError(str(exc)) from None
            self.stored_report(dataset)
            self.submit(
                f"estimating {dataset.id}",
                lambda: self.post_estimate(dataset, model.name, epochs),
                channel,
                dataset.thread_ts,
            )
            return render.note(
                f"Posting the estimate for {dataset.id} on {model.name} in its thread."
            )
        return render.help_text(unknown=cmd.name)

    def _status(self, cmd: Command, channel: str) -> render.Message:
        if cmd.target:
            run = self.store.find_run(cmd.target.lower())
            if run is None or run.channel != channel:
                raise UserError(
                    f"No run `{cmd.target}` in this channel. `/finetune runs` lists them."
                )
        else:
            runs = self.store.runs(channel=channel, limit=1)
            if not runs:
                raise UserError("No runs in this channel yet.")
            run = runs[0]
        return render.run_status(run)


def _price_table(settings: Settings) -> pricing.PriceTable:
    if settings.prices_file is None:
        return pricing.PriceTable()
    return pricing.PriceTable.from_file(settings.prices_file)


def _is_jsonl(file: dict) -> bool:
    name = (file.get("name") or "").lower()
    return name.endswith(JSONL_SUFFIXES) or file.get("filetype") in ("jsonl",)


def _share_ts(file: dict, channel: str) -> str | None:
    """The ts of the message that shared `file` in `channel`: the thread to reply in."""
    for kind in ("public", "private"):
        for share in (file.get("shares") or {}).get(kind, {}).get(channel, []):
            return share.get("thread_ts") or share.get("ts")
    return None


def _report_record(report: Report, counts_sha: str, findings_sha: str) -> dict:
    """The report's summary for the database; findings and counts live in blobs."""
    return {
        "examples": report.examples,
        "valid_examples": report.valid_examples,
        "findings_sha256": findings_sha,
        "codes": {code: len(group) for code, group in report.by_code().items()},
        "tokens": {**report.tokens.to_dict(), "mean": report.tokens.mean},
        "counts_sha256": counts_sha,
        "encoding": report.encoding,
        "context_tokens": report.context_tokens,
    }
