"""The use-cases behind the listeners: ingest a dropped file, answer /finetune.

Listeners only parse and hand off. Slow work (downloads, validation, uploads)
runs here, on the bot's own job threads, never on Bolt's listener pool; the
CPU-bound validation runs in a worker process so it never slows the acks.
Every failure in a job reaches the thread through one path: `_job` catches
it and posts `render.error`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from array import array
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import file_events, render
from bot.claims import new_owner
from bot.commands import Command
from bot.config import Settings
from bot.errors import Busy, UserError, slack_error
from bot.file_events import is_gone, is_stub, share_thread, training_data
from bot.priority import ACKS
from storage import BlobStore, BlobTooLarge, Dataset, Store
from trainers import pricing
from trainers.data import Finding, Report, TokenStats
from trainers.providers import load_optional

log = logging.getLogger("tunebot")

# How long App Home trusts a user's channel list from Slack (users.conversations).
# Someone who leaves a channel may go on seeing its items on Home for up to this long.
MEMBERSHIP_TTL_SECONDS = 180
# Threads for interactive work: clicks, posts, approval cards, Home tabs. Long
# jobs have a bounded pool of their own (TUNEBOT_JOB_THREADS, TUNEBOT_JOB_QUEUE).
INTERACTIVE_THREADS = 4
# At shutdown, how long acked work may take to finish before it is left for the next start.
DRAIN_SECONDS = 20.0
# A claim on acked work (pending_work) lapses after this unless renewed; long
# work renews it every third of it while it runs.
WORK_LEASE = dt.timedelta(minutes=15)


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
        store.before_write = ACKS.step_aside  # acks write first (bot.priority)
        self.blobs = blobs
        self.client = client
        self.prices = _price_table(settings)
        self.providers = load_optional(settings.providers_file)  # checked at start too
        # Job threads run at a lower OS priority than the threads that ack
        # Slack's requests, so a burst of background work never starves an ack.
        self.jobs = jobs or ThreadPoolExecutor(
            max_workers=INTERACTIVE_THREADS,
            thread_name_prefix="tunebot-click",
            initializer=_lower_thread_priority,
            initargs=(JOB_NICENESS,),
        )
        self.long_jobs = ThreadPoolExecutor(
            max_workers=settings.job_threads,
            thread_name_prefix="tunebot-job",
            initializer=_lower_thread_priority,
            initargs=(JOB_NICENESS + 5,),
        )
        self._long_in_flight = 0  # long jobs queued or running
        self._closing = False
        self.owner = new_owner()  # this process's name on the pending work it holds
        self._validation_pool = validation_pool
        self._owns_validation_pool = validation_pool is None  # one given is the giver's to close
        self._pending: set[Future] = set()
        self._pending_lock = threading.Lock()
        # user -> (time.monotonic() when asked, their channels); see member_channels.
        self._memberships: dict[str, tuple[float, frozenset[str]]] = {}
        self._memberships_lock = threading.Lock()
        self._homes_waiting: set[str] = set()  # users whose Home refresh is queued
        from bot.admin import Admin
        from bot.runs import Runs  # runs build on this class

        self.runs = Runs(self, tuner=tuner)
        self.admin = Admin(self.runs)  # release, forget, budget, audit
        self.runs.on_success.append(self.runs.evals.after_success)  # evaluate what succeeded
        # What each kind of acked work runs (see start_work); its args come from pending_work.
        self._work: dict[str, Callable[[dict], Any]] = {
            "ingest": self._ingest_work,
            "decide": self._decide_work,
            "price": self.runs.distiller.price_work,
            "request": self.runs.request_work,
        }
        self.runs.warm_approvers()  # so that no ack waits on Slack for them

    # --- plumbing -------------------------------------------------------------

    @property
    def validation_pool(self) -> Executor:
        with self._pending_lock:  # job threads ask at once; make one pool
            if self._validation_pool is None:
                import multiprocessing

                # forkserver: the bot is multi-threaded, and fork would copy held locks.
                self._validation_pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("forkserver"),
                    initializer=_background_priority,
                )
                self._owns_validation_pool = True
            return self._validation_pool

    def _validate(self, path: str, context: int, encoding: str, name: str) -> Report:
        """Validate in the worker process (see `_in_worker`)."""
        report = self._in_worker(
            validate_file, path, context, self.settings.max_file_bytes, encoding
        )
        if report is None:
            raise UserError(
                f"The checker crashed on {render.escape(name)} (out of memory?), so it has no "
                "report. The checker was restarted: other files are checked as usual.",
                "Split the file or sample it, and drop it again; the bot's log has the details.",
            )
        return report

    def draw(self, chart: Callable[..., bytes], *args: Any, **kwargs: Any) -> bytes | None:
        """A PNG from one of bot.charts, drawn in the worker process: matplotlib's
        import and drawing then never hold the GIL an ack is waiting for.
        None (logged) when the worker died drawing it."""
        png = self._in_worker(chart, *args, **kwargs)
        if png is None:
            log.error("the worker died drawing a %s chart", chart.__name__)
        return png

    def _in_worker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` in the worker process; None when it kills the worker twice.

        A dead worker (killed, out of memory) breaks its pool, which fails
        everything queued in it; so each call is tried once more on a fresh
        pool, and a call that breaks that one too is the culprit.
        """
        from concurrent.futures.process import BrokenProcessPool

        for attempt in (1, 2):
            pool = self.validation_pool
            try:
                return pool.submit(fn, *args, **kwargs).result()
            except BrokenProcessPool:
                log.error("the worker died in %s (attempt %d); new pool", fn.__name__, attempt)
                with self._pending_lock:
                    if self._validation_pool is pool:
                        self._validation_pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        return None

    def close(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop: let the jobs finish for up to `timeout` seconds, then drop what is left.

        Work Slack was told was received (file ingests, clicks, distillation
        pricing) has had a pending_work row since before its ack, so what does
        not finish in time is not lost: the next start resumes it (`resume`).
        True when every job finished.
        """
        drained = self.drain(timeout)
        self._closing = True  # a job failing from here on keeps its pending_work row
        for pool in (self.jobs, self.long_jobs):
            pool.shutdown(wait=False, cancel_futures=True)
        if not drained:
            left = len(self.store.pending_work())
            log.warning(
                "stopping with jobs still running; %d piece(s) of acknowledged work resume at "
                "the next start",
                left,
            )
        if self._validation_pool is not None and self._owns_validation_pool:
            self._validation_pool.shutdown(wait=drained, cancel_futures=True)
        return drained

    def submit(
        self,
        what: str,
        fn: Callable[[], Any],
        channel: str,
        thread_ts: str | None,
        *,
        long: bool = False,
        on_busy: Callable[[], Any] | None = None,
    ) -> Future:
        """Run `fn` on a job thread; what goes wrong is posted to (channel, thread_ts).

        Interactive work (clicks, posts, cards, Home tabs) has a small pool of
        its own. `long=True` work (ingests, evaluations, distillations, chats,
        submissions) goes to the bounded pool: when TUNEBOT_JOB_QUEUE jobs
        already wait there, nothing is queued; `on_busy` (which undoes what the
        caller began) is called and `Busy` raised, for the caller's answer.
        """
        if long:
            with self._pending_lock:
                ahead = self._long_in_flight
                full = ahead >= self.settings.job_threads + self.settings.job_queue
                if not full:
                    self._long_in_flight += 1
            if full:
                log.warning("%s refused: %d long jobs ahead", what, ahead)
                if on_busy is not None:
                    on_busy()
                raise Busy(ahead)
            try:
                future = self.long_jobs.submit(self._job, what, fn, channel, thread_ts)
            except BaseException:
                self._long_done(None)
                raise
            future.add_done_callback(self._long_done)
        else:
            future = self.jobs.submit(self._job, what, fn, channel, thread_ts)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def check_room(self) -> None:
        """Raise Busy now if a long job would be refused (before starting anything)."""
        with self._pending_lock:
            ahead = self._long_in_flight
        if ahead >= self.settings.job_threads + self.settings.job_queue:
            raise Busy(ahead)

    def _long_done(self, future: Future | None) -> None:
        with self._pending_lock:
            self._long_in_flight -= 1

    def _forget(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    # --- acked work: recorded before the ack, resumed after a restart -----------

    def start_work(
        self,
        kind: str,
        key: str,
        args: dict,
        *,
        what: str,
        channel: str,
        thread_ts: str | None,
        long: bool,
    ) -> bool:
        """Take on work that Slack is about to be told was received.

        A pending_work row (`key`, claimed by this process under a lease) is
        written first, so the work survives a stop or a crash; a job does it
        and deletes the row. False when `key` is already held (another
        delivery of the same thing). Raises Busy when the long pool is full,
        leaving nothing behind.
        """
        start = self.record_work(
            kind, key, args, what=what, channel=channel, thread_ts=thread_ts, long=long
        )
        if start is None:
            return False
        start()
        return True

    def record_work(
        self,
        kind: str,
        key: str,
        args: dict,
        *,
        what: str,
        channel: str,
        thread_ts: str | None,
        long: bool,
    ) -> Callable[[], None] | None:
        """The first half of `start_work`: the pending_work row alone, so that it can
        share a transaction with other writes. Returns what starts the job (call
        it once that transaction is committed), or None when `key` is held."""
        token = f"{self.owner}:{uuid.uuid4().hex[:8]}"
        payload = {
            "what": what,
            "channel": channel,
            "thread_ts": thread_ts,
            "long": long,
            "args": args,
        }
        if not self.store.claim_work(key, kind, payload, owner=token, lease=WORK_LEASE):
            return None
        return lambda: self._run_work(
            kind, key, token, payload, on_busy=lambda: self.store.finish_work(key, token)
        )

    def _run_work(
        self, kind: str, key: str, token: str, payload: dict, *, on_busy: Callable[[], Any]
    ) -> None:
        self.submit(
            payload["what"],
            lambda: self._do_work(kind, key, token, payload),
            payload["channel"],
            payload["thread_ts"],
            long=payload["long"],
            on_busy=on_busy,
        )

    def _do_work(self, kind: str, key: str, token: str, payload: dict) -> None:
        if not self.store.renew_work(key, token, WORK_LEASE):
            log.info("%s: taken over while it waited; left to its new owner", key)
            return
        beat = _Renewal(self.store, key, token, WORK_LEASE) if payload["long"] else None
        try:
            self._work[kind](payload["args"])
        except BaseException:
            # Failed: forget it, so that the same thing asked again is done afresh
            # (a re-shared file is ingested). Stopping: keep it for the next start.
            if not self._closing:
                self.store.finish_work(key, token)
            raise
        finally:
            if beat is not None:
                beat.stop()
        self.store.finish_work(key, token)

    def resume(self, *, at_start: bool = True) -> int:
        """Take up acked work left undone: at start-up all of it (the process that held
        it is gone), later only what nobody holds. Returns how many were resumed."""
        resumed = 0
        for work in self.store.pending_work():
            token = f"{self.owner}:{uuid.uuid4().hex[:8]}"
            if work.kind not in self._work or not self.store.claim_work(
                work.key, work.kind, work.payload_json, owner=token, lease=WORK_LEASE,
                force=at_start,
            ):  # fmt: skip
                continue
            try:
                self._run_work(
                    work.kind, work.key, token, work.payload_json,
                    on_busy=lambda key=work.key, token=token: self.store.release_work(key, token),
                )  # fmt: skip
            except Busy:
                log.info("resuming acked work: the job queue is full; the rest waits")
                break
            resumed += 1
        if resumed:
            log.info("resumed %d piece(s) of acknowledged work", resumed)
        return resumed

    def decide_later(
        self, run_id: str, user: str, decision: str, channel: str, reason: str | None = None
    ) -> bool:
        """A click: recorded (pending_work) before Slack hears 200, counted on a job thread."""
        run = self.store.find_run(run_id)
        return self.start_work(
            "decide",
            f"decide:{run_id}:{user}:{decision}",
            {"run_id": run_id, "user": user, "decision": decision, "reason": reason,
             "channel": channel},
            what=f"recording {user}'s {decision} of {run_id}",
            channel=channel or (run.channel if run else "") or "",
            thread_ts=run.thread_ts if run else None,
            long=False,
        )  # fmt: skip

    def _decide_work(self, args: dict) -> None:
        refusal = self.runs.decide(
            args["run_id"], args["user"], args["decision"], reason=args.get("reason")
        )
        if refusal and args.get("channel"):  # a refused click is answered to the clicker alone
            self.client.chat_postEphemeral(
                channel=args["channel"], user=args["user"], text=f"⚠️ Not counted: {refusal}."
            )

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
        ACKS.step_aside()
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
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot post to %s: %s", channel, slack_error(exc))
            return None
        return resp.get("ts")

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
            if self.start_work(
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
                self.submit(
                    "saying the bot is busy",
                    lambda: self.post(drop.channel, drop.thread_ts, message),
                    "",
                    None,
                )
            return False
        self.store.add_work_hints(
            key, {"thread_ts": drop.thread_ts, "user": drop.user, "described": complete}
        )
        return False

    def _ingest_work(self, args: dict) -> None:
        """Check a dropped file, asking Slack again (with back-off) while it cannot serve
        it yet, for TUNEBOT_FILE_WAIT_SECONDS; then say once, in its thread, what went
        wrong. Later events' hints (thread, file object) are read at every try."""
        drop = FileDrop(**args)
        deadline = time.monotonic() + self.settings.file_wait_seconds
        delay = 0.25
        while not self.store.seen(_file_key(drop)):
            if self._closing:
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
                    self.post(drop.channel, thread, render.error(exc.summary, exc.detail))
                log.info("file %s in %s: %s", drop.file_id, drop.channel, exc.summary)
                return
            except _Unreadable as exc:
                # Slack never said what it is: nothing to tell, nothing marked seen.
                log.warning("file %s in %s not checked: %s", drop.file_id, drop.channel, exc)
                return
            except Exception as exc:  # answered here, in the thread learned since the start
                message = self.unexpected(exc, f"checking file {drop.file_id}")
                thread = drop.thread_ts or (self.store.work_args(_ingest_key(drop)) or {}).get(
                    "thread_ts"
                )
                self.post(drop.channel, thread, message)
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
        self.post(drop.channel, thread_ts, render.reshared_pointer(name, dataset))
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
            self.post(channel, thread_ts, message)

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
        report = self._validate(str(self.blobs.path(sha)), model.context, model.encoding, name)
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
        self.post(channel, thread_ts, message)
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
        allowed = _file_origins(self.settings)
        if _origin(url) not in allowed:
            log.warning("file %s: download link refused (%s)", file.get("id"), _link_kind(url))
            raise UserError(
                f"{name} is not a Slack file link; tunebot only downloads from "
                f"{_hosts_named(self.settings)}.",
                "Upload the file itself to Slack instead of sharing a link to it.",
            )
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {self.settings.slack_bot_token}"}
        )
        try:
            with _file_opener(allowed).open(request, timeout=60) as resp:
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
                return self.blobs.put_stream(_Prefixed(head, resp), max_bytes=limit)
        except _RefusedRedirect as exc:
            log.warning("file %s: redirect refused (%s)", file.get("id"), _link_kind(exc.url))
            raise UserError(
                f"Could not download {name}: Slack redirected it to a link that is not a Slack "
                f"file link; tunebot only downloads from {_hosts_named(self.settings)}."
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

        png = self.draw(
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

    def refresh_home(self, user: str) -> None:
        """Publish `user`'s Home tab on a job thread; one refresh waiting per user is enough
        (a burst of run changes would otherwise render the same tab once per change)."""
        with self._pending_lock:
            if user in self._homes_waiting:
                return
            self._homes_waiting.add(user)

        def publish() -> None:
            with self._pending_lock:  # a change from here on asks for a new refresh
                self._homes_waiting.discard(user)
            self.publish_home(user)

        try:
            self.submit("refreshing the Home tab", publish, "", None)
        except BaseException:
            with self._pending_lock:
                self._homes_waiting.discard(user)
            raise

    def member_channels(self, user: str) -> frozenset[str]:
        """The public and private channels `user` belongs to, as Slack says (users.conversations).

        Cached per user for MEMBERSHIP_TTL_SECONDS. When Slack will not answer,
        the answer is no channels (Home then shows nothing rather than everything),
        and that failure is not cached.
        """
        now = time.monotonic()
        with self._memberships_lock:
            cached = self._memberships.get(user)
        if cached is not None and now - cached[0] < MEMBERSHIP_TTL_SECONDS:
            return cached[1]
        found: set[str] = set()
        try:
            pages = self.client.users_conversations(
                user=user, types="public_channel,private_channel", exclude_archived=True, limit=200
            )
            for page in pages:  # the SDK follows response_metadata.next_cursor
                found.update(c["id"] for c in page.get("channels") or [] if c.get("id"))
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot list %s's channels: %s", user, slack_error(exc))
            return frozenset()
        channels = frozenset(found)
        with self._memberships_lock:
            self._memberships = {
                u: entry
                for u, entry in self._memberships.items()
                if now - entry[0] < MEMBERSHIP_TTL_SECONDS
            }  # expired entries go, so the cache holds only recent viewers
            self._memberships[user] = (now, channels)
        return channels

    def home(self, user: str) -> dict:
        """The Home tab for `user`: only channels they belong to and TUNEBOT_CHANNELS allows.

        Runs, approvals waiting for them, datasets and evaluations come from those
        channels alone; the month's spend is one total, since the budget is shared.
        """
        visible = sorted(c for c in self.member_channels(user) if self.settings.serves(c))
        if visible:  # a list of channels is one `channel IN (...)` query in the store
            runs = self.store.runs(channel=visible, limit=200)
            datasets = self.store.datasets(channel=visible, limit=5)
        else:
            runs, datasets = [], []
        approvers = self.runs.policy().approvers
        waiting = [
            r for r in runs
            if r.status == "pending_approval" and user in approvers and r.requested_by != user
        ]  # fmt: skip
        active = [r for r in runs if r.status in ("approved", "queued", "submitting", "running")]
        evals = [e for r in runs[:20] for e in self.store.evals(r.id)][-5:]
        return render.home_view(
            user=user,
            active=active,
            waiting=waiting,
            datasets=datasets,
            evals=evals,
            finished=[r for r in runs if r.status == "succeeded"],
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
        handler = self._commands().get(cmd.name)
        if handler is None:
            return render.help_text(unknown=cmd.name)
        return handler(cmd, channel, user)

    def _commands(self) -> dict[str, Callable[[Command, str, str], render.Message]]:
        """Each subcommand of the grammar (bot.commands.SPECS) and what answers it;
        tests hold the two to the same names."""
        runs, admin = self.runs, self.admin
        return {
            "help": lambda cmd, channel, user: render.help_text(unknown=cmd.target),
            "datasets": lambda cmd, channel, user: render.datasets_list(
                self.store.datasets(channel=channel, limit=15)
            ),
            "runs": lambda cmd, channel, user: render.runs_list(
                self.store.runs(channel=channel, limit=15)
            ),
            "status": lambda cmd, channel, user: self._status(cmd, channel),
            "train": runs.request,
            "distill": runs.request,
            "chat": runs.distiller.chat,
            "cancel": runs.cancel,
            "download": runs.downloads.request,
            "eval": lambda cmd, channel, user: runs.evals.request(
                cmd.target, channel, cmd.options.get("eval"), user
            ),
            "budget": lambda cmd, channel, user: admin.budget(channel),
            "providers": lambda cmd, channel, user: render.providers_list(self.providers),
            "resume": runs.resume,
            "audit": lambda cmd, channel, user: admin.audit(cmd, channel),
            "release": admin.release,
            "forget": admin.forget,
            "convert": self.convert,
            "validate": lambda cmd, channel, user: self._validate_command(cmd, channel),
            "estimate": lambda cmd, channel, user: self._estimate_command(cmd, channel),
        }

    def _validate_command(self, cmd: Command, channel: str) -> render.Message:
        dataset = self.find_dataset(channel, cmd.target)
        self.stored_report(dataset)  # fail now, in the ack, if there is nothing to show
        self.submit(
            f"reposting {dataset.id}'s report",
            lambda: self.repost_report(dataset),
            channel,
            dataset.thread_ts,
        )
        return render.note(f"Posting {dataset.id}'s report in its thread.")

    def _estimate_command(self, cmd: Command, channel: str) -> render.Message:
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
        self.submit(
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
        self.post(channel, thread_ts, render.conversion_summary(name, source.id, fmt, result))
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

    def _status(self, cmd: Command, channel: str) -> render.Message:
        if cmd.target:
            run = self.store.find_run(cmd.target.lower())
            if run is None or run.channel != channel:
                raise UserError(
                    f"No run `{render.escape(cmd.target)}` in this channel. `/finetune runs` lists them."
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


def _file_key(drop: FileDrop) -> str:
    """The seen key of a dropped file: marked once its dataset is recorded."""
    return f"file:{drop.file_id}:{drop.channel}"


def _ingest_key(drop: FileDrop) -> str:
    """The pending_work key of a file's ingest in a channel."""
    return f"ingest:{drop.file_id}:{drop.channel}"


class _Prefixed:
    """A stream's first bytes, already read, then the rest of it."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = self._head, b""
            return out
        return self._rest.read(n)


class _NotYet(Exception):
    """Slack cannot serve a fresh file yet (not found, no link, no share): ask again."""


class _Unreadable(Exception):
    """Slack never said what a file is: nothing to tell anyone, nothing marked seen."""


class _Missing(Exception):
    """The download answered 404 or 410: the file may have been deleted since."""


class _Stopping(BaseException):
    """The bot is stopping: a waiting ingest ends, its pending_work row kept."""


class _Renewal:
    """Renews a claim on acked work every third of its lease while a long job runs."""

    def __init__(self, store: Store, key: str, owner: str, lease: dt.timedelta) -> None:
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(store, key, owner, lease), name=f"tunebot-lease-{key}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _beat(self, store: Store, key: str, owner: str, lease: dt.timedelta) -> None:
        while not self._stopped.wait(lease.total_seconds() / 3):
            try:
                if not store.renew_work(key, owner, lease):
                    return
            except Exception as exc:  # a locked or closed database: try at the next beat
                log.warning("%s: lease not renewed: %s", key, exc)

    def stop(self) -> None:
        self._stopped.set()


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


# --- downloads from Slack's file hosts ----------------------------------------------

Origin = tuple[str, str, int]  # scheme, host, port


def _origin(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL; None for any other scheme or a malformed URL."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file_origins(settings: Settings) -> frozenset[Origin]:
    """Where the bot token may go for a download: https to each TUNEBOT_SLACK_FILE_HOSTS
    entry and to SLACK_API_URL's origin; plain http only where the host is loopback."""
    from urllib.parse import urlsplit

    origins: set[Origin] = set()
    api = _origin(settings.slack_api_url)
    if api is not None and (api[0] == "https" or _loopback(api[1])):
        origins.add(api)
    for entry in settings.slack_file_hosts:
        entry = entry.strip().lower()
        try:
            parts = urlsplit(entry if "://" in entry else f"//{entry}")
            port = parts.port
        except ValueError:
            continue
        if not parts.hostname:
            continue
        origins.add(("https", parts.hostname, port or 443))
        if _loopback(parts.hostname):
            origins.add(("http", parts.hostname, port or 80))
    return frozenset(origins)


def _hosts_named(settings: Settings) -> str:
    return ", ".join(settings.slack_file_hosts) or "files.slack.com"


def _link_kind(url: str) -> str:
    """What a refused link was, for the log: its scheme and host, never the whole URL."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url))
        return f"{parts.scheme or '?'}://{parts.hostname or ''}"
    except ValueError:
        return "malformed"


class _RefusedRedirect(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class _SlackFileRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects of a file download: the token never leaves the origin it was sent to.

    Same origin: followed with the Authorization header. Another origin: followed
    without it, and only over https (or to an allowed origin). Anything else
    (http elsewhere, ftp:, file:) is refused.
    """

    def __init__(self, allowed: frozenset[Origin]) -> None:
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = _origin(newurl)
        if target is None or (target[0] != "https" and target not in self.allowed):
            fp.close()
            raise _RefusedRedirect(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and target != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _file_opener(allowed: frozenset[Origin]) -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only: no file:, ftp: or data: handlers at all."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _SlackFileRedirects(allowed),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _background_priority() -> None:
    """In the validation worker: yield the CPU to the bot's acks (nice 10).

    Validation can take a minute of both cores; Slack waits 3 s for an ack.
    The worker's own helper processes inherit the priority.
    """
    import os

    os.nice(10)


JOB_NICENESS = 5


def _lower_thread_priority(niceness: int) -> None:
    """This thread only (Linux schedules threads one by one): `niceness` lower priority."""
    import contextlib
    import os

    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
