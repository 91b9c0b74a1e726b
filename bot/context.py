"""The services every use-case needs, and nothing else.

`Context` holds the settings, the store (acks write first: its
`before_write` hook steps aside for them, bot/priority.py), the blob store,
the Slack client, the price table, the providers file, and the job pools
with their plumbing: `submit` a job, `check_room` before starting one,
acked work recorded before the ack (`start_work`, `record_work`) and taken
up again after a stop (`resume`), the worker process (`in_worker`, `draw`),
`drain` and `close`; and the one way a job speaks to Slack (`post`) and
words what went wrong (`unexpected`).

Use-cases (bot/datasets.py, bot/runs.py, bot/home.py, ...) are built on a
Context; none of them is named here. What each kind of acked work runs is
registered by the composition root (bot/workflow.py) with `on_work`.
Every failure in a job reaches the thread through one path: `_job` catches
it and posts `render.error`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any

from slack_sdk import WebClient

from bot import render
from bot.claims import new_owner
from bot.config import Settings
from bot.errors import Busy, UserError, slack_error
from bot.priority import ACKS
from storage import BlobStore, Store
from trainers import pricing
from trainers.providers import Provider, load_optional

log = logging.getLogger("tunebot")

# Threads for interactive work: clicks, posts, approval cards, Home tabs. Long
# jobs have a bounded pool of their own (TUNEBOT_JOB_THREADS, TUNEBOT_JOB_QUEUE).
INTERACTIVE_THREADS = 4
# At shutdown, how long acked work may take to finish before it is left for the next start.
DRAIN_SECONDS = 20.0
# A claim on acked work (pending_work) lapses after this unless renewed; long
# work renews it every third of it while it runs.
WORK_LEASE = dt.timedelta(minutes=15)
JOB_NICENESS = 5  # how much lower than the acks' threads job threads run (Linux nice)


class Context:
    """The shared services: settings, store, blobs, Slack, prices, providers, job pools.

    `jobs` replaces the interactive pool (tests give one); `validation_pool`
    is the worker process pool (one given is the giver's to close; otherwise
    a one-process forkserver pool is made on first use).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: BlobStore,
        client: WebClient,
        *,
        jobs: Executor | None = None,
        validation_pool: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        store.before_write = ACKS.step_aside  # acks write first (bot.priority)
        self.blobs = blobs
        self.client = client
        self.prices = _price_table(settings)
        # By name; checked at start too (bot/serve.py).
        self.providers: dict[str, Provider] = load_optional(settings.providers_file)
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
        # What each kind of acked work runs (see start_work); its args come from pending_work.
        self._work: dict[str, Callable[[dict], Any]] = {}

    @property
    def closing(self) -> bool:
        """True once `close` has begun: a job failing from then on keeps its pending_work row."""
        return self._closing

    def on_work(self, kind: str, run: Callable[[dict], Any]) -> None:
        """Say what acked work of `kind` runs: `run(args)` on a job thread, where `args`
        is the dict given to `start_work` / `record_work` (read back from pending_work
        after a restart)."""
        self._work[kind] = run

    # --- the worker process ------------------------------------------------------------

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

    def draw(self, chart: Callable[..., bytes], *args: Any, **kwargs: Any) -> bytes | None:
        """A PNG from one of bot.charts, drawn in the worker process: matplotlib's
        import and drawing then never hold the GIL an ack is waiting for.
        None (logged) when the worker died drawing it."""
        png = self.in_worker(chart, *args, **kwargs)
        if png is None:
            log.error("the worker died drawing a %s chart", chart.__name__)
        return png

    def in_worker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

    # --- jobs ----------------------------------------------------------------------------

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

    # --- speaking to Slack ---------------------------------------------------------------

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
        """Post `message` in `channel` (in `thread_ts`'s thread when given): the message's
        ts, or None (logged) when Slack refused or could not be reached."""
        try:
            resp = self.client.chat_postMessage(
                channel=channel, thread_ts=thread_ts, unfurl_links=False, **message.to_kwargs()
            )
        except Exception as exc:  # Slack refused, or could not be reached
            log.error("cannot post to %s: %s", channel, slack_error(exc))
            return None
        return resp.get("ts")


def _price_table(settings: Settings) -> pricing.PriceTable:
    if settings.prices_file is None:
        return pricing.PriceTable()
    return pricing.PriceTable.from_file(settings.prices_file)


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


def _background_priority() -> None:
    """In the worker process: yield the CPU to the bot's acks (nice 10).

    Validation can take a minute of both cores; Slack waits 3 s for an ack.
    The worker's own helper processes inherit the priority.
    """
    import os

    os.nice(10)


def _lower_thread_priority(niceness: int) -> None:
    """This thread only (Linux schedules threads one by one): `niceness` lower priority."""
    import contextlib
    import os

    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
