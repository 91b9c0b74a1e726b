"""Datasets: a dropped file ingested, a stored file registered, reports and estimates.

A file shared in a served channel is claimed once per (file, channel)
before the ack (`file_dropped`), then checked on a long job
(`ingest_work`): described by `files.info`, downloaded from Slack's file
hosts only (bot/downloads.py), stored by sha256, validated and its tokens
counted in the worker process, recorded, and its report posted in the
file's thread. `/finetune validate`, `estimate` and `convert` answer from
what was stored. Runs, evaluations and distillation find their datasets
here (`find_dataset`, `stored_report`, `register`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from array import array
from dataclasses import asdict, dataclass, replace
from typing import Any

from slack_sdk.errors import SlackApiError

from bot import downloads, file_events, render
from bot.commands import Command
from bot.config import Settings
from bot.context import Context
from bot.errors import Busy, UserError, slack_error
from bot.file_events import is_gone, is_stub, share_thread, training_data
from storage import BlobTooLarge, Dataset
from trainers import pricing
from trainers.data import Finding, Report, TokenStats

log = logging.getLogger("tunebot")


@dataclass(frozen=True)
class FileDrop:
    """A file shared in a channel, as one Slack event told it (message or file_shared)."""

    file_id: str
    channel: str
    user: str | None
    thread_ts: str | None = None  # where to reply; looked up when unknown
    file: dict | None = None  # the Slack file object, when the event carried it


def validate_file(path: str, context_tokens: int, max_file_bytes: int, encoding: str) -> Report:
    """The validation report of the file at `path` (trainers.data.validate); runs in
    the worker process (`Context.in_worker`)."""
    from trainers.data import validate

    return validate(
        path, context_tokens=context_tokens, max_file_bytes=max_file_bytes, encoding=encoding
    )


class Datasets:
    """The datasets use-case, on the shared services of `ctx`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.blobs = ctx.blobs
        self.client = ctx.client
        self.prices = ctx.prices

    @property
    def settings(self) -> Settings:
        return self.ctx.settings  # read each time: a test may swap the context's settings

    # --- file drops -------------------------------------------------------------

    def file_dropped(self, drop: FileDrop) -> bool:
        """Dedupe and hand off. True when this call scheduled the work.

        Slack retries deliveries and announces one file with two events
        (message/file_share and file_shared), in either order. Per (file,
        channel) the first of them claims the ingest (a pending_work row under
        a lease), atomically; a later one adds what it knows that the first did
        not (the thread, a complete file object) to that row. The file is marked
        seen only once it is checked (or known not to be training data). A file
        object that says what the file is decides here; a stub (Slack Connect,
        an id alone) decides nothing until `files.info` answers. Nothing here
        waits on the network.
        """
        if not self.settings.serves(drop.channel):
            return False
        complete = drop.file if drop.file and not is_stub(drop.file) else None
        why = None
        if drop.file and is_gone(drop.file):
            why = "deleted or hidden"
        elif complete and (verdict := training_data(complete)).ours is False:
            why = verdict.why
        if why:
            log.info("file %s in %s left alone: %s", drop.file_id, drop.channel, why)
            # An ingest the other event started waits no more: this one knows.
            self.store.add_work_hints(_ingest_key(drop), {"described": drop.file})
            return False
        if self.store.seen(_file_key(drop)):
            return False
        key = _ingest_key(drop)
        try:
            if self.ctx.start_work(
                "ingest", key, asdict(drop), what=f"checking file {drop.file_id}",
                channel=drop.channel, thread_ts=drop.thread_ts, long=True,
            ):  # fmt: skip
                return True
        except Busy as exc:
            # Once per file, though Slack sends two events for it; on a job thread.
            if self.store.mark_seen(f"busy:{drop.file_id}:{drop.channel}"):
                name = (drop.file or {}).get("name")
                label = render.escape(name) if name else "A file shared here"
                message = render.error(f"{label} was not checked: {exc.summary}")
                self.ctx.submit(
                    "saying the bot is busy",
                    lambda: self.ctx.post(drop.channel, drop.thread_ts, message),
                    "",
                    None,
                )
            return False
        self.store.add_work_hints(
            key, {"thread_ts": drop.thread_ts, "user": drop.user, "described": complete}
        )
        return False

    def ingest_work(self, args: dict) -> None:
        """Check a dropped file, asking Slack again (with back-off) while it cannot serve
        it yet, for TUNEBOT_FILE_WAIT_SECONDS; then say once, in its thread, what went
        wrong. Later events' hints (thread, file object) are read at every try."""
        drop = FileDrop(**args)
        deadline = time.monotonic() + self.settings.file_wait_seconds
        delay = 0.25
        while not self.store.seen(_file_key(drop)):
            if self.ctx.closing:
                raise _Stopping  # the pending_work row stays for the next start
            hints = self.store.work_args(_ingest_key(drop)) or {}
            described = hints.get("described")
            drop = FileDrop(
                file_id=drop.file_id,
                channel=drop.channel,
                user=drop.user or hints.get("user"),
                thread_ts=drop.thread_ts or hints.get("thread_ts"),
                file=described if described and is_stub(drop.file) else drop.file,
            )
            try:
                self.ingest(drop, waiting=time.monotonic() < deadline)
            except _NotYet as exc:
                log.info("file %s in %s: %s; asking again in %.2f s",
                         drop.file_id, drop.channel, exc, delay)  # fmt: skip
                time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
                delay = min(delay * 2, 8.0)
                continue
            except UserError as exc:
                # Not marked seen: a later event for the file may still complete it.
                # Told once per (file, channel), whichever event tells it.
                if self.store.mark_seen(f"told:{drop.file_id}:{drop.channel}"):
                    thread = getattr(exc, "thread_ts", None) or drop.thread_ts
                    self.ctx.post(drop.channel, thread, render.error(exc.summary, exc.detail))
                log.info("file %s in %s: %s", drop.file_id, drop.channel, exc.summary)
                return
            except _Unreadable as exc:
                # Slack never said what it is: nothing to tell, nothing marked seen.
                log.warning("file %s in %s not checked: %s", drop.file_id, drop.channel, exc)
                return
            except Exception as exc:  # answered here, in the thread learned since the start
                message = self.ctx.unexpected(exc, f"checking file {drop.file_id}")
                thread = drop.thread_ts or (self.store.work_args(_ingest_key(drop)) or {}).get(
                    "thread_ts"
                )
                self.ctx.post(drop.channel, thread, message)
                return
            self.store.mark_seen(_file_key(drop))

    def ingest(self, drop: FileDrop, *, waiting: bool = False) -> Dataset | None:
        """Download, validate and record a dropped file; its report goes to its thread.

        None for what is not ours to check (deleted, hidden, not training
        data): a log line, no message. While `waiting`, states Slack leaves a
        fresh upload in (not found yet, no link yet, no share listed yet) raise
        _NotYet; after it, they are told (UserError) or, for a missing share,
        answered at the channel's top level.

        Idempotent per (file, channel): a file already recorded with its report
        is returned as it is, and a dataset row left without one (a stop in the
        middle) is completed rather than recorded twice.
        """
        started = time.monotonic()
        existing = self.store.dataset_for_file(drop.file_id, drop.channel)
        if existing is not None and existing.report_json:
            log.info("file %s is %s already", drop.file_id, existing.id)
            return existing
        described = self._describe(drop, waiting)
        if described is None:
            return None
        file, sniff = described
        thread_ts = drop.thread_ts or share_thread(file, drop.channel)
        if thread_ts is None and waiting:
            raise _NotYet("Slack lists no message sharing it in the channel yet")
        name = file.get("name") or drop.file_id
        try:
            pointer = existing is None and self.settings.reshared_files == "pointer"
            if pointer and (pointed := self._point_to_report(drop, file, name, thread_ts)):
                return pointed
            size = int(file.get("size") or 0)
            limit = self.settings.max_file_bytes
            if size > limit:
                log.info("file %s (%s) refused: %d bytes over the %d limit",
                         drop.file_id, name, size, limit)  # fmt: skip
                raise UserError(
                    f"{render.escape(name)} is {size / 2**20:,.1f} MiB; the limit is "
                    f"{self.settings.max_file_mb:,} MiB, so it was not downloaded.",
                    "Split it, sample it, or raise TUNEBOT_MAX_FILE_MB.",
                )
            try:
                stored = self._download(file, limit, sniff=sniff)
            except _Missing:
                # Deleted since the event (a late delivery, a restart): files.info says.
                if drop.file is not None and self._describe(replace(drop, file=None), waiting):
                    raise UserError(f"Could not download {render.escape(name)}: Slack "
                                    "answered HTTP 404.") from None  # fmt: skip
                return None
            if stored is None:
                log.info("file %s in %s left alone: its first bytes are not JSON",
                         drop.file_id, drop.channel)  # fmt: skip
                return None
            sha, size = stored
            dataset, report = self.register(
                sha,
                size,
                name=name,
                channel=drop.channel,
                thread_ts=thread_ts,
                user=drop.user or file.get("user"),
                file_id=drop.file_id,
                dataset=existing if existing is not None and existing.sha256 == sha else None,
            )
        except UserError as exc:
            exc.thread_ts = thread_ts  # where the words go
            raise
        log.info(
            "file %s -> %s: %d examples, %d valid, %d errors, %d warnings (%.1f s)",
            drop.file_id, dataset.id, report.examples, report.valid_examples,
            report.error_count, report.warning_count, time.monotonic() - started,
        )  # fmt: skip
        self._offer_conversion(dataset.id, sha, size, name, drop.channel, thread_ts)
        return self.store.get_dataset(dataset.id)

    def _describe(self, drop: FileDrop, waiting: bool) -> tuple[dict, bool] | None:
        """(Slack's file object, whether its first bytes decide if it is training data),
        or None for a file that is not ours to check. The event's object is trusted
        only when complete; otherwise `files.info` describes the file."""
        file = drop.file
        known_name = (file or {}).get("name") or ""
        label = render.escape(known_name) or "A file shared here"
        if file is None or is_stub(file):
            try:
                file = self.client.files_info(file=drop.file_id)["file"]
            except SlackApiError as exc:
                error = exc.response.get("error") or "error"
                if error in file_events.GONE:
                    log.info("file %s in %s left alone: files.info says %s",
                             drop.file_id, drop.channel, error)  # fmt: skip
                    return None
                if waiting:  # not found yet, rate limited, Slack's own trouble: again
                    raise _NotYet(f"files.info says {error}") from None
                if error in file_events.NOT_YET:
                    raise UserError(
                        f"{label} was not checked: Slack still could not find it "
                        f"{self.settings.file_wait_seconds:g} s after it was shared.",
                        "Share it again to have it checked.",
                    ) from None
                if training_data({"name": known_name}).ours:
                    raise UserError(
                        f"Slack would not let tunebot read {label} ({render.escape(error)}).",
                        "Check that the bot has the files:read scope and is in this channel.",
                    ) from None
                raise _Unreadable(f"files.info says {error}") from None
            except OSError as exc:  # Slack could not be reached
                if waiting:
                    raise _NotYet(f"files.info failed: {type(exc).__name__}") from None
                raise _Unreadable(f"files.info failed: {type(exc).__name__}: {exc}") from None
        if is_gone(file):
            log.info("file %s in %s left alone: deleted or hidden", drop.file_id, drop.channel)
            return None
        verdict = training_data(file)
        if verdict.ours is False:
            log.info("file %s in %s left alone: %s", drop.file_id, drop.channel, verdict.why)
            return None
        if not (file.get("url_private_download") or file.get("url_private")):
            if waiting:
                raise _NotYet("Slack gives no download link yet")
            raise UserError(
                f"{render.escape(file.get('name') or 'A file shared here')} was not checked: "
                "Slack gave no download link for it.",
                "Share it again to have it checked.",
            )
        return file, verdict.ours is None

    def _point_to_report(
        self, drop: FileDrop, file: dict, name: str, thread_ts: str | None
    ) -> Dataset | None:
        """TUNEBOT_RESHARED_FILES=pointer: a file checked in another channel becomes a
        dataset here from the same stored bytes and report, with a one-line answer
        (which names no other channel). None when it was not checked anywhere."""
        checked = self.store.checked_dataset_for_file(drop.file_id)
        if checked is None or not self.blobs.exists(checked.sha256):
            return None
        dataset = self.store.add_dataset(
            sha256=checked.sha256, name=name, channel=drop.channel, thread_ts=thread_ts,
            file_id=drop.file_id, user=drop.user or file.get("user"),
            size_bytes=checked.size_bytes,
        )  # fmt: skip
        dataset = self.store.update_dataset(
            dataset.id, examples=checked.examples, valid_examples=checked.valid_examples,
            errors=checked.errors, warnings=checked.warnings,
            tokens_total=checked.tokens_total, report_json=checked.report_json,
        )  # fmt: skip
        self.ctx.post(drop.channel, thread_ts, render.reshared_pointer(name, dataset))
        log.info("file %s in %s -> %s from the report of %s",
                 drop.file_id, drop.channel, dataset.id, checked.id)  # fmt: skip
        return dataset

    def _offer_conversion(
        self, dataset_id: str, sha: str, size: int, name: str, channel: str, thread_ts: str | None
    ) -> None:
        """Under the report of a file that is not UTF-8 chat JSONL yet: `/finetune convert`."""
        from trainers.convert import SAMPLE_BYTES, suggest

        with open(self.blobs.path(sha), "rb") as f:
            head = f.read(SAMPLE_BYTES)
        offer = suggest(head, name, complete=len(head) >= size)
        if offer is not None:
            fmt, looks_like = offer
            message = render.conversion_offer(name, dataset_id, fmt, looks_like)
            self.ctx.post(channel, thread_ts, message)

    def validate(self, path: str, context: int, encoding: str, name: str) -> Report:
        """Validate in the worker process (`Context.in_worker`); UserError when it dies on it."""
        report = self.ctx.in_worker(
            validate_file, path, context, self.settings.max_file_bytes, encoding
        )
        if report is None:
            raise UserError(
                f"The checker crashed on {render.escape(name)} (out of memory?), so it has no "
                "report. The checker was restarted: other files are checked as usual.",
                "Split the file or sample it, and drop it again; the bot's log has the details.",
            )
        return report

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
        dataset: Dataset | None = None,
        caveat: str | None = None,
    ) -> tuple[Dataset, Report]:
        """Record a stored file as a dataset (or complete `dataset`, recorded before a
        stop), validate it, and post its report in the thread (`caveat`: what was
        lost before it, said in place of the report's ✅)."""
        dataset = dataset or self.store.add_dataset(
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
        report = self.validate(str(self.blobs.path(sha)), model.context, model.encoding, name)
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
            errors=report.error_count,
            warnings=report.warning_count,
            tokens_total=report.tokens.total,
            report_json=_report_record(report, counts_sha, findings_sha),
        )
        message = render.validation_report(name, report, costs, local, dataset_id=dataset.id)
        if caveat:
            message = render.with_caveat(message, caveat)
        self.ctx.post(channel, thread_ts, message)
        self._upload_histogram(channel, thread_ts, dataset.id, name, report, model.context)
        return dataset, report

    def _download(self, file: dict, limit: int, *, sniff: bool = False) -> tuple[str, int] | None:
        """Fetch a dropped file with the bot token, from Slack's file hosts only, into
        the blob store: (sha256, size). With `sniff`, its first bytes decide whether it
        is training data at all: None (nothing stored, the rest never read) when not.

        The link must be https to a host in TUNEBOT_SLACK_FILE_HOSTS (or SLACK_API_URL's
        own host, which gets the token anyway); plain http only to a loopback host named
        there. Anything else (another host, file:, ftp:, data:) is refused before a
        byte is sent, and a redirect never carries the token to another host.
        """
        name = render.escape(file.get("name") or file.get("id") or "the file")
        url = file.get("url_private_download") or file.get("url_private")
        if not url:
            raise UserError(f"Slack gave no download link for {name}.")
        allowed = downloads.file_origins(self.settings)
        if downloads.origin(url) not in allowed:
            log.warning(
                "file %s: download link refused (%s)", file.get("id"), downloads.link_kind(url)
            )
            raise UserError(
                f"{name} is not a Slack file link; tunebot only downloads from "
                f"{downloads.hosts_named(self.settings)}.",
                "Upload the file itself to Slack instead of sharing a link to it.",
            )
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {self.settings.slack_bot_token}"}
        )
        try:
            with downloads.file_opener(allowed).open(request, timeout=60) as resp:
                # Slack answers a bad token with its HTML sign-in page and a 200.
                if resp.headers.get_content_type() == "text/html":
                    raise UserError(
                        f"Could not download {name}: Slack sent a sign-in page.",
                        "Check that the bot has the files:read scope and is in this channel.",
                    )
                if not sniff:
                    return self.blobs.put_stream(resp, max_bytes=limit)
                head = resp.read(file_events.SNIFF_BYTES)
                if not file_events.sniff(head):
                    return None
                return self.blobs.put_stream(downloads.Prefixed(head, resp), max_bytes=limit)
        except downloads.RefusedRedirect as exc:
            log.warning(
                "file %s: redirect refused (%s)", file.get("id"), downloads.link_kind(exc.url)
            )
            raise UserError(
                f"Could not download {name}: Slack redirected it to a link that is not a Slack "
                f"file link; tunebot only downloads from {downloads.hosts_named(self.settings)}."
            ) from None
        except BlobTooLarge:
            raise UserError(
                f"{name} is over the {self.settings.max_file_mb:,} MiB limit."
            ) from None
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise _Missing from None
            raise UserError(f"Could not download {name}: Slack answered HTTP {exc.code}.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise UserError(f"Could not download {name}: {getattr(exc, 'reason', exc)}.") from None

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

        png = self.ctx.draw(
            token_histogram,
            report.token_counts,
            title=f"{name} ({dataset_id}): tokens per example",
            limit=context,
        )
        if png is None:
            return
        try:
            self.client.files_upload_v2(
                channel=channel,
                thread_ts=thread_ts,
                content=png,
                filename=f"tokens-{dataset_id}.png",
                title=f"Token lengths of {dataset_id}",
            )
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("histogram for %s not uploaded: %s", dataset_id, slack_error(exc))

    def _costs(self, counts: Any, model: str, epochs: int | None):
        costs = pricing.cost_table(counts, self.prices, model, epochs)
        local = pricing.local_estimates(counts)
        return costs, local

    # --- datasets and reports ------------------------------------------------------

    def find_dataset(self, channel: str, ref: str | None) -> Dataset:
        """The dataset `ref` (d3) in `channel`, or the channel's latest when None.
        UserError (one sentence) when there is none, it is another channel's, or it
        was forgotten."""
        if ref is None:
            dataset = self.store.latest_dataset(channel)
            if dataset is None:
                raise UserError("No dataset in this channel yet: drop a .jsonl file here first.")
            return dataset
        dataset = self.store.find_dataset(ref.lower())
        if dataset is None or dataset.channel != channel:
            raise UserError(
                f"No dataset `{render.escape(ref)}` in this channel. `/finetune datasets` lists them."
            )
        if dataset.forgotten_at:
            raise UserError(
                f"{dataset.id} was forgotten on {dataset.forgotten_at:%Y-%m-%d} by "
                f"<@{dataset.forgotten_by}>.",
                "Upload the file again to use it.",
            )
        return dataset

    def stored_report(self, dataset: Dataset) -> Report:
        """`dataset`'s validation report rebuilt from its record and blobs (token
        counts, findings); UserError when it has none yet."""
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
            counts=record.get("codes"),  # the true counts: the stored findings are capped
            kind=record.get("kind", "supervised"),
            kinds=record.get("kinds"),
            images=record.get("images", 0),
            token_notes=tuple(record.get("token_notes", ())),
        )

    def repost_report(self, dataset: Dataset) -> None:
        report = self.stored_report(dataset)
        costs, local = self._costs(report.token_counts, self.settings.default_model, None)
        self.ctx.post(
            dataset.channel,
            dataset.thread_ts,
            render.validation_report(report.path, report, costs, local, dataset_id=dataset.id),
        )

    def post_estimate(self, dataset: Dataset, model: str, epochs: int | None) -> None:
        report = self.stored_report(dataset)
        costs, local = self._costs(report.token_counts, model, epochs)
        message = render.estimate_summary(f"{report.path} ({dataset.id})", report, costs, local)
        self.ctx.post(dataset.channel, dataset.thread_ts, message)

    # --- /finetune validate, estimate, convert ----------------------------------------

    def validate_command(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune validate [d3]`: the stored report posted again in its thread."""
        dataset = self.find_dataset(channel, cmd.target)
        self.stored_report(dataset)  # fail now, in the ack, if there is nothing to show
        self.ctx.submit(
            f"reposting {dataset.id}'s report",
            lambda: self.repost_report(dataset),
            channel,
            dataset.thread_ts,
        )
        return render.note(f"Posting {dataset.id}'s report in its thread.")

    def estimate_command(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune estimate [d3] model=… epochs=…`: the cost table posted in its thread."""
        dataset = self.find_dataset(channel, cmd.target)
        try:
            model = self.prices.resolve(cmd.options.get("model", self.settings.default_model))
            epochs = pricing.parse_epochs(cmd.options.get("epochs"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.stored_report(dataset)
        self.ctx.submit(
            f"estimating {dataset.id}",
            lambda: self.post_estimate(dataset, model.name, epochs),
            channel,
            dataset.thread_ts,
        )
        return render.note(f"Posting the estimate for {dataset.id} on {model.name} in its thread.")

    def convert(self, cmd: Command, channel: str, user: str) -> render.Message:
        """`/finetune convert d4 from=…`: the stored bytes of d4 become a new dataset.

        Anyone in a served channel may (it spends nothing). The result is
        linked to its source (`source_dataset_id`), posted in the source's
        thread with every row not converted and every field left out, and
        then validated like any upload.
        """
        from trainers.convert import FORMATS, SAMPLE_BYTES, suggest

        source = self.find_dataset(channel, cmd.target)
        fmt = cmd.options.get("from", "").lower()
        if not fmt:
            with open(self.blobs.path(source.sha256), "rb") as f:
                head = f.read(SAMPLE_BYTES)
            offer = suggest(head, source.name or "", complete=len(head) >= (source.size_bytes or 0))
            fmt = offer[0] if offer else ""
        if fmt not in FORMATS:
            raise UserError(
                f"Which format is {source.id} in? Say it with from=: "
                f"`/finetune convert {source.id} from={render.CONVERT_FORMATS}`."
            )
        self.ctx.submit(
            f"converting {source.id}",
            lambda: self._convert_work(source, fmt, user),
            channel,
            source.thread_ts,
            long=True,
        )
        return render.note(f"Converting {source.id} from {fmt}; the result goes in its thread.")

    def _convert_work(self, source: Dataset, fmt: str, user: str) -> None:
        from trainers.convert import convert_bytes

        name = source.name or source.id
        result = convert_bytes(self.blobs.path(source.sha256).read_bytes(), fmt)
        channel, thread_ts = source.channel, source.thread_ts
        self.ctx.post(channel, thread_ts, render.conversion_summary(name, source.id, fmt, result))
        if not result.examples:
            return
        data = result.jsonl()
        if len(data) > self.settings.max_file_bytes:
            raise UserError(
                f"The conversion of {source.id} is {len(data) / 2**20:,.1f} MiB, over the "
                f"{self.settings.max_file_mb:,} MiB limit.",
                "Split the file, or raise TUNEBOT_MAX_FILE_MB.",
            )
        stem = name.rsplit(".", 1)[0] if "." in name else name
        caveat = None
        if result.dropped:
            caveat = "what was converted is ready to train, but not everything was (see above)"
        self.register(
            self.blobs.put_bytes(data),
            len(data),
            name=f"{stem}.chat.jsonl",
            channel=channel,
            thread_ts=thread_ts,
            user=user,
            source_dataset_id=source.id,
            caveat=caveat,
        )


def _file_key(drop: FileDrop) -> str:
    """The seen key of a dropped file: marked once its dataset is recorded."""
    return f"file:{drop.file_id}:{drop.channel}"


def _ingest_key(drop: FileDrop) -> str:
    """The pending_work key of a file's ingest in a channel."""
    return f"ingest:{drop.file_id}:{drop.channel}"


class _NotYet(Exception):
    """Slack cannot serve a fresh file yet (not found, no link, no share): ask again."""


class _Unreadable(Exception):
    """Slack never said what a file is: nothing to tell anyone, nothing marked seen."""


class _Missing(Exception):
    """The download answered 404 or 410: the file may have been deleted since."""


class _Stopping(BaseException):
    """The bot is stopping: a waiting ingest ends, its pending_work row kept."""


def _report_record(report: Report, counts_sha: str, findings_sha: str) -> dict:
    """The report's summary for the database; findings and counts live in blobs."""
    return {
        "examples": report.examples,
        "valid_examples": report.valid_examples,
        "findings_sha256": findings_sha,
        "codes": report.counts_by_code(),
        "tokens": {**report.tokens.to_dict(), "mean": report.tokens.mean},
        "counts_sha256": counts_sha,
        "encoding": report.encoding,
        "context_tokens": report.context_tokens,
        "kind": report.kind,
        "kinds": report.kinds,
        "images": report.images,
        "token_notes": list(report.token_notes),
    }
