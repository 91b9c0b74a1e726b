"""storage/: a real SQLite file, real files on disk, a real second process."""

from __future__ import annotations

import dataclasses
import io
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import storage.db
from storage import (
    MIGRATIONS,
    Approval,
    AuditEntry,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    Dataset,
    Eval,
    HomeLock,
    HomeLocked,
    NotFound,
    Run,
    RunEvent,
    SchemaTooNew,
    Store,
)
from tests.conftest import ROOT

SHA_A = "a" * 64
SHA_B = "b" * 64


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    with Store.in_home(tmp_path / "home", clock=clock) as opened:
        yield opened


def run_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0..count-1) in threads released together; re-raise any error."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def target(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return results


def make_run(store: Store, **fields) -> Run:
    dataset = store.add_dataset(sha256=SHA_A, channel="C1")
    return store.add_run(dataset_id=dataset.id, provider="openai", model="gpt-4o-mini", **fields)


# ------------------------------------------------------------ schema


def test_new_file_gets_every_migration_and_wal(tmp_path: Path):
    store = Store.in_home(tmp_path / "new" / "home")
    assert store.path == tmp_path / "new" / "home" / "tunebot.db"
    assert store.schema_version == len(MIGRATIONS)
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    store.close()


def test_reopening_applies_nothing_twice_and_keeps_data(tmp_path: Path):
    path = tmp_path / "tunebot.db"
    with Store(path) as first:
        first.add_dataset(sha256=SHA_A)
    with Store(path) as second, Store(path) as third:
        assert second.schema_version == third.schema_version == len(MIGRATIONS)
        assert second.get_dataset("d1").sha256 == SHA_A
        assert second.add_dataset(sha256=SHA_B).id == "d2"


def test_each_migration_runs_once_in_order(tmp_path: Path, monkeypatch):
    calls: list[int] = []

    def second(db) -> None:
        calls.append(2)
        db.execute("CREATE TABLE extra (x INTEGER)")

    third = "CREATE TABLE extra_two (y TEXT);"
    path = tmp_path / "tunebot.db"
    Store(path).close()  # a file at version 1, then a tunebot with more
    monkeypatch.setattr(storage.db, "MIGRATIONS", [*MIGRATIONS, second, third])
    stores = run_threads(4, lambda _: Store(path))
    assert calls == [2]
    for opened in stores:
        assert opened.schema_version == len(MIGRATIONS) + 2
        assert {"extra", "extra_two"} <= set(opened.db.table_names())
        opened.close()


def test_failed_migration_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch):
    def broken(db) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration bug")

    path = tmp_path / "tunebot.db"
    Store(path).close()
    monkeypatch.setattr(storage.db, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(path)
    monkeypatch.undo()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert "half_done" not in store.db.table_names()


def test_file_from_a_newer_tunebot_is_refused(tmp_path: Path):
    path = tmp_path / "tunebot.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="upgrade tunebot"):
        Store(path)


@pytest.mark.parametrize(
    ("table", "cls"),
    [
        ("datasets", Dataset),
        ("runs", Run),
        ("approvals", Approval),
        ("run_events", RunEvent),
        ("evals", Eval),
        ("audit", AuditEntry),
    ],
)
def test_tables_and_dataclasses_agree(store: Store, table: str, cls: type):
    assert set(store.db.table(table).columns_dict) == {f.name for f in dataclasses.fields(cls)}


# ------------------------------------------------------------ ids and threads


def test_ids_are_short_and_sequential(store: Store):
    assert [store.add_dataset(sha256=SHA_A).id for _ in range(3)] == ["d1", "d2", "d3"]
    assert store.add_run(dataset_id="d1", provider="local", model="m").id == "r1"
    assert store.add_run(dataset_id="d2", provider="local", model="m").id == "r2"


def test_ids_never_collide_across_threads(store: Store):
    def add_ten(_: int) -> list[str]:
        return [store.add_dataset(sha256=SHA_A).id for _ in range(10)]

    ids = [i for batch in run_threads(8, add_ten) for i in batch]
    assert sorted(ids) == sorted(f"d{n}" for n in range(1, 81))


def test_each_thread_has_its_own_connection(store: Store):
    here = store.db
    assert store.db is here
    there = run_threads(1, lambda _: store.db)[0]
    assert there is not here


def test_a_finished_threads_connection_serves_the_next_thread(store: Store):
    """A thread per HTTP request must not mean a new connection per request."""
    used: list[int] = []

    def one_request() -> None:
        used.append(id(store.db))
        store.add_dataset(sha256=SHA_A)

    for _ in range(20):
        thread = threading.Thread(target=one_request)
        thread.start()
        thread.join()
    assert len(set(used)) == 1 and len(store.datasets()) == 20
    together = threading.Barrier(4)

    def at_once(_: int) -> int:
        mine = id(store.db)
        together.wait(30)  # nobody has finished: each still holds its own
        return mine

    assert len(set(run_threads(4, at_once))) == 4


def test_closing_the_store_closes_the_connections_kept_for_later(tmp_path: Path):
    store = Store(tmp_path / "tunebot.db")
    thread = threading.Thread(target=lambda: store.find_dataset("d1"))
    thread.start()
    thread.join()
    kept = store._idle[0]
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        kept.execute("SELECT 1")


def test_closed_store_refuses_work(tmp_path: Path):
    store = Store(tmp_path / "tunebot.db")
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.find_dataset("d1")


# ------------------------------------------------------------ datasets


def test_dataset_fields_round_trip(store: Store, clock: Clock):
    report = {"errors": [{"line": 3, "message": "no assistant turn"}], "ratio": 0.5}
    added = store.add_dataset(
        sha256=SHA_A,
        name="support.jsonl",
        channel="C1",
        thread_ts="1700000000.000100",
        file_id="F1",
        user="U1",
        size_bytes=1234,
        examples=10,
        valid_examples=9,
        errors=1,
        warnings=2,
        tokens_total=5000,
        report_json=report,
    )
    assert added == store.get_dataset("d1")
    assert added.report_json == report
    assert added.created_at == clock.now
    derived = store.add_dataset(sha256=SHA_B, source_dataset_id="d1")
    assert derived.source_dataset_id == "d1"


def test_latest_dataset_is_per_channel(store: Store, clock: Clock):
    assert store.latest_dataset("C1") is None
    store.add_dataset(sha256=SHA_A, channel="C1")
    clock.advance(seconds=1)
    store.add_dataset(sha256=SHA_B, channel="C2")
    clock.advance(seconds=1)
    store.add_dataset(sha256=SHA_B, channel="C1")
    store.add_dataset(sha256=SHA_A, channel="C2")  # same instant: insertion order decides
    assert store.latest_dataset("C1").id == "d3"
    assert store.latest_dataset("C2").id == "d4"
    assert [d.id for d in store.datasets()] == ["d4", "d3", "d2", "d1"]
    assert [d.id for d in store.datasets(channel="C1", limit=1)] == ["d3"]
    assert store.dataset_by_sha(SHA_A).id == "d4"
    assert store.dataset_by_sha(SHA_A, channel="C1").id == "d1"
    assert store.dataset_by_sha("c" * 64) is None


def test_missing_rows(store: Store):
    assert store.find_dataset("d9") is None
    assert store.find_run("r9") is None
    with pytest.raises(NotFound, match="'d9'"):
        store.get_dataset("d9")
    with pytest.raises(LookupError, match="'r9'"):
        store.get_run("r9")
    with pytest.raises(NotFound, match="'d9'"):
        store.update_dataset("d9", name="x")
    with pytest.raises(NotFound, match="'d9'"):
        store.add_run(dataset_id="d9", provider="local", model="m")
    with pytest.raises(NotFound, match="'r9'"):
        store.add_event("r9", "log")


def test_update_dataset(store: Store):
    store.add_dataset(sha256=SHA_A)
    updated = store.update_dataset("d1", name="renamed", report_json=[1, 2])
    assert (updated.name, updated.report_json) == ("renamed", [1, 2])
    assert store.get_dataset("d1") == updated


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.add_dataset(sha256=SHA_A, colour="red"), "'colour'"),
        (lambda s: s.add_dataset(sha256=SHA_A, id="d7"), "'id' is set by the store"),
        (lambda s: s.add_dataset(sha256="not-a-sha"), "sha256"),
        (lambda s: s.add_dataset(sha256=SHA_A, size_bytes="big"), "size_bytes"),
        (lambda s: s.add_dataset(sha256=SHA_A, report_json='{"a": 1}'), "report_json"),
        (lambda s: s.add_dataset(sha256=SHA_A, report_json={"x": object()}), "report_json"),
        (lambda s: s.update_run("r1", bogus=1), "'bogus'"),
        (lambda s: s.update_run("r1", updated_at=datetime.now(UTC)), "'updated_at'"),
        (lambda s: s.update_run("r1", status="runing"), "'runing'"),
        (lambda s: s.update_run("r1", expires_at=datetime(2027, 1, 1)), "timezone-aware"),
        (lambda s: s.add_run(dataset_id="d1", provider="local"), "model"),
        (lambda s: s.transition_run("r1", [], "approved"), "from_statuses"),
        (lambda s: s.transition_run("r1", "pending_approval", "aproved"), "'aproved'"),
        (lambda s: s.add_approval("r1", "U1", "maybe"), "'maybe'"),
        (lambda s: s.runs(limit=0), "limit"),
        (lambda s: s.mark_seen(""), "key"),
        (lambda s: s.prune_seen(timedelta(days=-1)), "older_than"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_problem(store: Store, call, message):
    make_run(store)
    with pytest.raises(ValueError, match=message):
        call(store)


# ------------------------------------------------------------ runs


def test_run_round_trip_and_update(store: Store, clock: Clock):
    expires = clock.now + timedelta(hours=24)
    run = make_run(
        store, plan_json={"epochs": 3}, plan_hash="h1", estimate_usd=1.5, expires_at=expires
    )
    assert run.status == "pending_approval"
    assert run.created_at == run.updated_at == clock.now
    assert run.expires_at == expires and run.plan_json == {"epochs": 3}
    clock.advance(minutes=5)
    updated = store.update_run("r1", card_ts="1.2", result_json={"loss": 0.1})
    assert updated.updated_at == clock.now and updated.created_at == run.created_at
    assert updated.result_json == {"loss": 0.1}
    assert store.get_run("r1") == updated


def test_runs_filters(store: Store, clock: Clock):
    make_run(store, channel="C1")
    clock.advance(seconds=1)
    make_run(store, channel="C2", status="queued")
    clock.advance(seconds=1)
    make_run(store, channel="C1", status="running")
    assert [r.id for r in store.runs()] == ["r3", "r2", "r1"]
    assert [r.id for r in store.runs(channel="C1")] == ["r3", "r1"]
    assert [r.id for r in store.runs(status="queued")] == ["r2"]
    assert [r.id for r in store.runs(status=["queued", "running"], limit=None)] == ["r3", "r2"]


def test_only_one_of_twenty_racing_transitions_wins(store: Store):
    make_run(store)

    def approve(_: int) -> bool:
        return store.transition_run("r1", ["pending_approval"], "approved", error=None)

    assert sorted(run_threads(20, approve)) == [False] * 19 + [True]
    assert store.get_run("r1").status == "approved"


def test_transition_run(store: Store, clock: Clock):
    make_run(store)
    clock.advance(minutes=1)
    assert store.transition_run("r1", "pending_approval", "queued", external_id="ftjob-1")
    run = store.get_run("r1")
    assert (run.status, run.external_id, run.updated_at) == ("queued", "ftjob-1", clock.now)
    assert not store.transition_run("r1", ["pending_approval"], "rejected")
    assert store.get_run("r1").status == "queued"
    with pytest.raises(NotFound, match="'r9'"):
        store.transition_run("r9", ["queued"], "running")


def test_transaction_is_all_or_nothing(store: Store):
    with pytest.raises(RuntimeError), store.transaction():
        store.add_dataset(sha256=SHA_A)
        store.audit("U1", "upload", dataset_id="d1")
        raise RuntimeError("boom")
    assert store.datasets() == [] and store.audit_log() == []
    assert store.add_dataset(sha256=SHA_A).id == "d1"  # the counter rolled back too

    with store.transaction():
        store.add_dataset(sha256=SHA_B)
        with pytest.raises(RuntimeError), store.transaction():
            store.add_dataset(sha256=SHA_B)
            raise RuntimeError("inner only")
    assert [d.id for d in store.datasets()] == ["d2", "d1"]


# ------------------------------------------------------------ events, approvals, evals, audit


def test_events_approvals_and_evals(store: Store):
    make_run(store)
    store.add_event("r1", "status", {"status": "queued"})
    store.add_event("r1", "metrics", {"step": 1, "loss": 2.5})
    assert [e.data_json for e in store.events("r1")] == [
        {"status": "queued"},
        {"step": 1, "loss": 2.5},
    ]
    assert [e.kind for e in store.events("r1", kind="metrics")] == ["metrics"]

    assert store.add_approval("r1", "U1", "approve", plan_hash="h1")
    assert not store.add_approval("r1", "U1", "approve", plan_hash="h1")
    assert store.add_approval("r1", "U1", "override_secret", reason="test data")
    assert store.add_approval("r1", "U2", "reject")
    assert [(a.user, a.decision) for a in store.approvals("r1")] == [
        ("U1", "approve"),
        ("U1", "override_secret"),
        ("U2", "reject"),
    ]

    added = store.add_eval(
        "r1", eval_dataset_id="d1", summary={"win": 3}, rows=[{"i": 0}], cost_usd=0.02
    )
    assert store.evals("r1") == [added]
    assert (added.summary_json, added.rows_json) == ({"win": 3}, [{"i": 0}])


def test_audit_is_append_only(store: Store):
    first = store.audit("U1", "approve", run_id="r1", plan_hash="h1", detail={"n": 1})
    store.audit("U2", "reject", dataset_id="d1")
    assert [a.action for a in store.audit_log()] == ["reject", "approve"]
    assert store.audit_log(run_id="r1") == [first]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM audit")
    # Also for anyone who opens the file without the Store.
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE id = 1")
    conn.close()
    assert store.audit_log(run_id="r1") == [first]


# ------------------------------------------------------------ seen


def test_mark_seen_is_true_once_across_threads_and_stores(store: Store):
    other = Store(store.path)
    stores = [store, other]
    results = run_threads(10, lambda i: stores[i % 2].mark_seen("Ev123"))
    other.close()
    assert sorted(results) == [False] * 9 + [True]


def test_prune_seen(store: Store, clock: Clock):
    store.mark_seen("old")
    clock.advance(hours=2)
    store.mark_seen("new")
    assert store.prune_seen(timedelta(hours=1)) == 1
    assert store.mark_seen("old")
    assert not store.mark_seen("new")


# ------------------------------------------------------------ blobs


def stray_files(root: Path) -> list[Path]:
    """Files under root that are not finished blobs."""
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not (p.parent.name == p.name[:2] and len(p.name) == 64)
    ]


def test_blob_round_trip_and_dedupe(tmp_path: Path):
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.put_bytes(b'{"messages": []}\n')
    assert blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert blobs.exists(sha)
    with blobs.open(sha) as f:
        assert f.read() == b'{"messages": []}\n'
    assert blobs.put_bytes(b'{"messages": []}\n') == sha
    source = tmp_path / "copy.jsonl"
    source.write_bytes(b'{"messages": []}\n')
    assert blobs.put_file(source) == sha
    assert len(list((tmp_path / "blobs").rglob("*"))) == 2  # one folder, one file
    assert stray_files(blobs.root) == []


def test_put_stream_hashes_in_chunks(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("storage.blobs.CHUNK_SIZE", 7)
    blobs = BlobStore(tmp_path)
    data = os.urandom(1000)
    sha, size = blobs.put_stream(io.BytesIO(data), max_bytes=1000)
    assert size == 1000
    assert blobs.path(sha).read_bytes() == data


def test_too_large_blob_leaves_nothing(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    with pytest.raises(BlobTooLarge, match="999") as raised:
        blobs.put_stream(io.BytesIO(b"x" * 1000), max_bytes=999)
    assert raised.value.max_bytes == 999
    assert list(tmp_path.iterdir()) == []


def test_failing_stream_leaves_nothing(tmp_path: Path):
    class Broken:
        def read(self, size: int = -1) -> bytes:
            raise OSError("connection reset")

    blobs = BlobStore(tmp_path)
    with pytest.raises(OSError, match="connection reset"):
        blobs.put_stream(Broken())
    with pytest.raises(ValueError, match="binary"):
        blobs.put_stream(io.StringIO("text"))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_puts_of_the_same_content(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    data = os.urandom(200_000)
    shas = run_threads(8, lambda _: blobs.put_bytes(data))
    assert len(set(shas)) == 1
    assert blobs.path(shas[0]).read_bytes() == data
    assert stray_files(tmp_path) == []


def test_blob_names_are_checked(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    for bad in ["../../etc/passwd", "A" * 64, "a" * 63, 42]:
        with pytest.raises(ValueError, match="sha256"):
            blobs.exists(bad)
    with pytest.raises(BlobNotFound, match=SHA_A) as raised:
        blobs.path(SHA_A)
    assert isinstance(raised.value, NotFound)
    with pytest.raises(BlobNotFound):
        blobs.open(SHA_A)


# ------------------------------------------------------------ home lock

# The holder loads lock.py alone: importing the storage package pulls in
# sqlite-utils, which would make each child several times slower to start.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
lock_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_module)
lock = lock_module.HomeLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def start_holder(home: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home), str(ROOT / "storage" / "lock.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if line != "locked\n":
        proc.kill()
        pytest.fail(f"holder did not start: {proc.communicate()[1]}")
    return proc


def test_second_lock_in_the_same_process_is_refused(tmp_path: Path):
    home = tmp_path / "home"
    with HomeLock(home) as first:
        assert first.held
        with pytest.raises(HomeLocked, match=f"pid {os.getpid()} ") as raised:
            HomeLock(home).acquire()
        assert raised.value.pid == os.getpid()
        assert "TUNEBOT_HOME" in str(raised.value)
        assert isinstance(raised.value, RuntimeError)
    with HomeLock(home) as again:
        assert again.held


def test_lock_held_by_another_process(tmp_path: Path):
    home = tmp_path / "home"
    proc = start_holder(home)
    try:
        with pytest.raises(HomeLocked, match=rf"pid {proc.pid} on host .*{home}"):
            HomeLock(home).acquire()
        proc.stdin.write("release\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.communicate()
    with HomeLock(home):
        pass


def test_lock_of_a_dead_process_is_free(tmp_path: Path):
    home = tmp_path / "home"
    proc = start_holder(home)
    proc.kill()
    proc.communicate()
    with HomeLock(home) as lock:
        assert lock.held
