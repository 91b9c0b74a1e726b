"""Acks first: job threads step aside while Slack waits for an answer.

The bot's acks (slash commands, clicks, modal submissions) and its job
threads (cards, DMs, uploads, submissions) share one interpreter lock on
a small machine. An ack is a few milliseconds of Python, but under a burst
it waited behind every job thread that was runnable at the same time
(bench/ack.py: `train` p99 500 to 900 ms while 200 cards were being posted).
So every request counts as an ack in flight while it is handled, and a job
thread, at the points where it is about to start more work (a job, a Slack
call, a write transaction), waits until no ack has been in flight for
`QUIET_SECONDS`, or `MOST_SECONDS` at most: a steady stream of acks slows
jobs down but never stops them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_SECONDS = 0.02  # how long no ack must have been in flight before jobs go on
MOST_SECONDS = 1.0  # the longest one job thread waits at one point
JOB_THREAD_PREFIX = "tunebot-"  # the names of the job pools' threads


class AckFirst:
    """Counts acks in flight; `step_aside` holds a job thread while there are any."""

    def __init__(self, quiet_seconds: float = QUIET_SECONDS, most_seconds: float = MOST_SECONDS):
        self.quiet_seconds = quiet_seconds
        self.most_seconds = most_seconds
        self._changed = threading.Condition()
        self._acks = 0
        self._quiet_since = 0.0  # time.monotonic() when the last ack in flight ended

    @property
    def acks_in_flight(self) -> int:
        return self._acks

    @contextmanager
    def ack(self) -> Iterator[None]:
        """Around the work of one ack (a request, until its response is ready)."""
        with self._changed:
            self._acks += 1
        try:
            yield
        finally:
            with self._changed:
                self._acks -= 1
                if not self._acks:
                    self._quiet_since = time.monotonic()
                    self._changed.notify_all()

    def step_aside(self) -> None:
        """On a job thread: wait until acks have been quiet a while (`most_seconds` at
        most). Anywhere else (an ack's own thread, the main thread): return at once."""
        if not threading.current_thread().name.startswith(JOB_THREAD_PREFIX):
            return
        deadline = time.monotonic() + self.most_seconds
        with self._changed:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return
                if not self._acks:
                    quiet_left = self._quiet_since + self.quiet_seconds - now
                    if quiet_left <= 0:
                        return
                    self._changed.wait(min(quiet_left, deadline - now))
                else:
                    self._changed.wait(deadline - now)


ACKS = AckFirst()  # one interpreter lock per process, so one count per process
