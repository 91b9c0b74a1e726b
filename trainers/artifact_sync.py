"""The worker on a node without the run folder: train in a scratch folder, sync with the store.

``python -m trainers.artifact_sync [--every S] <run folder URI>/spec.json -- -m MODULE [ARG...]``
is the entrypoint `trainers.ray_runner.RayRunner` gives a Ray job when the
artifacts root is an object store (``s3://bucket/prefix``). On the node that
runs the job it:

1. copies ``spec.json`` and the data the spec names from the run folder to a
   scratch folder (``TMPDIR``), with ``progress.jsonl`` (a resumed run
   appends to it) and, when the spec says ``resume``, the newest complete
   checkpoint;
2. runs ``python -m MODULE [ARG...] <scratch>/spec.json`` (``trainers.lora``,
   or ``trainers.ray_train --workers N``), the spec's paths rewritten to the
   scratch folder, and passes SIGTERM / SIGINT on to it (a cancel: it saves a
   checkpoint and stops);
3. every `--every` seconds (default 5) while it trains, and once more when
   it has ended, uploads ``progress.jsonl`` (up to its last whole line) when
   it grew, and each checkpoint once the worker has logged it saved
   (``checkpoint`` event), its ``trainer_state.json`` last, so a checkpoint on
   the store is complete once that file is there; a checkpoint the worker's
   rotation deleted is deleted from the store too;
4. at the end uploads ``adapter/`` (and ``merged/``), then ``result.json``
   with those paths as URIs on the store, last: a runner that sees it sees
   everything.

The store's endpoint and keys come from the job's environment (the AWS
variables of `trainers.artifacts.STORE_ENV`); the training command runs
without them. An upload that fails while training is retried at the next
sync and said on stderr (the job's log); one that still fails at the end
makes the exit status 1. Otherwise the exit status is the training
command's; 2 for bad arguments. The scratch folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainers import artifacts
from trainers.local import PROGRESS, RESULT, SPEC, complete_checkpoints

DEFAULT_EVERY_S = 5.0
OUTPUT_FOLDERS = ("adapter_dir", "merged_dir")  # what result.json names, uploaded at the end
FINAL_TRIES = 3


def _say(message: str) -> None:
    print(f"artifact_sync: {message}", file=sys.stderr, flush=True)


class Sync:
    """The run folder `remote` on `fs` and its scratch copy `local` on this node."""

    def __init__(self, fs: artifacts.FileSystem, remote: str, local: Path) -> None:
        self.fs = fs
        self.remote = remote.rstrip("/")
        self.local = local
        self.sent_progress = 0  # bytes of progress.jsonl on the store
        self.on_store: set[str] = set()  # checkpoints this sync put there (or brought down)

    def local_of(self, path: str) -> Path:
        """Where a file the spec names (a path on the store) lies in the scratch folder."""
        if path.startswith(self.remote + "/"):
            return self.local / path[len(self.remote) + 1 :]
        return self.local / "data" / Path(path).name

    def pull(self) -> Path:
        """Spec, data, progress so far and (resume) the newest complete checkpoint, brought
        down; the spec rewritten for the scratch folder. Returns the local spec's path."""
        spec: dict[str, Any] = json.loads(self.fs.cat_file(f"{self.remote}/{SPEC}"))
        for name in ("train_file", "eval_file"):
            if spec.get(name):
                target = self.local_of(spec[name])
                self.fs.get(spec[name], str(target))
                spec[name] = str(target)
        spec["output_dir"] = str(self.local)
        progress = self.local / PROGRESS
        try:
            self.fs.get(f"{self.remote}/{PROGRESS}", str(progress))
            self.sent_progress = progress.stat().st_size
        except FileNotFoundError:
            pass
        if spec.get("resume"):
            names = artifacts.complete_checkpoints(self.fs, self.remote)
            if names:
                self.fs.get(
                    f"{self.remote}/checkpoints/{names[-1]}",
                    str(self.local / "checkpoints" / names[-1]),
                    recursive=True,
                )
                self.on_store.update(names)
        path = self.local / SPEC
        path.write_text(json.dumps(spec, indent=2))
        return path

    def push_progress(self) -> None:
        """progress.jsonl up to its last whole line, when it grew."""
        try:
            data = (self.local / PROGRESS).read_bytes()
        except FileNotFoundError:
            return
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) > self.sent_progress:
            self.fs.pipe_file(f"{self.remote}/{PROGRESS}", whole)
            self.sent_progress = len(whole)

    def push_checkpoints(self) -> None:
        """Each checkpoint the worker has logged saved, once; the rotated-out ones removed."""
        saved = set()
        try:
            lines = (self.local / PROGRESS).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "checkpoint":
                saved.add(f"checkpoint-{event.get('step')}")
        here = {p.name: p for p in complete_checkpoints(self.local)}
        for name in sorted(saved & here.keys() - self.on_store, key=_step):
            self._put_folder(
                here[name], f"{self.remote}/checkpoints/{name}", last="trainer_state.json"
            )
            self.on_store.add(name)
        newest = max(here, key=_step, default=None)
        if newest is None or newest not in self.on_store:
            return  # nothing is removed before a newer checkpoint is on the store
        for name in sorted(self.on_store - here.keys()):
            if _step(name) < _step(newest):
                self.fs.rm(f"{self.remote}/checkpoints/{name}", recursive=True)
                self.on_store.discard(name)

    def push_result(self) -> bool:
        """The outputs result.json names, then result.json itself (paths as store URIs).
        False when the worker left no result."""
        try:
            result = json.loads((self.local / RESULT).read_text())
        except (FileNotFoundError, ValueError):
            return False
        for name in OUTPUT_FOLDERS:
            if result.get(name):
                folder = Path(result[name])
                remote = f"{self.remote}/{folder.name}"
                self._put_folder(folder, remote)
                result[name] = artifacts.uri(self.fs, remote)
        if result.get("checkpoint"):
            name = Path(result["checkpoint"]).name
            result["checkpoint"] = artifacts.uri(self.fs, f"{self.remote}/checkpoints/{name}")
        self.fs.pipe_file(f"{self.remote}/{RESULT}", json.dumps(result, indent=2).encode())
        return True

    def sync(self) -> None:
        self.push_progress()
        self.push_checkpoints()

    def _put_folder(self, folder: Path, remote: str, last: str | None = None) -> None:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)  # stable: `last` goes last
        for path in files:
            self.fs.put_file(str(path), f"{remote}/{path.relative_to(folder).as_posix()}")


def _step(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _child_env() -> dict[str, str]:
    """This job's environment without the store's keys: the trainer needs none of them."""
    return {k: v for k, v in os.environ.items() if k not in artifacts.STORE_ENV}


def run(spec_uri: str, command: Sequence[str], every: float) -> int:
    """Steps 1 to 4 of the module's docstring; the exit status."""
    if not spec_uri.endswith(f"/{SPEC}"):
        _say(f"the first argument is the run folder's {SPEC} on the store, not {spec_uri!r}")
        return 2
    try:
        fs, spec_path = artifacts.resolve(spec_uri)
    except ValueError as exc:
        _say(str(exc))
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="tunebot-run-"))
    sync = Sync(fs, spec_path.rsplit("/", 1)[0], scratch)
    try:
        started = time.monotonic()
        try:
            local_spec = sync.pull()
        except (OSError, ValueError) as exc:
            _say(f"cannot copy the run from {artifacts.uri(fs, sync.remote)}: {exc}")
            return 1
        _say(f"run copied from the store in {time.monotonic() - started:.1f} s")
        return _train(sync, [sys.executable, *command, str(local_spec)], every)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(sync: Sync, argv: list[str], every: float) -> int:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=_child_env())

    def forward(signum: int, frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    failing: str | None = None
    while True:
        try:
            code = proc.wait(timeout=every)
            break
        except subprocess.TimeoutExpired:
            pass
        try:
            sync.sync()
            failing = None
        except OSError as exc:
            if str(exc) != failing:  # once per new error, not every few seconds
                _say(f"upload failed, retrying: {exc}")
            failing = str(exc)
    ended = time.monotonic()
    for attempt in range(FINAL_TRIES):
        try:
            sync.sync()
            if not sync.push_result():
                _say("the training command left no result.json")
            _say(f"run uploaded to the store in {time.monotonic() - ended:.1f} s")
            return code
        except OSError as exc:
            _say(f"upload failed ({attempt + 1} of {FINAL_TRIES}): {exc}")
            time.sleep(min(every, 5.0))
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print(__doc__.split("\n\n", 2)[1], file=sys.stderr)
        return 2
    cut = args.index("--")
    parser = argparse.ArgumentParser(prog="python -m trainers.artifact_sync")
    parser.add_argument(
        "--every", type=float, default=DEFAULT_EVERY_S, help="seconds between syncs"
    )
    parser.add_argument("spec_uri", help="the run folder's spec.json on the store")
    try:
        ns = parser.parse_args(args[:cut])
    except SystemExit as exc:
        return 2 if exc.code else 0
    if not args[cut + 1 :] or ns.every <= 0:
        print("give the training command after -- and --every > 0", file=sys.stderr)
        return 2
    return run(ns.spec_uri, args[cut + 1 :], ns.every)


if __name__ == "__main__":
    sys.exit(main())
