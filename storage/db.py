"""The tunebot database: one SQLite file, shared by every thread of one bot.

Bolt's listener threads and the scheduler's thread share one `Store`. A
sqlite3 connection must not be used by two threads at once, so each thread
gets its own connection on first use; SQLite's locking (WAL, a busy timeout,
``BEGIN IMMEDIATE`` for writes) keeps them consistent with each other and with
other processes on the same file.

Rows come back as small frozen dataclasses whose attributes are named exactly
as their columns. Two suffixes carry meaning everywhere, in arguments and in
results alike: a ``*_json`` column holds a Python value (dict, list, number)
that the store encodes and decodes, and a ``*_at`` column holds a
timezone-aware UTC `datetime`, stored as an ISO-8601 string so that string
order is time order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import sqlite_utils

from storage.errors import StorageError

DB_NAME = "tunebot.db"
BUSY_TIMEOUT_MS = 5000

RUN_STATUSES = (
    "pending_approval",
    "approved",
    "rejected",
    "expired",
    "queued",
    "submitting",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
DECISIONS = ("approve", "reject", "override_secret")

_SHA256 = re.compile(r"[0-9a-f]{64}")


class NotFound(StorageError, LookupError):
    """No row with that id."""


class SchemaTooNew(StorageError, RuntimeError):
    """The file was migrated by a newer tunebot than this one."""


# ---------------------------------------------------------------- schema

Migration: TypeAlias = "str | Callable[[sqlite_utils.Database], None]"

_SCHEMA_1 = """
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

CREATE TABLE datasets (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    name TEXT,
    channel TEXT,
    thread_ts TEXT,
    file_id TEXT,
    user TEXT,
    size_bytes INTEGER,
    examples INTEGER,
    valid_examples INTEGER,
    errors INTEGER,
    warnings INTEGER,
    tokens_total INTEGER,
    report_json TEXT,
    source_dataset_id TEXT REFERENCES datasets(id),
    created_at TEXT NOT NULL
) STRICT;
CREATE INDEX datasets_channel ON datasets(channel, created_at);
CREATE INDEX datasets_sha256 ON datasets(sha256);

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL REFERENCES datasets(id),
    eval_dataset_id TEXT REFERENCES datasets(id),
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    plan_json TEXT,
    plan_hash TEXT,
    estimate_usd REAL,
    actual_usd REAL,
    requested_by TEXT,
    channel TEXT,
    thread_ts TEXT,
    card_ts TEXT,
    progress_ts TEXT,
    external_id TEXT,
    result_json TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    expires_at TEXT
) STRICT;
CREATE INDEX runs_status ON runs(status);
CREATE INDEX runs_channel ON runs(channel, created_at);

CREATE TABLE approvals (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    user TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT,
    plan_hash TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (run_id, user, decision)
) STRICT;

CREATE TABLE run_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    data_json TEXT
) STRICT;
CREATE INDEX run_events_run ON run_events(run_id, id);

CREATE TABLE evals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    created_at TEXT NOT NULL,
    eval_dataset_id TEXT REFERENCES datasets(id),
    summary_json TEXT,
    rows_json TEXT,
    cost_usd REAL
) STRICT;
CREATE INDEX evals_run ON evals(run_id, id);

-- No foreign keys here: the trail must record actions on ids that were
-- refused or never existed, and must never block on them.
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    run_id TEXT,
    dataset_id TEXT,
    plan_hash TEXT,
    detail_json TEXT
) STRICT;
CREATE INDEX audit_run ON audit(run_id, id);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only');
END;

CREATE TABLE seen (
    key TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
) STRICT;
CREATE INDEX seen_created ON seen(created_at);
"""

# Claims and leases on runs, forgotten datasets, the installation id, the
# spend ledger and the files uploaded to providers.
_SCHEMA_2 = """
ALTER TABLE runs ADD COLUMN owner TEXT;
ALTER TABLE runs ADD COLUMN lease_expires_at TEXT;
ALTER TABLE datasets ADD COLUMN forgotten_at TEXT;
ALTER TABLE datasets ADD COLUMN forgotten_by TEXT;

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    run_id TEXT,
    channel TEXT,
    user TEXT,
    estimate_usd REAL NOT NULL,
    actual_usd REAL,
    status TEXT NOT NULL,
    note TEXT,
    created_at TEXT NOT NULL,
    settled_at TEXT
) STRICT;
CREATE INDEX spend_created ON spend(created_at);
CREATE UNIQUE INDEX spend_one_open ON spend(kind, ref) WHERE status = 'reserved';

CREATE TABLE provider_files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    file_id TEXT NOT NULL,
    run_id TEXT,
    dataset_id TEXT,
    purpose TEXT,
    created_at TEXT NOT NULL,
    deleted_at TEXT,
    UNIQUE (provider, file_id)
) STRICT;
CREATE INDEX provider_files_dataset ON provider_files(dataset_id);
CREATE INDEX provider_files_run ON provider_files(run_id);
"""


def _backfill_spend(db: sqlite_utils.Database) -> None:
    """The ledger starts with what the runs and evaluations before it committed."""
    for run_id, status, estimate, actual, channel, user, created in db.execute(
        "SELECT id, status, estimate_usd, actual_usd, channel, requested_by, created_at FROM runs"
        " WHERE provider != 'local'"
    ).fetchall():
        if status in ("pending_approval", "approved", "queued", "running"):
            row = (estimate or 0.0, None, "reserved")
        elif status in ("succeeded", "failed", "cancelled") and actual:
            row = (estimate or 0.0, actual, "settled")
        else:
            continue
        db.execute(
            "INSERT INTO spend (kind, ref, run_id, channel, user, estimate_usd, actual_usd, status,"
            " created_at) VALUES ('run', ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, run_id, channel, user, *row, created],
        )
    for eval_id, run_id, cost, created in db.execute(
        "SELECT id, run_id, cost_usd, created_at FROM evals WHERE cost_usd > 0"
    ).fetchall():
        db.execute(
            "INSERT INTO spend (kind, ref, run_id, estimate_usd, actual_usd, status, created_at)"
            " VALUES ('eval', ?, ?, ?, ?, 'settled', ?)",
            [f"{run_id}#e{eval_id}", run_id, cost, cost, created],
        )


# Work acknowledged to Slack but not done yet (file ingests, clicks, distillation
# pricing): a row per piece, claimed by one owner under a lease, deleted when
# done, resumed at start-up. Datasets are looked up by the file they came from.
_SCHEMA_PENDING_WORK = """
CREATE TABLE pending_work (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    owner TEXT,
    lease_expires_at TEXT,
    created_at TEXT NOT NULL
) STRICT;
CREATE INDEX datasets_file ON datasets(file_id, channel);
"""


# Applied in order; `PRAGMA user_version` counts how many a file has had.
# Append only: never edit or reorder an entry once it has shipped.
MIGRATIONS: list[Migration] = [
    _SCHEMA_1, _SCHEMA_2, _backfill_spend, _SCHEMA_PENDING_WORK,
]  # fmt: skip


# ---------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Dataset:
    id: str
    sha256: str
    name: str | None
    channel: str | None
    thread_ts: str | None
    file_id: str | None
    user: str | None
    size_bytes: int | None
    examples: int | None
    valid_examples: int | None
    errors: int | None
    warnings: int | None
    tokens_total: int | None
    report_json: Any
    source_dataset_id: str | None
    created_at: datetime
    forgotten_at: datetime | None = None
    forgotten_by: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    dataset_id: str
    eval_dataset_id: str | None
    provider: str
    model: str
    status: str
    plan_json: Any
    plan_hash: str | None
    estimate_usd: float | None
    actual_usd: float | None
    requested_by: str | None
    channel: str | None
    thread_ts: str | None
    card_ts: str | None
    progress_ts: str | None
    external_id: str | None
    result_json: Any
    error: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    owner: str | None = None  # who holds the claim on the run's external submission
    lease_expires_at: datetime | None = None  # the claim lapses then unless renewed


@dataclass(frozen=True, slots=True)
class Approval:
    id: int
    run_id: str
    user: str
    decision: str
    reason: str | None
    plan_hash: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RunEvent:
    id: int
    run_id: str
    created_at: datetime
    kind: str
    data_json: Any


@dataclass(frozen=True, slots=True)
class Eval:
    id: int
    run_id: str
    created_at: datetime
    eval_dataset_id: str | None
    summary_json: Any
    rows_json: Any
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    created_at: datetime
    actor: str
    action: str
    run_id: str | None
    dataset_id: str | None
    plan_hash: str | None
    detail_json: Any


@dataclass(frozen=True, slots=True)
class PendingWork:
    """Work acknowledged to Slack and not done yet; `owner` holds it until `lease_expires_at`."""

    key: str
    kind: str
    payload_json: Any
    owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime


_Row = TypeVar("_Row")

# Columns the store fills in itself; callers may not pass them.
_AUTOMATIC = frozenset({"id", "created_at", "updated_at"})
# Columns that name another row, and the table it must exist in.
_REFERENCES = {
    "dataset_id": "datasets",
    "eval_dataset_id": "datasets",
    "source_dataset_id": "datasets",
    "run_id": "runs",
}


def _columns(cls: type) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(cls))


def _from_row(cls: type[_Row], row: dict[str, Any]) -> _Row:
    values = {}
    for name in _columns(cls):
        value = row[name]
        if value is not None:
            if name.endswith("_json"):
                value = json.loads(value)
            elif name.endswith("_at"):
                value = datetime.fromisoformat(value)
        values[name] = value
    return cls(**values)


def _iso(value: object, name: str) -> str:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, not {value!r}")
    # One fixed format, so that comparing the strings compares the times.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _encode(name: str, value: object) -> object:
    if value is None:
        return None
    if name.endswith("_json"):
        if isinstance(value, str | bytes):
            # A str here is almost always JSON encoded already: storing it
            # again would hand back a str, not the dict the caller expects.
            raise ValueError(f"{name} takes a dict, list or number (the store encodes it), not str")
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} cannot be stored as JSON: {error}") from None
    if name.endswith("_at"):
        return _iso(value, name)
    return value


def _check_fields(kind: str, cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Encode `given` for storage, refusing names that `cls` does not have."""
    columns = _columns(cls)
    for name in given:
        if name in _AUTOMATIC and name in columns:
            raise ValueError(f"{kind} field {name!r} is set by the store, not by callers")
        if name not in columns:
            known = ", ".join(sorted(columns - _AUTOMATIC))
            raise ValueError(f"unknown {kind} field {name!r} (known: {known})")
    return {name: _encode(name, value) for name, value in given.items()}


def _check_statuses(statuses: Iterable[str]) -> list[str]:
    checked = list(statuses)
    for status in checked:
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r} (known: {', '.join(RUN_STATUSES)})")
    return checked


def _as_statuses(status: str | Iterable[str]) -> list[str]:
    # A lone str is one status, not an iterable of one-letter statuses.
    return _check_statuses([status] if isinstance(status, str) else status)


def _require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, not {limit!r}")


def _type_error_as_value_error(error: sqlite3.IntegrityError) -> None:
    # STRICT tables refuse a value of the wrong type ("cannot store TEXT
    # value in INTEGER column runs.estimate_usd"): that is bad input.
    if "cannot store" in str(error):
        raise ValueError(str(error)) from error


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    keys = [column[0] for column in cursor.description]
    return [dict(zip(keys, row, strict=True)) for row in cursor.fetchall()]


def _statements(script: str) -> Iterator[str]:
    """Split a SQL script into statements, keeping trigger bodies whole.

    Not executescript(): sqlite3's commits first, and this runs inside the
    migration's transaction.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \t\n;"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()!r}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- store


def _nothing() -> None:
    pass


class _ThreadMarker:
    """Lives in one thread's local storage; its end hands that thread's connection back."""


IDLE_CONNECTIONS = 32  # connections kept for new threads; more are closed


def _give_back(store_ref: weakref.ref, db: sqlite_utils.Database) -> None:
    store = store_ref()
    if store is None:
        db.close()
    else:
        store._give_back(db)


class Store:
    """tunebot's SQLite database.

    Safe to share between threads: each thread has its own connection while
    it runs (one a finished thread left, or a new one). `clock` returns the current time as an aware datetime; tests
    pass their own to move time.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or _utc_now
        self._local = threading.local()
        # Every connection still open, for close(); weak, so that one dropped
        # when the idle list is full closes as soon as nothing uses it.
        self._open: weakref.WeakSet[sqlite_utils.Database] = weakref.WeakSet()
        # Connections whose threads ended, for the next thread: opening one
        # (connect, pragmas, reading the schema) was a sixth of an ack's time
        # when every HTTP request came on a thread of its own.
        self._idle: list[sqlite_utils.Database] = []
        self._guard = threading.Lock()
        self._writer = threading.Lock()  # one write transaction at a time in this process
        # Called before a write transaction waits for that lock: the bot lets
        # its job threads step aside there while an ack is being answered.
        self.before_write: Callable[[], None] = _nothing
        self._closed = False
        self._installation_id: str | None = None
        try:
            # WAL belongs to the file, not the connection: setting it once is enough.
            self.db.conn.execute("PRAGMA journal_mode = WAL").fetchall()
            self._migrate()
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_home(cls, home: str | Path, *, clock: Callable[[], datetime] | None = None) -> Store:
        """The store at ``home / "tunebot.db"``, creating `home` if needed."""
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        return cls(home / DB_NAME, clock=clock)

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections and transactions

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection, wrapped in sqlite-utils."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._checkout()
            self._local.db = db
            # When this thread ends, its thread-local storage goes, and with it
            # this marker: the connection goes back for the next thread.
            self._local.marker = marker = _ThreadMarker()
            done = weakref.finalize(marker, _give_back, weakref.ref(self), db)
            done.atexit = False
        return db

    def _checkout(self) -> sqlite_utils.Database:
        with self._guard:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, db: sqlite_utils.Database) -> None:
        """A finished thread's connection: kept for the next one, unless the
        store is closed, enough are kept, or the thread left a transaction open."""
        with self._guard:
            keep = not self._closed and len(self._idle) < IDLE_CONNECTIONS
            if keep and not db.conn.in_transaction:
                self._idle.append(db)
                return
        db.close()

    def _connect(self) -> sqlite_utils.Database:
        # isolation_level=None: the driver opens no transactions of its own;
        # transaction() says BEGIN IMMEDIATE. check_same_thread=False only so
        # that close() may close every thread's connection.
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        # In WAL mode NORMAL never corrupts the file and loses no committed
        # transaction on a crash of the bot, only on a power cut; FULL's fsync on
        # every commit is what queued twenty acks for seconds (bench/ack.py).
        conn.execute("PRAGMA synchronous = NORMAL")
        db = sqlite_utils.Database(conn, execute_plugins=False)
        with self._guard:
            if self._closed:
                conn.close()
                raise RuntimeError(f"{self!r} is closed")
            self._open.add(db)
        return db

    def close(self) -> None:
        """Close every thread's connection. Call once the threads are done."""
        with self._guard:
            self._closed = True
            open_dbs = list(self._open)
            self._open.clear()
            self._idle.clear()
        for db in open_dbs:
            db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One unit of work: all of it is committed, or none of it.

        Nested use makes a savepoint, so an inner block that raises is undone
        alone and the outer one may carry on.
        """
        db = self.db
        conn = db.conn
        if conn.in_transaction:
            # A savepoint named by its depth: the same few statements each time,
            # prepared once (sqlite-utils' atomic() names each one afresh).
            depth = getattr(self._local, "depth", 0) + 1
            name = f"tunebot_{depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._local.depth = depth
            try:
                yield db
            except BaseException:
                if conn.in_transaction:  # a RAISE(ROLLBACK) trigger may have ended it all
                    conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                    conn.execute(f"RELEASE SAVEPOINT {name}")
                raise
            else:
                conn.execute(f"RELEASE SAVEPOINT {name}")
            finally:
                self._local.depth = depth - 1
            return
        # This process's writers queue on a lock, first come first served:
        # SQLite's own busy handler polls with growing sleeps, which left some of
        # twenty racing writers waiting seconds. Other processes (the CLI) still
        # meet the busy timeout. IMMEDIATE takes SQLite's write lock at once: a
        # deferred transaction that reads and then writes fails with "database
        # is locked" without waiting when another connection wrote in between.
        self.before_write()
        with self._writer:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        """How many of `MIGRATIONS` this file has had (``PRAGMA user_version``)."""
        return self.db.conn.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        # Under the write lock, so that two processes opening a new file at
        # once apply each migration exactly once between them.
        with self.transaction() as db:
            version = db.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"{self.path} has schema version {version}, but this tunebot "
                    f"knows only {len(MIGRATIONS)}; upgrade tunebot"
                )
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                if isinstance(migration, str):
                    for statement in _statements(migration):
                        db.execute(statement)
                else:
                    migration(db)
                db.conn.execute(f"PRAGMA user_version = {number}")

    # -- helpers

    def _now(self) -> str:
        return _iso(self._clock(), "clock()")

    def _next_id(self, db: sqlite_utils.Database, counter: str, prefix: str) -> str:
        # Called inside the insert's transaction, which holds the write lock,
        # so no two callers can read the same value.
        cursor = db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            [counter],
        )
        return f"{prefix}{cursor.fetchall()[0][0]}"

    def _require_refs(self, db: sqlite_utils.Database, values: dict[str, Any]) -> None:
        """Raise NotFound naming the id, rather than SQLite's anonymous FK error."""
        for name, table in _REFERENCES.items():
            key = values.get(name)
            if key is not None and not self._exists(db, table, key):
                raise NotFound(f"no {table[:-1]} {key!r} (given as {name})")

    @staticmethod
    def _exists(db: sqlite_utils.Database, table: str, key: object) -> bool:
        cursor = db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [key])
        return cursor.fetchone() is not None

    def _insert(self, db: sqlite_utils.Database, table: str, values: dict[str, Any]) -> dict:
        names = list(values)
        sql = (
            f"INSERT INTO {table} ({', '.join(f'[{n}]' for n in names)})"
            f" VALUES ({', '.join('?' for _ in names)}) RETURNING *"
        )
        try:
            return _rows(db.execute(sql, [values[n] for n in names]))[0]
        except sqlite3.IntegrityError as error:
            _type_error_as_value_error(error)
            raise

    def _update(
        self, db: sqlite_utils.Database, table: str, key: str, values: dict[str, Any]
    ) -> dict | None:
        if not values:
            rows = list(db.query(f"SELECT * FROM {table} WHERE id = ?", [key]))
            return rows[0] if rows else None
        sets = ", ".join(f"[{name}] = ?" for name in values)
        try:
            rows = _rows(
                db.execute(
                    f"UPDATE {table} SET {sets} WHERE id = ? RETURNING *",
                    [*values.values(), key],
                )
            )
        except sqlite3.IntegrityError as error:
            _type_error_as_value_error(error)
            raise
        return rows[0] if rows else None

    def _find(self, table: str, cls: type[_Row], key: str) -> _Row | None:
        rows = list(self.db.query(f"SELECT * FROM {table} WHERE id = ?", [key]))
        return _from_row(cls, rows[0]) if rows else None

    def _list(
        self,
        table: str,
        cls: type[_Row],
        filters: dict[str, object],
        *,
        order_by: str,
        limit: int | None = None,
    ) -> list[_Row]:
        _check_limit(limit)
        wheres: list[str] = []
        args: list[object] = []
        for column, value in filters.items():
            if value is None:
                continue
            if isinstance(value, list):
                wheres.append(f"[{column}] IN ({', '.join('?' for _ in value)})")
                args.extend(value)
            else:
                wheres.append(f"[{column}] = ?")
                args.append(value)
        rows = self.db.table(table).rows_where(
            " AND ".join(wheres) or None, args, order_by=order_by, limit=limit
        )
        return [_from_row(cls, row) for row in rows]

    # -- datasets

    def add_dataset(self, **fields: Any) -> Dataset:
        """Record a dataset; allocates the next id ("d1", "d2", ...)."""
        values = _check_fields("dataset", Dataset, fields)
        sha = values.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, not {sha!r}")
        with self.transaction() as db:
            self._require_refs(db, values)
            values["id"] = self._next_id(db, "datasets", "d")
            values["created_at"] = self._now()
            return _from_row(Dataset, self._insert(db, "datasets", values))

    def find_dataset(self, id: str) -> Dataset | None:
        return self._find("datasets", Dataset, id)

    def get_dataset(self, id: str) -> Dataset:
        dataset = self.find_dataset(id)
        if dataset is None:
            raise NotFound(f"no dataset {id!r}")
        return dataset

    def datasets(self, channel: str | None = None, limit: int | None = 20) -> list[Dataset]:
        """Newest first; all channels when `channel` is None; no cap when `limit` is None."""
        return self._list(
            "datasets",
            Dataset,
            {"channel": channel},
            order_by="created_at DESC, rowid DESC",
            limit=limit,
        )

    def latest_dataset(self, channel: str) -> Dataset | None:
        """The newest dataset in `channel` not forgotten: the one a command that names none means."""
        _require_text("channel", channel)
        return self._newest_dataset("channel = ?", [channel])

    def dataset_for_file(self, file_id: str, channel: str) -> Dataset | None:
        """The newest dataset not forgotten that Slack file `file_id` became in `channel`."""
        _require_text("file_id", file_id)
        return self._newest_dataset("file_id = ? AND channel = ?", [file_id, channel])

    def checked_dataset_for_file(self, file_id: str) -> Dataset | None:
        """The newest dataset not forgotten, in any channel, that Slack file `file_id`
        became and that has its report."""
        _require_text("file_id", file_id)
        return self._newest_dataset("file_id = ? AND report_json IS NOT NULL", [file_id])

    def _newest_dataset(self, where: str, args: list[Any]) -> Dataset | None:
        rows = list(
            self.db.query(
                f"SELECT * FROM datasets WHERE {where} AND forgotten_at IS NULL"
                " ORDER BY created_at DESC, rowid DESC LIMIT 1",
                args,
            )
        )
        return _from_row(Dataset, rows[0]) if rows else None

    def dataset_by_sha(self, sha256: str, channel: str | None = None) -> Dataset | None:
        """The newest dataset with this content, optionally only in `channel`."""
        found = self._list(
            "datasets",
            Dataset,
            {"sha256": sha256, "channel": channel},
            order_by="created_at DESC, rowid DESC",
            limit=1,
        )
        return found[0] if found else None

    def update_dataset(self, id: str, **fields: Any) -> Dataset:
        values = _check_fields("dataset", Dataset, fields)
        if "sha256" in values and not _SHA256.fullmatch(str(values["sha256"])):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, not {values['sha256']!r}")
        with self.transaction() as db:
            self._require_refs(db, values)
            row = self._update(db, "datasets", id, values)
        if row is None:
            raise NotFound(f"no dataset {id!r}")
        return _from_row(Dataset, row)

    # -- runs

    def add_run(self, *, id: str | None = None, **fields: Any) -> Run:
        """Record a run; allocates the next id ("r1", ...), or takes one `new_run_id`
        allocated earlier. Status defaults to pending_approval."""
        fields.setdefault("status", "pending_approval")
        values = _check_fields("run", Run, fields)
        _check_statuses([values["status"]])
        for name in ("dataset_id", "provider", "model"):
            _require_text(name, values.get(name))
        if id is not None and not re.fullmatch(r"r[0-9]+", str(id)):
            raise ValueError(f"a run id is r and a number, not {id!r}")
        with self.transaction() as db:
            self._require_refs(db, values)
            values["id"] = id or self._next_id(db, "runs", "r")
            values["created_at"] = values["updated_at"] = self._now()
            return _from_row(Run, self._insert(db, "runs", values))

    def new_run_id(self) -> str:
        """Allocate the next run id now, for a run recorded later with ``add_run(id=...)``."""
        with self.transaction() as db:
            return self._next_id(db, "runs", "r")

    def find_run(self, id: str) -> Run | None:
        return self._find("runs", Run, id)

    def get_run(self, id: str) -> Run:
        run = self.find_run(id)
        if run is None:
            raise NotFound(f"no run {id!r}")
        return run

    def runs(
        self,
        channel: str | None = None,
        status: str | Iterable[str] | None = None,
        limit: int | None = 20,
        provider: str | None = None,
    ) -> list[Run]:
        """Newest first. `status` is one status or several; None means any."""
        statuses = None if status is None else _as_statuses(status)
        return self._list(
            "runs",
            Run,
            {"channel": channel, "status": statuses, "provider": provider},
            order_by="created_at DESC, rowid DESC",
            limit=limit,
        )

    def update_run(self, id: str, **fields: Any) -> Run:
        """Change fields unconditionally and set updated_at. For status
        changes that race (approve, start, cancel) use transition_run."""
        values = _check_fields("run", Run, fields)
        if "status" in values:
            _check_statuses([values["status"]])
        with self.transaction() as db:
            self._require_refs(db, values)
            values["updated_at"] = self._now()
            row = self._update(db, "runs", id, values)
        if row is None:
            raise NotFound(f"no run {id!r}")
        return _from_row(Run, row)

    def transition_run(
        self, id: str, from_statuses: Iterable[str], to_status: str, **fields: Any
    ) -> bool:
        """Move run `id` to `to_status` (and set `fields`) only if its status is
        one of `from_statuses`. True when this call made the change: of many
        racing callers (a double click, a Slack retry) exactly one gets True.
        Raises NotFound when there is no such run.
        """
        sources = _as_statuses(from_statuses)
        if not sources:
            raise ValueError("from_statuses is empty: no run could ever move")
        _check_statuses([to_status])
        values = _check_fields("run", Run, fields)
        if "status" in values:
            raise ValueError("pass the new status as to_status, not as a field")
        values["status"] = to_status
        with self.transaction() as db:
            self._require_refs(db, values)
            values["updated_at"] = self._now()
            sets = ", ".join(f"[{name}] = ?" for name in values)
            marks = ", ".join("?" for _ in sources)
            try:
                cursor = db.execute(
                    f"UPDATE runs SET {sets} WHERE id = ? AND status IN ({marks})",
                    [*values.values(), id, *sources],
                )
            except sqlite3.IntegrityError as error:
                _type_error_as_value_error(error)
                raise
            if cursor.rowcount == 1:
                return True
            if not self._exists(db, "runs", id):
                raise NotFound(f"no run {id!r}")
            return False

    # -- claims: one owner, under a lease, for a run's external side effects

    def claim_run(
        self,
        id: str,
        from_statuses: Iterable[str],
        to_status: str,
        *,
        owner: str,
        lease: timedelta,
        **fields: Any,
    ) -> bool:
        """Move run `id` to `to_status` and make `owner` its claimant until now + `lease`.

        Only when its status is one of `from_statuses` and nobody else holds a
        live claim (no owner, a lapsed lease, or `owner` itself). True for
        exactly one of many racing callers. Raises NotFound for no such run.
        """
        _require_text("owner", owner)
        if not isinstance(lease, timedelta) or lease <= timedelta(0):
            raise ValueError(f"lease must be a positive timedelta, not {lease!r}")
        sources = _as_statuses(from_statuses)
        if not sources:
            raise ValueError("from_statuses is empty: no run could ever move")
        _check_statuses([to_status])
        values = _check_fields("run", Run, fields)
        for name in ("status", "owner", "lease_expires_at"):
            if name in values:
                raise ValueError(f"{name} is set by claim_run, not passed as a field")
        with self.transaction() as db:
            now = self._now()
            values.update(
                status=to_status,
                owner=owner,
                lease_expires_at=_iso(self._clock() + lease, "clock()"),
                updated_at=now,
            )
            sets = ", ".join(f"[{name}] = ?" for name in values)
            marks = ", ".join("?" for _ in sources)
            cursor = db.execute(
                f"UPDATE runs SET {sets} WHERE id = ? AND status IN ({marks})"
                " AND (owner IS NULL OR owner = ? OR lease_expires_at IS NULL OR lease_expires_at < ?)",
                [*values.values(), id, *sources, owner, now],
            )
            if cursor.rowcount == 1:
                return True
            if not self._exists(db, "runs", id):
                raise NotFound(f"no run {id!r}")
            return False

    def renew_claim(
        self, id: str, owner: str, lease: timedelta, *, status: str | None = None
    ) -> bool:
        """Extend `owner`'s claim on run `id` (and check its status). False: the claim is lost."""
        statuses = [] if status is None else _as_statuses(status)
        with self.transaction() as db:
            sql = "UPDATE runs SET lease_expires_at = ? WHERE id = ? AND owner = ?"
            args: list[object] = [_iso(self._clock() + lease, "clock()"), id, owner]
            if statuses:
                sql += " AND status = ?"
                args.append(statuses[0])
            return db.execute(sql, args).rowcount == 1

    def release_claim(
        self, id: str, owner: str, *, from_status: str, to_status: str | None = None,
        retry_at: datetime | None = None, **fields: Any,
    ) -> bool:  # fmt: skip
        """Give up `owner`'s claim on run `id` while it is `from_status`, optionally
        moving it to `to_status`. False, and nothing changes, when the claim is
        no longer `owner`'s or the run has moved on (cancelled meanwhile).

        `retry_at` keeps the run unclaimable until then (a back-off before the
        poller tries again); otherwise anyone may claim it at once.
        """
        _check_statuses([from_status])
        values = _check_fields("run", Run, fields)
        if to_status is not None:
            _check_statuses([to_status])
            values["status"] = to_status
        values["owner"] = None if retry_at is None else f"backoff:{owner}"
        values["lease_expires_at"] = None if retry_at is None else _iso(retry_at, "retry_at")
        with self.transaction() as db:
            values["updated_at"] = self._now()
            sets = ", ".join(f"[{name}] = ?" for name in values)
            cursor = db.execute(
                f"UPDATE runs SET {sets} WHERE id = ? AND owner = ? AND status = ?",
                [*values.values(), id, owner, from_status],
            )
            return cursor.rowcount == 1

    # -- the installation, and files uploaded to providers

    @property
    def installation_id(self) -> str:
        """A random id made once per database: half of every idempotency key sent out.

        Two installations sharing one provider account (staging and
        production), or a database reset, never take each other's jobs.
        """
        import secrets

        if self._installation_id is not None:
            return self._installation_id
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('installation_id', ?)"
                " ON CONFLICT (key) DO NOTHING",
                [f"tb{secrets.token_hex(8)}"],
            )
            found = db.execute("SELECT value FROM meta WHERE key = 'installation_id'").fetchone()
        self._installation_id = found[0]
        return self._installation_id

    def add_provider_file(
        self,
        provider: str,
        file_id: str,
        *,
        run_id: str | None = None,
        dataset_id: str | None = None,
        purpose: str = "fine-tune",
    ) -> None:
        """Record a file uploaded to a provider (before anything else uses it)."""
        _require_text("provider", provider)
        _require_text("file_id", file_id)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO provider_files (provider, file_id, run_id, dataset_id, purpose,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, file_id) DO NOTHING",
                [provider, file_id, run_id, dataset_id, purpose, self._now()],
            )

    def provider_files(
        self, *, run_id: str | None = None, dataset_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Files uploaded to providers and not yet deleted, oldest first."""
        wheres, args = ["deleted_at IS NULL"], []
        for column, value in (("run_id", run_id), ("dataset_id", dataset_id)):
            if value is not None:
                wheres.append(f"{column} = ?")
                args.append(value)
        return list(
            self.db.query(
                f"SELECT * FROM provider_files WHERE {' AND '.join(wheres)} ORDER BY id", args
            )
        )

    def provider_file_deleted(self, provider: str, file_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE provider_files SET deleted_at = ? WHERE provider = ? AND file_id = ?",
                [self._now(), provider, file_id],
            )

    def sha_in_use(self, sha256: str, *, besides: str | None = None) -> bool:
        """Whether anything but dataset `besides` still needs blob `sha256`: another
        dataset not forgotten, in any channel (as its bytes, or its report's token
        counts or findings), or a run of such a dataset (as a held-out split).

        A scan of the reports and runs: for forgetting, which is rare.
        """
        _require_text("sha256", sha256)
        pattern = f'%"{sha256}"%'
        row = self.db.execute(
            "SELECT 1 FROM datasets WHERE id != ? AND forgotten_at IS NULL"
            " AND (sha256 = ? OR report_json LIKE ?)"
            " UNION ALL"
            " SELECT 1 FROM runs JOIN datasets ON datasets.id = runs.dataset_id"
            " WHERE runs.dataset_id != ? AND COALESCE(runs.eval_dataset_id, '') != ?"
            " AND datasets.forgotten_at IS NULL AND runs.result_json LIKE ? LIMIT 1",
            [besides or "", sha256, pattern, besides or "", besides or "", pattern],
        ).fetchone()
        return row is not None

    # -- run events, approvals, evals

    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> RunEvent:
        """Append to a run's timeline (status changes, metrics, messages)."""
        _require_text("kind", kind)
        values = {"run_id": run_id, "kind": kind, "data_json": _encode("data_json", data)}
        with self.transaction() as db:
            self._require_refs(db, values)
            values["created_at"] = self._now()
            return _from_row(RunEvent, self._insert(db, "run_events", values))

    def events(self, run_id: str, kind: str | None = None) -> list[RunEvent]:
        """Oldest first."""
        return self._list("run_events", RunEvent, {"run_id": run_id, "kind": kind}, order_by="id")

    def add_approval(
        self,
        run_id: str,
        user: str,
        decision: str,
        *,
        reason: str | None = None,
        plan_hash: str | None = None,
    ) -> bool:
        """Record a decision. False, and nothing changes, when this user has
        already made this decision on this run (a double click, a retry)."""
        _require_text("user", user)
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r} (known: {', '.join(DECISIONS)})")
        with self.transaction() as db:
            self._require_refs(db, {"run_id": run_id})
            # ON CONFLICT names the one constraint to skip; OR IGNORE would
            # also skip NOT NULL violations silently.
            cursor = db.execute(
                "INSERT INTO approvals (run_id, user, decision, reason, plan_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, user, decision) DO NOTHING",
                [run_id, user, decision, reason, plan_hash, self._now()],
            )
            return cursor.rowcount == 1

    def approvals(self, run_id: str) -> list[Approval]:
        """Oldest first."""
        return self._list("approvals", Approval, {"run_id": run_id}, order_by="id")

    def add_eval(
        self,
        run_id: str,
        *,
        eval_dataset_id: str | None = None,
        summary: dict[str, Any] | None = None,
        rows: list[Any] | None = None,
        cost_usd: float | None = None,
    ) -> Eval:
        values = {
            "run_id": run_id,
            "eval_dataset_id": eval_dataset_id,
            "summary_json": _encode("summary_json", summary),
            "rows_json": _encode("rows_json", rows),
            "cost_usd": cost_usd,
        }
        with self.transaction() as db:
            self._require_refs(db, values)
            values["created_at"] = self._now()
            return _from_row(Eval, self._insert(db, "evals", values))

    def evals(self, run_id: str) -> list[Eval]:
        """Oldest first."""
        return self._list("evals", Eval, {"run_id": run_id}, order_by="id")

    # -- audit

    def audit(
        self,
        actor: str,
        action: str,
        *,
        run_id: str | None = None,
        dataset_id: str | None = None,
        plan_hash: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Append to the audit trail, which triggers keep append-only."""
        _require_text("actor", actor)
        _require_text("action", action)
        values = {
            "actor": actor,
            "action": action,
            "run_id": run_id,
            "dataset_id": dataset_id,
            "plan_hash": plan_hash,
            "detail_json": _encode("detail_json", detail),
        }
        with self.transaction() as db:
            values["created_at"] = self._now()
            return _from_row(AuditEntry, self._insert(db, "audit", values))

    def audit_log(
        self, run_id: str | None = None, dataset_id: str | None = None, limit: int | None = 100
    ) -> list[AuditEntry]:
        """Newest first."""
        return self._list(
            "audit",
            AuditEntry,
            {"run_id": run_id, "dataset_id": dataset_id},
            order_by="id DESC",
            limit=limit,
        )

    # -- idempotency keys

    def mark_seen(self, key: str) -> bool:
        """True only the first time `key` is marked, whichever thread or
        process marks it: Slack redelivers events, and two deliveries of one
        file must not both be processed."""
        _require_text("key", key)
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO seen (key, created_at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                [key, self._now()],
            )
            return cursor.rowcount == 1

    def prune_seen(self, older_than: timedelta) -> int:
        """Forget keys marked more than `older_than` ago; returns how many."""
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(f"older_than must be a non-negative timedelta, not {older_than!r}")
        cutoff = _iso(self._clock() - older_than, "clock()")
        with self.transaction() as db:
            return db.execute("DELETE FROM seen WHERE created_at < ?", [cutoff]).rowcount

    def seen(self, key: str) -> bool:
        """Whether `key` was marked (and not pruned since)."""
        _require_text("key", key)
        return self.db.execute("SELECT 1 FROM seen WHERE key = ?", [key]).fetchone() is not None

    # -- work acknowledged to Slack and not done yet

    def claim_work(
        self,
        key: str,
        kind: str,
        payload: Any,
        *,
        owner: str,
        lease: timedelta,
        force: bool = False,
    ) -> bool:
        """Record work `key` for `owner` until `lease` from now, or take it over.

        True when `owner` holds it after this call: the key is new, or nobody
        holds it (released, or its lease lapsed), or `force` (at start-up, when
        no other process can hold any). A key held by a live claim stays with
        its holder: two deliveries of one file cannot both take it. A key taken
        over keeps the payload it was first recorded with.
        """
        for name, value in (("key", key), ("kind", kind), ("owner", owner)):
            _require_text(name, value)
        now = self._now()
        until = _iso(self._clock() + lease, "clock()")
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO pending_work (key, kind, payload_json, owner, lease_expires_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                " owner = excluded.owner, lease_expires_at = excluded.lease_expires_at"
                " WHERE ? OR pending_work.owner IS NULL OR pending_work.lease_expires_at IS NULL"
                " OR pending_work.lease_expires_at < ?",
                [key, kind, _encode("payload_json", payload), owner, until, now, int(force), now],
            )
            return cursor.rowcount == 1

    def renew_work(self, key: str, owner: str, lease: timedelta) -> bool:
        """Extend `owner`'s claim on `key`; False when it is no longer theirs (or done)."""
        until = _iso(self._clock() + lease, "clock()")
        with self.transaction() as db:
            return (
                db.execute(
                    "UPDATE pending_work SET lease_expires_at = ? WHERE key = ? AND owner = ?",
                    [until, key, owner],
                ).rowcount
                == 1
            )

    def release_work(self, key: str, owner: str) -> bool:
        """Give up `owner`'s claim on `key` and keep the work: anyone may take it now."""
        with self.transaction() as db:
            return (
                db.execute(
                    "UPDATE pending_work SET owner = NULL, lease_expires_at = NULL"
                    " WHERE key = ? AND owner = ?",
                    [key, owner],
                ).rowcount
                == 1
            )

    def finish_work(self, key: str, owner: str | None = None) -> bool:
        """The work `key` is done (or given up): forget it. With `owner`, only while theirs."""
        sql, args = "DELETE FROM pending_work WHERE key = ?", [key]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        with self.transaction() as db:
            return db.execute(sql, args).rowcount == 1

    def add_work_hints(self, key: str, hints: dict[str, Any]) -> bool:
        """Fill the arguments of work `key` that are still empty (None) from `hints`:
        a later delivery about the same thing knows more (a thread, a file object).
        Arguments already set are kept. False when there is no such work."""
        _require_text("key", key)
        with self.transaction() as db:
            row = db.execute(
                "SELECT payload_json FROM pending_work WHERE key = ?", [key]
            ).fetchone()
            if row is None:
                return False
            payload = json.loads(row[0])
            args = payload.setdefault("args", {})
            missing = {k: v for k, v in hints.items() if v is not None and args.get(k) is None}
            if missing:
                args.update(missing)
                db.execute(
                    "UPDATE pending_work SET payload_json = ? WHERE key = ?",
                    [_encode("payload_json", payload), key],
                )
            return True

    def work_args(self, key: str) -> dict[str, Any] | None:
        """The recorded arguments of work `key`; None when it is done or unknown."""
        row = self.db.execute(
            "SELECT payload_json FROM pending_work WHERE key = ?", [key]
        ).fetchone()
        return None if row is None else (json.loads(row[0]).get("args") or {})

    def pending_work(self, kind: str | None = None) -> list[PendingWork]:
        """Work not done yet, oldest first."""
        return self._list("pending_work", PendingWork, {"kind": kind}, order_by="created_at, rowid")
