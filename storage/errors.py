"""The exceptions storage/ raises on purpose, under one base.

Catch `StorageError` for "the store refused"; each also keeps the built-in
base it always had (`except LookupError` still catches NotFound).

    StorageError
    ├── NotFound (LookupError)        storage.db: no row with that id
    │   └── BlobNotFound              storage.blobs: no blob with that sha256
    ├── SchemaTooNew (RuntimeError)   storage.db: migrated by a newer tunebot
    ├── BlobTooLarge (ValueError)     storage.blobs: content over the caller's limit
    ├── HomeLocked (RuntimeError)     storage.lock: another tunebot holds the home folder
    ├── OverBudget                    storage.ledger: a reservation past the month's budget
    └── AlreadyReserved               storage.ledger: that work is already reserved
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every exception storage/ raises on purpose."""
