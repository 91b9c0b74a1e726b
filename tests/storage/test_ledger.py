"""The spend ledger, claims and the installation id, on a real SQLite file."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from storage import AlreadyReserved, Ledger, OverBudget, Store
from storage.db import _SCHEMA_1

MONTH = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with Store.in_home(tmp_path, clock=clock) as s:
        yield s


def sha(n: int) -> str:
    return f"{n:064x}"


def test_reserve_counts_open_at_estimate_and_settled_at_actual(store):
    ledger = Ledger(store)
    first = ledger.reserve("run", "r1", 3.0, since=MONTH, budget_usd=10.0)
    ledger.reserve("eval", "r1", 2.0, since=MONTH, budget_usd=10.0)
    assert ledger.committed(MONTH) == 5.0
    ledger.record(first.id, 4.5)  # spent more than estimated so far: counts the larger
    assert ledger.committed(MONTH) == 6.5
    assert ledger.settle(first.id, 1.25) and not ledger.settle(first.id, 9.0)
    assert ledger.committed(MONTH) == 3.25
    assert ledger.committed(MONTH, besides=first.id) == 2.0
    # Next month: the open evaluation still counts until settled; r1, settled now, does not.
    assert ledger.committed(dt.datetime(2026, 12, 1, tzinfo=dt.UTC)) == 2.0


def test_over_budget_writes_nothing_and_says_what_is_left(store):
    ledger = Ledger(store)
    ledger.reserve("run", "r1", 7.0, since=MONTH, budget_usd=10.0)
    with pytest.raises(OverBudget) as caught:
        ledger.reserve("run", "r2", 3.5, since=MONTH, budget_usd=10.0)
    assert caught.value.left_usd == 3.0 and "$3.00 left" in str(caught.value)
    assert [e.ref for e in ledger.entries(MONTH)] == ["r1"]


def test_one_open_reservation_per_kind_and_ref(store):
    ledger = Ledger(store)
    entry = ledger.reserve("eval", "r1", 0.0, since=MONTH, budget_usd=None)
    with pytest.raises(AlreadyReserved):
        ledger.reserve("eval", "r1", 0.0, since=MONTH, budget_usd=None)
    ledger.settle(entry.id, 0.0)
    ledger.reserve("eval", "r1", 0.0, since=MONTH, budget_usd=None)  # the next one may go


@pytest.mark.parametrize("usd", [-1.0, float("nan"), float("inf")])
def test_bad_amounts_are_value_errors(store, usd):
    with pytest.raises(ValueError, match="finite number"):
        Ledger(store).reserve("run", "r1", usd, since=MONTH, budget_usd=None)


def test_racing_reservations_never_overshoot(tmp_path, clock):
    """Ten threads, each with its own connection, race for a budget that fits seven."""
    with Store.in_home(tmp_path, clock=clock) as store:
        ledger = Ledger(store)
        barrier = threading.Barrier(10)

        def one(i: int) -> bool:
            barrier.wait()
            try:
                ledger.reserve("run", f"r{i}", 1.0, since=MONTH, budget_usd=7.5)
            except OverBudget:
                return False
            return True

        with ThreadPoolExecutor(10) as pool:
            won = list(pool.map(one, range(10)))
        assert sum(won) == 7 and ledger.committed(MONTH) == 7.0


def add_run(store: Store) -> str:
    dataset = store.add_dataset(sha256=sha(1), name="a.jsonl", channel="C1")
    return store.add_run(dataset_id=dataset.id, provider="openai", model="m", status="approved").id


def test_a_claim_has_one_owner_until_its_lease_lapses(store, clock):
    run_id = add_run(store)
    lease = dt.timedelta(seconds=30)
    assert store.claim_run(run_id, ["approved"], "submitting", owner="a", lease=lease)
    assert not store.claim_run(run_id, ["submitting"], "submitting", owner="b", lease=lease)
    assert store.renew_claim(run_id, "a", lease, status="submitting")
    assert not store.renew_claim(run_id, "b", lease)
    clock.now += dt.timedelta(seconds=31)  # a died: its lease lapses
    assert store.claim_run(run_id, ["submitting"], "submitting", owner="b", lease=lease)
    assert not store.renew_claim(run_id, "a", lease)  # a notices it lost the claim
    assert not store.release_claim(run_id, "a", from_status="submitting", to_status="running")
    assert store.release_claim(run_id, "b", from_status="submitting", to_status="running")
    run = store.get_run(run_id)
    assert run.status == "running" and run.owner is None and run.lease_expires_at is None


def test_release_does_not_undo_a_cancel(store):
    run_id = add_run(store)
    store.claim_run(run_id, ["approved"], "submitting", owner="a", lease=dt.timedelta(seconds=5))
    assert store.transition_run(run_id, ["submitting"], "cancelled")
    assert not store.release_claim(run_id, "a", from_status="submitting", to_status="running")
    assert store.get_run(run_id).status == "cancelled"


def test_a_back_off_keeps_everyone_out_until_it_ends(store, clock):
    run_id = add_run(store)
    lease = dt.timedelta(seconds=5)
    store.claim_run(run_id, ["approved"], "submitting", owner="a", lease=lease)
    store.release_claim(
        run_id, "a", from_status="submitting", retry_at=clock.now + dt.timedelta(seconds=60)
    )
    assert not store.claim_run(run_id, ["submitting"], "submitting", owner="a", lease=lease)
    clock.now += dt.timedelta(seconds=61)
    assert store.claim_run(run_id, ["submitting"], "submitting", owner="b", lease=lease)


def test_the_installation_id_is_made_once_and_kept(tmp_path):
    with Store.in_home(tmp_path) as first:
        made = first.installation_id
    with Store.in_home(tmp_path) as again:
        assert again.installation_id == made and made.startswith("tb")
    with Store.in_home(tmp_path / "other") as other:
        assert other.installation_id != made


def test_an_old_database_gets_its_ledger_from_its_runs(tmp_path):
    """A file written before the ledger: open reservations for waiting runs, actuals for ended."""
    path = tmp_path / "tunebot.db"
    conn = sqlite3.connect(path)
    for statement in _SCHEMA_1.split(";\n\n"):
        if statement.strip():
            conn.executescript(statement + ";")
    now = "2026-11-20T10:00:00.000000+00:00"
    conn.execute("INSERT INTO datasets (id, sha256, created_at) VALUES ('d1', ?, ?)", [sha(1), now])
    for run_id, status, estimate, actual in (
        ("r1", "pending_approval", 2.0, None),
        ("r2", "succeeded", 3.0, 2.5),
        ("r3", "rejected", 4.0, None),
    ):
        conn.execute(
            "INSERT INTO runs (id, dataset_id, provider, model, status, estimate_usd, actual_usd,"
            " created_at, updated_at) VALUES (?, 'd1', 'openai', 'm', ?, ?, ?, ?, ?)",
            [run_id, status, estimate, actual, now, now],
        )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store(path) as store:
        ledger = Ledger(store)
        assert {(e.ref, e.status) for e in ledger.entries(MONTH)} == {
            ("r1", "reserved"),
            ("r2", "settled"),
        }
        assert ledger.committed(MONTH) == 4.5


def test_work_counts_in_the_month_it_is_settled(store, clock):
    ledger = Ledger(store)
    entry = ledger.reserve("run", "r1", 3.0, since=MONTH, budget_usd=None)  # 30 November
    december = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert ledger.committed(december) == 3.0  # still open: December sees it
    clock.now = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    ledger.settle(entry.id, 2.5)
    assert ledger.committed(december) == 2.5 and ledger.committed(MONTH) == 2.5


def test_ended_runs_left_open_by_a_crash_are_settled_at_their_actual(store):
    ledger = Ledger(store)
    run_id = add_run(store)
    ledger.reserve("run", run_id, 3.0, since=MONTH, budget_usd=None)
    assert ledger.settle_ended_runs() == 0  # still approved: stays open
    store.transition_run(run_id, ["approved"], "succeeded", actual_usd=1.75)
    assert ledger.settle_ended_runs() == 1 and ledger.committed(MONTH) == 1.75
    assert ledger.open("run", run_id) is None
