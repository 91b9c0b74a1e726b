"""One bot per home folder.

Two bots on one home would both poll the same runs and post every message
twice. `HomeLock` holds an exclusive `flock` on ``home/tunebot.lock`` for as
long as the bot runs. The kernel drops the lock when its holder exits, however
it exits, so a crashed bot never leaves a stale lock behind. The file also
says who holds it, so that the refusal can name the other process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from storage.errors import StorageError

LOCK_NAME = "tunebot.lock"


class HomeLocked(StorageError, RuntimeError):
    """Another tunebot holds the home folder."""

    def __init__(self, home: Path, pid: int | None, host: str | None, since: str | None) -> None:
        who = f"pid {pid if pid is not None else 'unknown'} on host {host or 'unknown'}"
        if since:
            who += f", since {since}"
        super().__init__(
            f"another tunebot ({who}) is using {home}; "
            "stop it or set TUNEBOT_HOME to another folder"
        )
        self.home = home
        self.pid = pid
        self.host = host
        self.since = since


class HomeLock:
    """Exclusive use of `home` by this process: ``with HomeLock(home): serve()``."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.path = self.home / LOCK_NAME
        self._fd: int | None = None

    def __repr__(self) -> str:
        state = "held" if self.held else "free"
        return f"<HomeLock {self.path} {state}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> HomeLock:
        """Take the lock or raise HomeLocked at once; never waits."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this HomeLock")
        self.home.mkdir(parents=True, exist_ok=True)
        # Python opens fds non-inheritable, so a worker started with
        # subprocess (or multiprocessing's "spawn") does not keep the lock
        # alive after the bot exits; a bare fork() would.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock belongs to this open file, so a second HomeLock in the same
            # process is refused too, like another process would be.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise HomeLocked(
                self.home, holder.get("pid"), holder.get("host"), holder.get("since")
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up; does nothing when it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Emptied, not deleted: a process that opened the old file just
            # before the unlink would lock a file nobody else can see.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last fd on the file drops the flock

    def __enter__(self) -> HomeLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    # The holder may be between locking and writing, or be an older format:
    # an unreadable file only makes the message vaguer.
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if isinstance(data, dict):
            return data
    return {}
