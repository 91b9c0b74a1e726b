"""Content-addressed files: datasets, adapters, reports, charts.

A blob lives at ``root/<sha[:2]>/<sha>``, named by the sha256 of its bytes, so
storing the same bytes twice costs nothing and a name always means the same
content. Writes go to a temporary file under `root` that is renamed into
place only once complete and on disk: a reader sees a whole blob or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from storage.db import NotFound
from storage.errors import StorageError

CHUNK_SIZE = 1024 * 1024

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobNotFound(NotFound):
    """No blob with that sha256."""


class BlobTooLarge(StorageError, ValueError):
    """The content is longer than the caller's limit."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"blob is larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def _check_sha(sha: object) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha!r}")
    return sha


class BlobStore:
    """Files under `root`, named by the sha256 of their content."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<BlobStore {self.root}>"

    def _target(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; returns its sha256."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"put_bytes takes bytes, not {type(data).__name__}")
        return self.put_stream(io.BytesIO(data))[0]

    def put_file(self, path: str | Path) -> str:
        """Store a copy of the file at `path`; returns its sha256."""
        with open(path, "rb") as source:
            return self.put_stream(source)[0]

    def put_stream(self, fileobj: _Readable, *, max_bytes: int | None = None) -> tuple[str, int]:
        """Store what `fileobj.read()` yields, a chunk at a time; returns
        (sha256, size). Raises BlobTooLarge, storing nothing, once more than
        `max_bytes` have been read: a download can be cut short without
        first landing whole on disk."""
        if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative int or None, not {max_bytes!r}")
        # The temporary file sits under root, on the same file system as the
        # blob's final place, so that os.replace is an atomic rename.
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".put-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(CHUNK_SIZE):
                    if not isinstance(chunk, bytes | bytearray):
                        raise ValueError(
                            f"put_stream needs a binary file; read() gave {type(chunk).__name__}"
                        )
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            target = self._target(sha)
            if target.exists():
                # Same name, same bytes: keep the copy that is already there.
                tmp.unlink()
            else:
                target.parent.mkdir(exist_ok=True)
                # Two writers of the same content may both get here; either
                # rename leaves the same whole file in place.
                os.replace(tmp, target)
                _fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return sha, size

    def path(self, sha: str) -> Path:
        """Where blob `sha` is; raises BlobNotFound when it is absent."""
        target = self._target(_check_sha(sha))
        if not target.is_file():
            raise BlobNotFound(f"no blob {sha} in {self.root}")
        return target

    def delete(self, sha: str) -> bool:
        """Remove a blob; False when it was not there. Other references are the caller's concern."""
        try:
            self._target(_check_sha(sha)).unlink()
        except FileNotFoundError:
            return False
        return True

    def exists(self, sha: str) -> bool:
        return self._target(_check_sha(sha)).is_file()

    def open(self, sha: str) -> BinaryIO:
        """Blob `sha` opened for reading in binary mode."""
        return open(self.path(sha), "rb")


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its folder is on disk too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
