"""The spend ledger: every dollar tunebot may spend is reserved before it is spent.

One row per paid piece of work (a training run, an evaluation, a chat). It is
*reserved* at its estimate when asked for, so work waiting for approval and
work in flight count against the month's budget; it is *settled* at what was
actually spent when the work ends, whatever way it ends, which releases the
rest. Committed spend for a month is one SQL aggregate:

    open rows count      max(estimate, actual so far), in every month until settled
    settled rows count   actual, in the month they were settled

so a run requested on the 30th and trained on the 1st counts in the month it
runs.

A reservation is made in the same transaction as the budget check, so ten
requests racing for the last dollars cannot all pass. At most one open
reservation exists per (kind, ref): a second evaluation of a run while one is
going is refused by the database, not by luck.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from storage.errors import StorageError

if TYPE_CHECKING:
    from storage.db import Store

KINDS = ("run", "eval", "chat")


class OverBudget(StorageError):
    """The reservation would take the month past its budget. `left_usd` is what remains."""

    def __init__(self, usd: float, left_usd: float, budget_usd: float) -> None:
        super().__init__(
            f"${usd:,.2f} is more than the ${max(left_usd, 0):,.2f} left "
            f"of this month's ${budget_usd:,.2f} budget"
        )
        self.usd = usd
        self.left_usd = max(left_usd, 0.0)
        self.budget_usd = budget_usd


class AlreadyReserved(StorageError):
    """An open reservation for the same (kind, ref) exists: that work is already going."""


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    kind: str
    ref: str
    run_id: str | None
    channel: str | None
    user: str | None
    estimate_usd: float
    actual_usd: float | None
    status: str  # reserved | settled
    note: str | None
    created_at: datetime
    settled_at: datetime | None


def _reservation(row: dict) -> Reservation:
    values = dict(row)
    for name in ("created_at", "settled_at"):
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return Reservation(**values)


_COMMITTED = """
SELECT COALESCE(SUM(CASE WHEN status = 'reserved'
                         THEN MAX(estimate_usd, COALESCE(actual_usd, 0))
                         ELSE COALESCE(actual_usd, 0) END), 0)
FROM spend WHERE (status = 'reserved' OR COALESCE(settled_at, created_at) >= ?)
  AND id != ? AND (? IS NULL OR channel = ?)
"""


# The runs in a final state.
_ENDED = (
    "(SELECT id FROM runs WHERE status IN"
    " ('succeeded', 'failed', 'cancelled', 'rejected', 'expired'))"
)


class Ledger:
    """The spend ledger in `store`'s database. Thread-safe as the store is."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def committed(
        self, since: datetime, *, besides: int | None = None, channel: str | None = None
    ) -> float:
        """USD committed since `since` (reserved at estimate, settled at actual), in one
        query; only `channel`'s when given, all but reservation `besides` when given."""
        args = [_iso_utc(since), besides or -1, channel, channel]
        row = self.store.db.execute(_COMMITTED, args).fetchone()
        return float(row[0])

    def reserve(
        self,
        kind: str,
        ref: str,
        usd: float,
        *,
        since: datetime,
        budget_usd: float | None,
        run_id: str | None = None,
        channel: str | None = None,
        user: str | None = None,
    ) -> Reservation:
        """Reserve `usd` for (kind, ref), checking the budget in the same transaction.

        Raises OverBudget (nothing is written) when committed spend since
        `since` plus `usd` exceeds `budget_usd` (None: no budget), and
        AlreadyReserved when (kind, ref) has an open reservation.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown spend kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(usd, int | float) or not usd >= 0 or usd == float("inf"):
            raise ValueError(f"usd must be a finite number >= 0, not {usd!r}")
        with self.store.transaction() as db:
            if db.execute(
                "SELECT 1 FROM spend WHERE kind = ? AND ref = ? AND status = 'reserved'",
                [kind, ref],
            ).fetchone():
                raise AlreadyReserved(f"{kind} {ref} is already reserved")
            if budget_usd is not None:
                args = [_iso_utc(since), -1, None, None]
                committed = float(db.execute(_COMMITTED, args).fetchone()[0])
                if committed + usd > budget_usd + 1e-9:
                    raise OverBudget(usd, budget_usd - committed, budget_usd)
            cursor = db.execute(
                "INSERT INTO spend (kind, ref, run_id, channel, user, estimate_usd, status,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, 'reserved', ?) RETURNING *",
                [kind, ref, run_id, channel, user, float(usd), self.store._now()],
            )
            keys = [c[0] for c in cursor.description]
            return _reservation(dict(zip(keys, cursor.fetchone(), strict=True)))

    def open(self, kind: str, ref: str) -> Reservation | None:
        """The open reservation for (kind, ref), if any."""
        rows = list(
            self.store.db.query(
                "SELECT * FROM spend WHERE kind = ? AND ref = ? AND status = 'reserved'",
                [kind, ref],
            )
        )
        return _reservation(rows[0]) if rows else None

    def get(self, id: int) -> Reservation:
        rows = list(self.store.db.query("SELECT * FROM spend WHERE id = ?", [id]))
        if not rows:
            from storage.db import NotFound

            raise NotFound(f"no reservation {id!r}")
        return _reservation(rows[0])

    def record(self, id: int, actual_usd: float) -> None:
        """Note what an open reservation has spent so far (survives a crash)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE spend SET actual_usd = ? WHERE id = ? AND status = 'reserved'",
                [float(actual_usd), id],
            )

    def settle(self, id: int, actual_usd: float | None = None, *, note: str | None = None) -> bool:
        """Close a reservation at what was spent (None: what `record` last noted, else 0).

        True when this call closed it; settling twice changes nothing.
        """
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE spend SET status = 'settled', settled_at = ?, note = ?,"
                " actual_usd = COALESCE(?, actual_usd, 0) WHERE id = ? AND status = 'reserved'",
                [self.store._now(), note, actual_usd, id],
            )
            return cursor.rowcount == 1

    def settle_open(
        self, kind: str, ref: str, actual_usd: float | None = None, *, note=None
    ) -> bool:
        found = self.open(kind, ref)
        return found is not None and self.settle(found.id, actual_usd, note=note)

    def has_row(self, kind: str, ref: str) -> bool:
        """Whether (kind, ref) was ever reserved, open or settled."""
        found = self.store.db.execute(
            "SELECT 1 FROM spend WHERE kind = ? AND ref = ? LIMIT 1", [kind, ref]
        ).fetchone()
        return found is not None

    def settle_ended_runs(self) -> int:
        """Close the open rows of runs that have ended (a crash between the run's last
        state and its settlement): at the run's recorded actual cost. Returns how many.

        Called at every poll, so it reads first and takes the write lock only
        when there is something to settle.
        """
        if not self.store.db.execute(
            f"SELECT 1 FROM spend WHERE kind = 'run' AND status = 'reserved' AND ref IN {_ENDED} LIMIT 1"
        ).fetchone():
            return 0
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE spend SET status = 'settled', settled_at = ?, note = 'ended run',"
                " actual_usd = MAX(COALESCE(actual_usd, 0), COALESCE((SELECT actual_usd FROM runs"
                " WHERE runs.id = spend.ref), 0))"
                f" WHERE kind = 'run' AND status = 'reserved' AND ref IN {_ENDED}",
                [self.store._now()],
            )
            return cursor.rowcount

    def raise_actual(self, kind: str, ref: str, actual_usd: float) -> bool:
        """Raise the newest settled row of (kind, ref) to `actual_usd` if it is below: work
        that went on after its row was closed (its lease lapsed) still counts in full."""
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE spend SET actual_usd = ? WHERE id = (SELECT MAX(id) FROM spend"
                " WHERE kind = ? AND ref = ?) AND status = 'settled' AND COALESCE(actual_usd, 0) < ?",
                [float(actual_usd), kind, ref, float(actual_usd)],
            )
            return cursor.rowcount == 1

    def entries(self, since: datetime) -> list[Reservation]:
        """This period's rows, oldest first."""
        rows = self.store.db.query(
            "SELECT * FROM spend WHERE created_at >= ? ORDER BY id", [_iso_utc(since)]
        )
        return [_reservation(r) for r in rows]

    def open_entries(self, kind: str | None = None) -> list[Reservation]:
        sql, args = "SELECT * FROM spend WHERE status = 'reserved'", []
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        return [_reservation(r) for r in self.store.db.query(sql + " ORDER BY id", args)]


def _iso_utc(value: datetime) -> str:
    from storage.db import _iso

    return _iso(value, "since")
