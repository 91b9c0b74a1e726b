"""SQLite and content-addressed files under TUNEBOT_HOME. Knows nothing of Slack."""

from storage.blobs import BlobNotFound, BlobStore, BlobTooLarge
from storage.db import (
    DECISIONS,
    MIGRATIONS,
    RUN_STATUSES,
    Approval,
    AuditEntry,
    Dataset,
    Eval,
    NotFound,
    PendingWork,
    Run,
    RunEvent,
    SchemaTooNew,
    Store,
)
from storage.errors import StorageError
from storage.ledger import AlreadyReserved, Ledger, OverBudget, Reservation
from storage.lock import HomeLock, HomeLocked

__all__ = [
    "DECISIONS",
    "MIGRATIONS",
    "RUN_STATUSES",
    "AlreadyReserved",
    "Approval",
    "AuditEntry",
    "BlobNotFound",
    "BlobStore",
    "BlobTooLarge",
    "Dataset",
    "Eval",
    "HomeLock",
    "HomeLocked",
    "Ledger",
    "NotFound",
    "OverBudget",
    "PendingWork",
    "Reservation",
    "Run",
    "RunEvent",
    "SchemaTooNew",
    "StorageError",
    "Store",
]
