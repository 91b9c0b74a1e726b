"""The claim: one owner, under a lease, for a run's external side effect.

Before anything that costs money or cannot be undone (an upload, a job
creation, teacher calls, a worker launch), the run is claimed in one
conditional UPDATE (`Store.claim_run`). While the work goes on a heartbeat
thread renews the lease; a bot that dies stops renewing, the lease lapses,
and only then may another tick take the claim over, after looking the job up
by its idempotency key. Lost claims are noticed at the next `check()`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid

from bot.errors import BotError
from storage import Store

log = logging.getLogger("tunebot")


def new_owner() -> str:
    """This process's name on its claims: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ClaimLost(BotError):
    """Someone else holds the run now (the lease lapsed, or it was cancelled)."""


class Held:
    """A claim this process holds, renewed in the background until `close()`."""

    def __init__(
        self, store: Store, run_id: str, owner: str, lease: dt.timedelta, status: str
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.owner = owner
        self.lease = lease
        self.status = status
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(
            target=self._beat, name=f"tunebot-lease-{run_id}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while not self._stop.wait(interval):
            try:
                if not self.store.renew_claim(
                    self.run_id, self.owner, self.lease, status=self.status
                ):
                    self._lost = True
                    return
            except Exception as exc:  # a locked database: try again at the next beat
                log.warning("run %s: lease not renewed: %s", self.run_id, exc)

    def check(self) -> None:
        """Raise ClaimLost unless the claim is still ours (renewing it on the way)."""
        if self._lost or not self.store.renew_claim(
            self.run_id, self.owner, self.lease, status=self.status
        ):
            self._lost = True
            raise ClaimLost(self.run_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lapsed(run, now: dt.datetime) -> bool:
    """Whether nobody holds a live claim on `run` (a Run row)."""
    return run.owner is None or run.lease_expires_at is None or run.lease_expires_at < now
