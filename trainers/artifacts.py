"""Where a cluster runner keeps a run's files: an artifacts root, named by a path or URI.

A runner that trains elsewhere (a Ray cluster) stages the spec and the data
in a run folder under the root, the worker writes its progress, checkpoints
and adapter there, and the runner reads them back. The root is either

- a folder every node sees (a local path or a ``file://`` URI; on a real
  cluster a shared mount): `LocalFileSystem`; or
- an S3 prefix, ``s3://bucket/prefix`` (the ``[s3]`` extra: fsspec's s3fs),
  on AWS or any S3-compatible store: `ObjectStore`. The worker then trains in
  a scratch folder of its node and `trainers.artifact_sync` copies the files
  up and down. Endpoint and credentials come from the standard AWS variables
  (`STORE_ENV`), never from the URI.

The runner only calls methods that fsspec's ``AbstractFileSystem`` has, with
the same names and meanings (``cat_file``, ``pipe_file``, ``put_file``,
``exists``, ``makedirs``, ``rm_file``, ``rm``, ``find``, ``get``).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse


class FileSystem(Protocol):
    """The part of fsspec's ``AbstractFileSystem`` a runner uses (paths without the scheme)."""

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes: ...

    def pipe_file(self, path: str, value: bytes) -> None: ...

    def put_file(self, lpath: str, rpath: str) -> None: ...

    def exists(self, path: str) -> bool: ...

    def makedirs(self, path: str, exist_ok: bool = False) -> None: ...

    def rm_file(self, path: str) -> None: ...

    def get(self, rpath: str, lpath: str, recursive: bool = False) -> None: ...

    def find(self, path: str) -> list[str]: ...

    def rm(self, path: str, recursive: bool = False) -> None: ...


# What a worker needs to reach an S3 store, as botocore (1.43) reads them: keys and a session
# token, the region (AWS_DEFAULT_REGION: botocore does not read AWS_REGION), the endpoint of an
# S3-compatible store (AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL) and a CA bundle for it.
STORE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)
_URL = re.compile(r"""[:\s]*["']?\b[a-z][a-z0-9+.-]*://[^\s"']*["']?""", re.I)
S3_EXTRA = "pip install -e '.[s3]' in tunebot's folder"
# A checkpoint a run can resume from has its trainer state and its adapter weights.
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class LocalFileSystem:
    """fsspec's local filesystem, reduced to what a runner needs; writes are atomic."""

    protocol = "file"

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes, or those from `start` (from the end when < 0) up to `end`."""
        with open(path, "rb") as fh:
            if start is not None and start < 0:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) + start))
            elif start:
                fh.seek(start)
            return fh.read() if end is None else fh.read(max(0, end - fh.tell()))

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

    def find(self, path: str) -> list[str]:
        """Every file under `path`, sorted; [] when there is none."""
        folder = Path(path)
        if folder.is_file():
            return [str(folder)]
        return sorted(str(p) for p in folder.rglob("*") if p.is_file())

    def rm(self, path: str, recursive: bool = False) -> None:
        target = Path(path)
        if target.is_dir() and recursive:
            shutil.rmtree(target)
        else:
            target.unlink()


class ObjectStore:
    """An fsspec object-store filesystem (s3fs) with `LocalFileSystem`'s meanings.

    A PUT is whole, so `pipe_file` and `put_file` are atomic as they are;
    `get` of a folder replaces `lpath` the way the local one does (fsspec's
    own ``get`` copies into an existing folder); `makedirs` does nothing (an
    object store has no folders). Errors are OSErrors: a missing object is
    `FileNotFoundError`, an unreachable store or a refused request another
    OSError with the store's message.
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.fs, method)(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # botocore's connection and endpoint errors are not OSErrors
            # Without the URL botocore puts in (the endpoint, the bucket, a query).
            text = _URL.sub("", str(exc)).strip()
            raise OSError(f"{self.protocol} store: {type(exc).__name__}: {text}") from exc

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._call("cat_file", path, start=start, end=end)

    def pipe_file(self, path: str, value: bytes) -> None:
        self._call("pipe_file", path, value)

    def put_file(self, lpath: str, rpath: str) -> None:
        self._call("put_file", lpath, rpath)

    def exists(self, path: str) -> bool:
        return bool(self._call("exists", path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        return None

    def rm_file(self, path: str) -> None:
        self._call("rm_file", path)

    def rm(self, path: str, recursive: bool = False) -> None:
        self._call("rm", path, recursive=recursive)

    def find(self, path: str) -> list[str]:
        return sorted(self._call("find", path.rstrip("/")))

    def get(self, rpath: str, lpath: str, recursive: bool = False) -> None:
        """Copy the object `rpath` to the file `lpath`, or with `recursive` every object
        under the folder `rpath` into the folder `lpath` (replacing it). Raises
        `FileNotFoundError` when there is nothing at `rpath`."""
        target = Path(lpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = rpath.rstrip("/")
        files = [f for f in self.find(prefix) if f.startswith(prefix + "/")] if recursive else []
        if not files:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            os.close(fd)
            try:
                self._call("get_file", prefix, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            for name in files:
                local = folder / name[len(prefix) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                self._call("get_file", name, str(local))
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(folder, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def resolve(root: str | os.PathLike[str]) -> tuple[FileSystem, str]:
    """(filesystem, root path without its scheme) for an artifacts root.

    A plain path or a ``file://`` URI is local; ``s3://bucket/prefix`` is that
    prefix on S3 or an S3-compatible store (`ObjectStore` over s3fs, which
    reads `STORE_ENV` from the environment). Raises `ValueError` (one
    sentence, never repeating a secret) for a URI with credentials, a query
    or a fragment, an s3 URI without a bucket or without s3fs installed, and
    any other scheme.
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
    if parsed.scheme == "s3":
        return _s3(parsed)
    raise ValueError(
        f"artifacts: {parsed.scheme}:// is not supported; give a folder, a file:/// URI "
        "or an s3://bucket/prefix"
    )


def _s3(parsed: Any) -> tuple[ObjectStore, str]:
    if "@" in parsed.netloc or parsed.query or parsed.fragment or parsed.params:
        # Never echo it: the part before @ is a key, the query may be a signature.
        raise ValueError(
            "artifacts: an s3:// root is s3://bucket/prefix alone, without credentials, a query "
            "or a fragment; give the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    bucket = parsed.netloc
    if not bucket or ":" in bucket:
        raise ValueError("artifacts: an s3:// root names its bucket: s3://bucket/prefix")
    try:
        import s3fs
    except ImportError:
        raise ValueError(f"artifacts: s3:// roots need the [s3] extra: {S3_EXTRA}") from None
    # Its own instance (fsspec caches them by arguments, not by the environment they read),
    # and no listings cache: a poll must see what a worker wrote a second ago.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    path = f"{bucket}/{unquote(parsed.path).strip('/')}".rstrip("/")
    return ObjectStore(fs, "s3"), path


def is_local(fs: FileSystem) -> bool:
    """Whether `fs` is this machine's disk (a worker can train in the run folder itself)."""
    return isinstance(fs, LocalFileSystem)


def store_env(fs: FileSystem, source: Mapping[str, str]) -> dict[str, str]:
    """The variables of `source` a worker needs to reach `fs`: the `STORE_ENV` ones that are
    set, for an s3 store; nothing for a local root. Never anything else (no bot token)."""
    if getattr(fs, "protocol", "file") != "s3":
        return {}
    return {name: source[name] for name in STORE_ENV if source.get(name)}


def complete_checkpoints(fs: FileSystem, run_dir: str) -> list[str]:
    """Names (``checkpoint-<step>``) of the checkpoints under ``<run_dir>/checkpoints`` a run
    can resume from, oldest first: those with their trainer state and adapter weights (the
    test of `trainers.local.complete_checkpoints`, here on any filesystem)."""
    base = f"{run_dir.rstrip('/')}/checkpoints/"
    names: dict[str, set[str]] = {}
    for path in fs.find(base.rstrip("/")):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint-"):
            names.setdefault(parts[0], set()).add(parts[1])
    found = []
    for name, files in names.items():
        if CHECKPOINT_STATE in files and any(w in files for w in CHECKPOINT_WEIGHTS):
            try:
                found.append((int(name.rsplit("-", 1)[1]), name))
            except ValueError:
                continue
    return [name for _, name in sorted(found)]


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


def within(fs: FileSystem, where: str, folder: str) -> bool:
    """Whether `where` (a path or URI, as a result.json names it) lies inside `folder` (a
    path on `fs`): the same scheme as `fs` (or none), and once ``..`` is resolved, under
    ``folder/``. A relative path, another bucket or host, or ``file://`` on an object
    store is not."""
    parsed = urlparse(where)
    protocol = getattr(fs, "protocol", "file")
    if parsed.scheme and parsed.scheme != protocol:
        return False
    path = posixpath.normpath(path_of(fs, where))
    base = posixpath.normpath(folder)
    if is_local(fs) and not posixpath.isabs(path):
        return False
    return path.startswith(base.rstrip("/") + "/")


def read_tail(fs: FileSystem, path: str, limit: int) -> str | None:
    """The last `limit` bytes at most of a text file, from its first whole line in them
    (one ranged read: a file of any size costs `limit`); None when it is not there."""
    try:
        data = fs.cat_file(path, start=-(limit + 1))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(data) > limit:  # longer than the limit: its first line in the window is cut
        data = data[-limit:].split(b"\n", 1)[-1]
    return data.decode("utf-8", errors="replace")


def read_text(fs: FileSystem, path: str) -> str | None:
    """A file's text, or None when it is not there (yet)."""
    try:
        return fs.cat_file(path).decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
