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

DB_NAME = "tunebot.db"
BUSY_TIMEOUT_MS = 5000

RUN_STATUSES = (
    "pending_approval",
    "approved",
    "rejected",
    "expired",
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
DECISIONS = ("approve", "reject", "override_secret")

_SHA256 = re.compile(r"[0-9a-f]{64}")


class NotFound(LookupError):
    """No row with that id."""


class SchemaTooNew(RuntimeError):
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

# Applied in order; `PRAGMA user_version` counts how many a file has had.
# Append only: never edit or reorder an entry once it has shipped.
MIGRATIONS: list[Migration] = [_SCHEMA_1]


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


class Store:
    """tunebot's SQLite database.

    Safe to share between threads: each thread opens its own connection on
    first use. `clock` returns the current time as an aware datetime; tests
    pass their own to move time.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or _utc_now
        self._local = threading.local()
        # Weak, so that a finished thread's connection closes with its
        # thread-local storage instead of lingering until close().
        self._open: weakref.WeakSet[sqlite_utils.Database] = weakref.WeakSet()
        self._guard = threading.Lock()
        self._closed = False
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
            db = self._connect()
            self._local.db = db
        return db

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
            with db.atomic():
                yield db
            return
        # IMMEDIATE takes the write lock at once. A deferred transaction that
        # reads and then writes fails with "database is locked" without
        # waiting when another connection wrote in between.
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
        """The newest dataset in `channel`: the one a command that names none means."""
        _require_text("channel", channel)
        found = self.datasets(channel=channel, limit=1)
        return found[0] if found else None

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

    def add_run(self, **fields: Any) -> Run:
        """Record a run; allocates the next id ("r1", ...). Status defaults to pending_approval."""
        fields.setdefault("status", "pending_approval")
        values = _check_fields("run", Run, fields)
        _check_statuses([values["status"]])
        for name in ("dataset_id", "provider", "model"):
            _require_text(name, values.get(name))
        with self.transaction() as db:
            self._require_refs(db, values)
            values["id"] = self._next_id(db, "runs", "r")
            values["created_at"] = values["updated_at"] = self._now()
            return _from_row(Run, self._insert(db, "runs", values))

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
