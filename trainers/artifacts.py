"""Where a cluster runner keeps a run's files: an artifacts root, named by a path or URI.

A runner that trains elsewhere (a Ray cluster) stages the spec and the data
in a run folder under the root, the worker writes its progress, checkpoints
and adapter there, and the runner reads them back. Today the root is a
folder every node sees (a local path or a ``file://`` URI; on a real cluster
a shared mount). The runner only calls methods that fsspec's
``AbstractFileSystem`` has, with the same names and meanings (``cat_file``,
``pipe_file``, ``put_file``, ``exists``, ``makedirs``, ``rm_file``, ``get``), so an object store
later is an fsspec filesystem passed as ``fs`` plus a worker that syncs its
folder: no change in the runner.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse


class FileSystem(Protocol):
    """The part of fsspec's ``AbstractFileSystem`` a runner uses (paths without the scheme)."""

    def cat_file(self, path: str) -> bytes: ...

    def pipe_file(self, path: str, value: bytes) -> None: ...

    def put_file(self, lpath: str, rpath: str) -> None: ...

    def exists(self, path: str) -> bool: ...

    def makedirs(self, path: str, exist_ok: bool = False) -> None: ...

    def rm_file(self, path: str) -> None: ...

    def get(self, rpath: str, lpath: str, recursive: bool = False) -> None: ...


class LocalFileSystem:
    """fsspec's local filesystem, reduced to what a runner needs; writes are atomic."""

    protocol = "file"

    def cat_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def pipe_file(self, path: str, value: bytes) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(value)
            os.replace(tmp, target)  # a reader sees the old file or the new one, whole
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, lpath: str, rpath: str) -> None:
        target = Path(rpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            shutil.copyfile(lpath, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=True, exist_ok=exist_ok)

    def rm_file(self, path: str) -> None:
        Path(path).unlink()

    def get(self, rpath: str, lpath: str, recursive: bool = False) -> None:
        """Copy `rpath` to `lpath` (a folder with `recursive`, replacing `lpath`)."""
        source, target = Path(rpath), Path(lpath)
        if source.resolve() == target.resolve():
            return
        if not source.is_dir():
            self.put_file(rpath, lpath)
            return
        if not recursive:
            raise IsADirectoryError(rpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def resolve(root: str | os.PathLike[str]) -> tuple[FileSystem, str]:
    """(filesystem, root path without its scheme) for an artifacts root.

    A plain path or a ``file://`` URI is local. Any other scheme raises
    `ValueError`: give the runner an fsspec filesystem as ``fs`` for it.
    """
    text = os.fspath(root)
    if not text:
        raise ValueError("artifacts: an artifacts root is required (a folder or file:// URI)")
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme else text
        if parsed.scheme and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"artifacts: {text!r} names another host; use file:///path")
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        return LocalFileSystem(), path.rstrip("/") or "/"
    raise ValueError(
        f"artifacts: {parsed.scheme}:// roots need an fsspec filesystem passed as fs= "
        "(only local folders and file:// URIs are built in)"
    )


def uri(fs: FileSystem, path: str) -> str:
    """``file:///…`` for a local path; ``<protocol>://path`` otherwise."""
    protocol = getattr(fs, "protocol", "file")
    if isinstance(protocol, tuple | list):
        protocol = protocol[0]
    if protocol == "file":
        return Path(path).as_uri()
    return f"{protocol}://{path.lstrip('/')}"


def path_of(fs: FileSystem, where: str) -> str:
    """The inverse of `uri`: the path a `Handle.where` names on `fs`."""
    parsed = urlparse(where)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme:
        return f"{parsed.netloc}{parsed.path}"
    return where


def read_text(fs: FileSystem, path: str) -> str | None:
    """A file's text, or None when it is not there (yet)."""
    try:
        return fs.cat_file(path).decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
