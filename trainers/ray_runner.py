"""The Ray runner: the local LoRA worker as a Ray job, through Ray's Jobs API.

One run is one Ray job whose entrypoint is the worker the local runner starts
(``python -m trainers.lora <run folder>/spec.json``), so a run trains the
same way on a laptop, on a one-node cluster or on a GPU node of a big one.
The runner talks to the cluster's dashboard over HTTP
(`ray.job_submission.JobSubmissionClient`), never joins the cluster, and
imports ray inside its methods only.

The run folder is ``<artifacts root>/<submission id>``: the runner stages
``spec.json`` and the data there, the worker writes ``progress.jsonl``,
checkpoints, ``adapter/`` and ``result.json`` there, and `poll` reads them
back (parsed by `trainers.local`, the same code as a local run); where this
machine cannot read the folder, `poll` reads the worker's progress lines from
the tail of the job's log instead (`trainers.local.parse_log`). The root is
a folder every node of the cluster sees (a local path or ``file://`` URI;
a shared mount on a real cluster), or an S3 prefix (``s3://bucket/prefix``):
then the job's entrypoint is `trainers.artifact_sync`, which trains in a
scratch folder on its node and copies the files to and from the store, and
`poll`, `checkpoints` and `fetch` read the store (`trainers.artifacts`).

Idempotency: the Ray submission id is the run's idempotency key, made safe
for Ray (`submission_id`). Ray refuses a second job with an id it already
has, atomically, and keeps the first, so `submit` looks the id up first,
submits, and on any error looks it up again: a job that is there is adopted
(``Handle.reused``), never submitted twice, whatever its state: running a
failed run again takes a new key. Ray keeps jobs for the life of
the cluster (its GCS); a cluster started afresh has forgotten them, and a
run it forgot is reported failed (or what its ``result.json`` says).

Cancelling is Ray's ``stop_job``: SIGTERM to the worker and its children,
then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (Ray's default: 3 s). The
worker saves a checkpoint at its next optimizer step when it gets SIGTERM,
so the runner sets that wait to ``stop_grace_s`` for its jobs. A Ray Train
job's driver passes the stop on to its workers (`trainers.ray_train`).

The worker's environment: Ray starts the entrypoint with the environment of
the cluster's own processes (whoever ran ``ray start``), plus the job's
``runtime_env`` env vars: here `trainers.local.worker_env` of the bot's
environment (no tokens or keys), less the device lists, which Ray sets from
``num_gpus``; with an s3 root, plus the AWS variables the store needs
(`trainers.artifacts.STORE_ENV`: keys, region, endpoint) and no other.
Keep the bot's secrets out of the environment ``ray start`` runs in as well.

Ray's client reads the address from ``RAY_API_SERVER_ADDRESS`` or
``RAY_ADDRESS`` when either is set, over the ``address`` given here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from trainers import artifacts
from trainers.errors import StoreError
from trainers.local import (
    LOG_TAIL_LINES,
    PROGRESS,
    RESULT,
    SPEC,
    complete_checkpoints,
    parse_events,
    parse_log,
    parse_result,
    progress_fields,
    worker_env,
)
from trainers.runner import Handle, RunEvent, RunnerError, RunState, Step, TrainingSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_STOP_GRACE_S = 120
DEFAULT_SYNC_SECONDS = 5.0  # trainers.artifact_sync's upload period (s3 roots)
ID_PREFIX = "tunebot-"
ID_SLUG_CHARS = 60
# Job metadata (Ray keeps it with the job; `find` reads the run folder back from it).
META_KEY = "tunebot_key"
META_RUN = "tunebot_run"
META_DIR = "tunebot_run_dir"
META_MODEL = "tunebot_model"
# Hyperparameters the runner takes for Ray rather than passing to the worker: what the job
# reserves (one process), or with num_workers > 1 what each Ray Train worker gets
# (num_gpus per worker; spread: one worker per node).
RESOURCE_KEYS = ("num_cpus", "num_gpus", "num_workers", "spread")
# Set by Ray from num_gpus: the bot's own values must not override them.
_DEVICE_LISTS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# Progress events shown as RunEvents (steps are in `metrics`).
_EVENT_KINDS = ("start", "eval", "checkpoint")
_RESULT_STATUSES = ("succeeded", "cancelled", "failed")  # what result.json can say
_RAY_ENDED = ("SUCCEEDED", "STOPPED", "FAILED")
_OUTPUT_PATHS = ("adapter_dir", "merged_dir", "checkpoint")  # each inside the run folder
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A poll that reads the job's log reads at most this much of its end.
LOG_PROGRESS_LINES = 2000
LOG_READ_BYTES = 4 * 1024 * 1024
# A poll reads at most this much of the end of progress.jsonl (about 50,000 steps' records).
PROGRESS_READ_BYTES = 16 * 1024 * 1024
_STATUS_CODE = re.compile(r"status code (\d{3})")

RAY_STATUSES = {
    "PENDING": "queued",
    "RUNNING": "running",
    "STOPPED": "cancelled",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
}


def submission_id(key: str) -> str:
    """The Ray submission id for an idempotency key: readable, safe, one per key.

    Ray uses the id in URLs, actor names and a log file name, so only
    letters, digits, ``_``, ``.`` and ``-`` are kept; a hash of the whole key
    keeps two keys that read alike apart (``a:b`` and ``a-b``).
    """
    if not isinstance(key, str) or not key.strip():
        raise ValueError("key: an idempotency key is required")
    slug = _UNSAFE.sub("-", key).strip("-.")[:ID_SLUG_CHARS] or "run"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{ID_PREFIX}{slug}-{digest}"


class RayRunner:
    """Runs `trainers.lora` as Ray jobs on the cluster whose dashboard is at `address`.

    `artifacts`: the root of the run folders (a path or ``file://`` URI every
    node sees, or ``s3://bucket/prefix``). `fs`: an fsspec-shaped filesystem
    for another kind of root.
    `python`: the interpreter on the cluster's nodes that has tunebot's
    ``[local]`` extra (default: this one, right for a cluster on this
    machine). `ship_code`: send the `trainers` package with each job
    (``runtime_env.py_modules``), so the nodes need the dependencies but not
    tunebot itself. `env`: the environment `worker_env` filters (default
    ``os.environ``). `num_cpus` / `num_gpus`: what a job reserves unless
    its hyperparameters say otherwise. `stop_grace_s`: how long a cancelled
    worker has to save its checkpoint before Ray kills it.
    """

    name: ClassVar[str] = "ray"

    def __init__(
        self,
        address: str,
        artifacts_root: str | os.PathLike[str],
        *,
        fs: artifacts.FileSystem | None = None,
        python: str | None = None,
        ship_code: bool = True,
        env: Mapping[str, str] | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        stop_grace_s: int = DEFAULT_STOP_GRACE_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not address:
            raise ValueError("address: the Ray dashboard's address is required")
        _check_resources({"num_cpus": num_cpus, "num_gpus": num_gpus})
        if not isinstance(stop_grace_s, int) or stop_grace_s < 1:
            raise ValueError(f"stop_grace_s: a whole number of seconds >= 1, not {stop_grace_s!r}")
        if fs is None:
            fs, root = artifacts.resolve(artifacts_root)
        else:
            root = artifacts.path_of(fs, os.fspath(artifacts_root))
        self.address = address
        self.fs = fs
        self.root = root
        self.python = python or sys.executable
        self.ship_code = ship_code
        self.env = env
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.stop_grace_s = stop_grace_s
        # With an object store: how often the worker uploads its progress and checkpoints.
        self.sync_seconds = DEFAULT_SYNC_SECONDS
        self.headers = dict(headers) if headers else None
        self._client: Any = None
        self._client_lock = threading.Lock()

    # --- the Runner interface --------------------------------------------------------

    def submit(
        self,
        spec: TrainingSpec,
        key: str,
        *,
        step: Step | None = None,
        folder_key: str | None = None,
    ) -> Handle:
        """Submit `spec` as the job of `key`, or adopt the job `key` already has.

        `folder_key`: the key whose run folder the job uses (default `key`). A
        resumed run passes its first key here and a new `key` (Ray keeps a
        stopped job's id for good): the new job finds the checkpoints the
        stopped one saved and continues from the newest complete one.
        """
        sid = submission_id(key)
        run_dir = self.run_dir(submission_id(folder_key or key))
        worker_spec, resources = self._worker_spec(spec, run_dir)  # bad input: before any call
        found = self._handle(sid)
        if found is not None:
            return found
        where = artifacts.uri(self.fs, run_dir)
        worker_spec["resume"] = bool(self.checkpoints(where))
        self._stage(spec, run_dir, worker_spec)
        if step is not None:
            step("uploaded", where)
        client = self._connect()
        workers = resources["num_workers"]
        if workers > 1:  # Ray Train: the entrypoint only drives; the workers hold the resources
            command = [self.python, "-m", "trainers.ray_train", "--workers", str(workers),
                       "--gpus-per-worker", f"{resources['num_gpus']:g}"]  # fmt: skip
            command += ["--spread"] if resources["spread"] else []
            if not artifacts.is_local(self.fs):  # the workers share the driver's scratch folder
                command += ["--same-node"]
            num_cpus, num_gpus = 0, 0
        else:
            command = [self.python, "-m", "trainers.lora"]
            num_cpus, num_gpus = resources["num_cpus"], resources["num_gpus"]
        if artifacts.is_local(self.fs):
            command.append(f"{run_dir}/{SPEC}")
        else:  # an object store: the node trains in a scratch folder it syncs with the store
            spec_uri = artifacts.uri(self.fs, f"{run_dir}/{SPEC}")
            command = [self.python, "-m", "trainers.artifact_sync",
                       "--every", f"{self.sync_seconds:g}", spec_uri, "--", *command[1:]]  # fmt: skip
        try:
            client.submit_job(
                entrypoint=shlex.join(command),
                submission_id=sid,
                runtime_env=self._runtime_env(),
                entrypoint_num_cpus=num_cpus,
                entrypoint_num_gpus=num_gpus,
                metadata={
                    META_KEY: key,
                    META_RUN: spec.run_id,
                    META_DIR: where,
                    META_MODEL: spec.model,
                },
            )
        except Exception as exc:
            # Refused as a duplicate, or the answer was lost: the job may be there all the
            # same. Look before telling the caller anything.
            found = self._handle(sid)
            if found is not None:
                return found
            raise _runner_error(f"Ray refused job {sid}", exc) from exc
        if step is not None:
            step("created", sid)
        return Handle(runner=self.name, id=sid, where=where)

    def find(self, key: str) -> Handle | None:
        return self._handle(submission_id(key))

    def poll(self, handle: Handle, *, cursor: str | None = None) -> RunState:
        """Where the job is: Ray's status, and progress from the run folder's
        progress.jsonl / result.json; when this machine cannot read the run folder
        (not mounted here, missing, unreadable), from the worker's progress lines
        in the last ``LOG_PROGRESS_LINES`` lines of the job's log
        (`trainers.local.parse_log`); then ``output["unreachable"]`` is true: the
        folders it names cannot be fetched from here. A result.json that names an
        adapter, merged model or checkpoint outside the run's own folder (another
        bucket, ``file://`` on a store, ``..``) makes the run failed and its output
        names none of them. Raises `RunnerError` when Ray does not answer, and
        `StoreError` (retryable) when an object store does not answer once the job
        has ended (while it runs, the log stands in)."""
        info = self._info(handle.id)
        run_dir = (
            artifacts.path_of(self.fs, handle.where) if handle.where else self.run_dir(handle.id)
        )
        try:
            folder, blinked = self._read_folder(run_dir), None
        except StoreError as exc:  # the store may answer at the next poll
            folder, blinked = None, exc
        if blinked is not None and (info is None or str(info.status) in _RAY_ENDED):
            # Ended: its end comes from its files, never from the log, where its
            # adapter would count as out of reach and never be copied home.
            raise blinked
        if folder is not None:
            events = parse_events(folder[0] or "")
            result = parse_result(folder[1] or "")
            seen = _cursor(cursor)
            numbered = [(str(i), e) for i, e in enumerate(events)][seen:]
            next_cursor = str(max(seen, len(events)))
        else:  # the job's log is all there is from here
            run_id = ((info.metadata if info is not None else None) or {}).get(META_RUN)
            events, result = self._log_records(info, handle.id, run_id) if run_id else ([], None)
            after = _log_cursor(cursor)
            numbered = [(f"t{e['time']}", e) for e in events if (e.get("time") or 0) > after]
            times = [e["time"] for e in events if e.get("time") is not None]
            next_cursor = f"t{max([after, *times])}"
        common = progress_fields(events)
        state: dict[str, Any] = {
            "step": common["step"],
            "total_steps": common["total_steps"],
            "train_loss": common["train_loss"],
            "metrics": common["metrics"],
            "events": tuple(_run_events(numbered)),
            "cursor": next_cursor,
        }
        ray_status = str(info.status) if info is not None else None
        status = RAY_STATUSES.get(ray_status or "", "running")
        done = (result or {}).get("status")
        if info is None:
            # Ray forgot the job (a cluster started afresh): the files are all there is.
            status = done if done in _RESULT_STATUSES else "failed"
            if status == "failed":
                state["error"] = (result or {}).get("error") or (
                    f"the Ray cluster at {self.address} no longer knows job {handle.id} "
                    "(restarted?) and the run left no result"
                )
        elif ray_status == "SUCCEEDED":
            status = done if done in _RESULT_STATUSES else "failed"
            if status == "failed":
                state["error"] = (result or {}).get("error") or (
                    f"the worker exited without a result in {handle.where or run_dir}"
                )
                state["log_tail"] = self._log_tail(handle.id, info=info)
        elif ray_status == "STOPPED":
            status = "succeeded" if done == "succeeded" else "cancelled"
        elif ray_status == "FAILED":
            state["error"] = _failure(info.message, (result or {}).get("error"))
            state["log_tail"] = (result or {}).get("log_tail") or self._log_tail(
                handle.id, info=info
            )
        outside = [
            name
            for name in _OUTPUT_PATHS
            if folder is not None
            and isinstance((result or {}).get(name), str)
            and not artifacts.within(self.fs, result[name], run_dir)
        ]
        if outside:  # written by someone else: nothing outside the run's folder is fetched
            result = {k: v for k, v in result.items() if k not in _OUTPUT_PATHS}
            status = "failed"
            state["error"] = (
                f"the run's result.json names files outside its run folder ({outside[0]})"
            )
        if result is not None:
            state["output"] = _output(result, handle.where)
            if folder is None:  # its folders are on the cluster, out of this machine's reach
                state["output"]["unreachable"] = True
            total = (result.get("metrics") or {}).get("steps")
            if status == "succeeded" and total is not None:
                state["step"] = total
            if state["train_loss"] is None:
                state["train_loss"] = (result.get("metrics") or {}).get("train_loss")
        return RunState(status=status, **state)

    def cancel(self, handle: Handle) -> None:
        client = self._connect()
        try:
            client.stop_job(handle.id)  # False for a finished job: left as it is
        except Exception as exc:
            if _status_code(exc) == 404:
                raise RunnerError(f"Ray has no job {handle.id}") from exc
            raise _runner_error(f"Ray could not stop job {handle.id}", exc) from exc

    # --- the rest ----------------------------------------------------------------------

    def delete_file(self, file_id: str) -> bool:
        return False  # nothing goes to a provider: the run's files stay under the artifacts root

    def run_dir(self, sid: str) -> str:
        """The run folder of a submission id (a path on `fs`)."""
        return f"{self.root}/{sid}"

    def where(self, key: str) -> str:
        """The URI of the run folder `submit` uses for `key` (its ``Handle.where``)."""
        return artifacts.uri(self.fs, self.run_dir(submission_id(key)))

    def checkpoints(self, where: str) -> list[str]:
        """Names of the complete checkpoints in the run folder at `where`, oldest first
        (``checkpoint-<step>``); empty when there are none. Raises `RunnerError` when the
        artifacts store cannot be read."""
        path = artifacts.path_of(self.fs, where)
        if artifacts.is_local(self.fs):
            return [p.name for p in complete_checkpoints(Path(path))]
        try:
            return artifacts.complete_checkpoints(self.fs, path)
        except OSError as exc:
            raise StoreError(f"cannot list the checkpoints in {where}: {exc}", _kind(exc)) from exc

    def fetch(self, path: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy the folder `path` (on `fs`, e.g. ``RunState.output["adapter_dir"]``) to
        `local_dir` on this machine, replacing what was there; returns `local_dir`.
        Raises `RunnerError` when it cannot be read."""
        target = Path(local_dir)
        try:
            self.fs.get(artifacts.path_of(self.fs, path), str(target), recursive=True)
        except OSError as exc:
            raise RunnerError(f"cannot copy {path} from the artifacts: {exc}") from exc
        return target

    def resources(self, timeout: float = 10) -> dict[str, tuple[float, float]]:
        """{resource: (free, total)} across the cluster (``CPU``, ``GPU``, ...), from the
        dashboard's ``/api/cluster_status`` (the autoscaler's last report, refreshed
        every few seconds). Raises `RunnerError` when the cluster does not answer."""
        import json
        import urllib.request

        request = urllib.request.Request(
            f"{self.address.rstrip('/')}/api/cluster_status", headers=self.headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                body = json.load(resp)
        except (OSError, ValueError) as exc:
            raise RunnerError(
                f"no Ray cluster answers at {self.address}: {exc}", retryable=True
            ) from exc
        status = ((body.get("data") or {}).get("clusterStatus")) or {}
        usage = (status.get("loadMetricsReport") or {}).get("usage") or {}
        found = {}
        for name, pair in usage.items():
            if isinstance(pair, list | tuple) and len(pair) == 2 and not name.startswith("node:"):
                used, total = (float(x) for x in pair)
                found[name] = (max(0.0, total - used), total)
        return found

    def logs(self, handle: Handle) -> str:
        """Everything the job printed (Ray keeps it on the head node)."""
        client = self._connect()
        try:
            return client.get_job_logs(handle.id)
        except Exception as exc:
            raise _runner_error(f"Ray has no logs for job {handle.id}", exc) from exc

    def _connect(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    from ray.job_submission import JobSubmissionClient
                except ImportError as exc:
                    raise RunnerError(
                        "the Ray runner needs Ray's job client: pip install -e '.[ray]' in tunebot's folder"
                    ) from exc
                try:
                    self._client = JobSubmissionClient(self.address, headers=self.headers)
                except Exception as exc:
                    raise _runner_error(f"no Ray cluster answers at {self.address}", exc) from exc
            return self._client

    def _info(self, sid: str) -> Any:
        """Ray's JobDetails for `sid`, or None when Ray has no such job."""
        client = self._connect()
        try:
            return client.get_job_info(sid)
        except Exception as exc:
            if _status_code(exc) == 404:
                return None
            raise _runner_error(f"Ray did not answer for job {sid}", exc) from exc

    def _handle(self, sid: str) -> Handle | None:
        info = self._info(sid)
        if info is None:
            return None
        where = (info.metadata or {}).get(META_DIR) or artifacts.uri(self.fs, self.run_dir(sid))
        return Handle(runner=self.name, id=sid, reused=True, where=where)

    def _worker_spec(self, spec: TrainingSpec, run_dir: str) -> tuple[dict, dict]:
        """The worker's spec.json and the Ray resources, from the frozen `spec`."""
        from trainers.lora import LoraSpec  # light: the heavy imports are inside its functions

        params = {k: v for k, v in spec.hyperparameters.items() if v is not None}
        resources: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        for name in RESOURCE_KEYS:
            if name in params:
                resources[name] = params.pop(name)
        workers = resources.setdefault("num_workers", 1)
        spread = resources.setdefault("spread", False)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise RunnerError(f"num_workers: a whole number >= 1, not {workers!r}")
        if not isinstance(spread, bool):
            raise RunnerError(f"spread: true or false, not {spread!r}")
        if spread and not artifacts.is_local(self.fs):
            # The Ray Train workers share the driver's scratch folder: one node only.
            raise RunnerError(
                "spread: runs over several nodes need an artifacts folder every node sees, "
                f"not an {self.fs.protocol}:// store"
            )
        try:
            _check_resources({k: resources[k] for k in ("num_cpus", "num_gpus")})
        except ValueError as exc:
            raise RunnerError(str(exc)) from exc
        if "lr_mult" in params:
            raise RunnerError("lr_mult: the Ray runner trains LoRA locally; give lr instead")
        own = {"run_id", "model", "train_file", "eval_file", "output_dir"}
        knows = {f.name for f in fields(LoraSpec)} - own
        for name in params:
            if name not in knows:
                raise RunnerError(
                    f"{name}: the Ray runner does not know this hyperparameter "
                    f"(it knows {', '.join(sorted(knows | set(RESOURCE_KEYS)))})"
                )
        data = {
            "run_id": spec.run_id,
            "model": spec.model,
            "train_file": f"{run_dir}/data/train.jsonl",
            "eval_file": f"{run_dir}/data/eval.jsonl" if spec.eval_file else None,
            "output_dir": run_dir,
            **params,
        }
        try:
            LoraSpec.from_dict(data)
        except ValueError as exc:
            raise RunnerError(str(exc)) from exc
        return data, resources

    def _stage(self, spec: TrainingSpec, run_dir: str, worker_spec: dict) -> None:
        """The spec and the data in the run folder (each write whole, so a repeat is harmless)."""
        import json

        try:
            if self.fs.exists(f"{run_dir}/{RESULT}"):
                self.fs.rm_file(f"{run_dir}/{RESULT}")  # a resumed run writes a new one
            self.fs.makedirs(f"{run_dir}/data", exist_ok=True)
            self.fs.put_file(str(spec.train_file), worker_spec["train_file"])
            if spec.eval_file:
                self.fs.put_file(str(spec.eval_file), worker_spec["eval_file"])
            self.fs.pipe_file(f"{run_dir}/{SPEC}", json.dumps(worker_spec, indent=2).encode())
        except OSError as exc:
            # A store that does not answer may answer later; a local folder's error stays.
            if artifacts.is_local(self.fs):
                raise RunnerError(f"cannot stage run {spec.run_id} in {run_dir}: {exc}") from exc
            where = artifacts.uri(self.fs, run_dir)
            raise StoreError(
                f"cannot stage run {spec.run_id} in {where}: {exc}", _kind(exc)
            ) from exc

    def _runtime_env(self) -> dict:
        source = os.environ if self.env is None else self.env
        env_vars = worker_env(source)
        for name in _DEVICE_LISTS:
            env_vars.pop(name, None)
        env_vars.update(artifacts.store_env(self.fs, source))  # an s3 root: the AWS_* it needs
        env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(self.stop_grace_s)  # read by Ray's supervisor
        env_vars.setdefault("PYTHONUNBUFFERED", "1")
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if self.ship_code:
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
            runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        return runtime_env

    def _log_tail(self, sid: str, lines: int = LOG_TAIL_LINES, info: Any = None) -> str | None:
        text = self._tail(sid, lines, info)
        return "\n".join(text.splitlines()[-lines:]) or None if text else None

    def _tail(self, sid: str, lines: int, info: Any = None) -> str | None:
        """The last `lines` lines of the job's log (at most ``LOG_READ_BYTES``), from the
        dashboard's log API (``/api/v0/logs/file?node_id=…&filename=job-driver-<id>.log
        &lines=…``, the driver's node from `info`, Ray's JobDetails): the cluster cuts
        the tail, so a log of many MB never comes whole. None when the dashboard does
        not give it (or the job has no driver yet). Ray 2.60 answers 500 for the
        ``submission_id=`` form of the same query, hence the node and file name."""
        import urllib.parse
        import urllib.request

        if info is None:
            try:
                info = self._info(sid)
            except RunnerError:
                return None
        node = getattr(info, "driver_node_id", None)
        if not node:
            return None
        query = urllib.parse.urlencode(
            {"node_id": node, "filename": f"job-driver-{sid}.log", "lines": lines}
        )
        request = urllib.request.Request(
            f"{self.address.rstrip('/')}/api/v0/logs/file?{query}", headers=self.headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw = resp.read(LOG_READ_BYTES + 1)
        except (OSError, ValueError):
            return None
        if len(raw) > LOG_READ_BYTES:  # keep whole lines from the end
            raw = raw[-LOG_READ_BYTES:].split(b"\n", 1)[-1]
        return raw.decode("utf-8", errors="replace")

    def _log_records(self, info: Any, sid: str, run_id: str) -> tuple[list[dict], dict | None]:
        """(progress events, result) from the progress lines in the job log's tail."""
        return parse_log(self._tail(sid, LOG_PROGRESS_LINES, info) or "", run_id)

    def _read_folder(self, run_dir: str) -> tuple[str | None, str | None] | None:
        """(progress.jsonl, result.json) texts (None: not there yet), or None when the run
        folder cannot be read from this machine. Raises `StoreError` when an object store
        does not answer (or refuses): that may pass."""
        try:
            if not self.fs.exists(run_dir):
                return None
            return (
                artifacts.read_tail(self.fs, f"{run_dir}/{PROGRESS}", PROGRESS_READ_BYTES),
                artifacts.read_text(self.fs, f"{run_dir}/{RESULT}"),
            )
        except OSError as exc:
            if artifacts.is_local(self.fs):
                return None
            where = artifacts.uri(self.fs, run_dir)
            raise StoreError(f"cannot read {where}: {exc}", _kind(exc)) from exc


def _check_resources(resources: Mapping[str, Any]) -> None:
    for name, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name}: a number >= 0, not {value!r}")


def _kind(exc: BaseException) -> str:
    """The store error's class name (botocore's, under `artifacts.ObjectStore`'s OSError)."""
    cause = exc.__cause__ if type(exc) is OSError and exc.__cause__ is not None else exc
    return type(cause).__name__


def _status_code(exc: BaseException) -> int | None:
    """The HTTP status in a Ray client error ("Request failed with status code 404: …")."""
    match = _STATUS_CODE.search(str(exc))
    return int(match.group(1)) if match else None


def _runner_error(what: str, exc: BaseException) -> RunnerError:
    code = _status_code(exc)
    # Connection refused / reset (requests' errors are OSErrors), timeouts, 5xx: try again.
    retryable = isinstance(exc, OSError | TimeoutError) or (code is not None and code >= 500)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RunnerError(f"{what}: {detail[:300]}", retryable=retryable)


def _failure(message: str | None, worker_error: str | None) -> str:
    """One line: the worker's error when it wrote one, and what Ray says."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    first = re.sub(r",? *last available logs.*$", "", first).strip()
    if worker_error and first:
        return f"{worker_error} ({first})"
    return worker_error or first or "the Ray job failed"


def _output(result: Mapping[str, Any], where: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": where} if where else {}
    for name in (*_OUTPUT_PATHS, "metrics"):
        if result.get(name) is not None:
            out[name] = result[name]
    return out


def _log_cursor(cursor: str | None) -> float:
    """The time of the newest event a log-read poll returned (cursor ``t<time>``)."""
    try:
        return float(cursor[1:]) if cursor and cursor.startswith("t") else 0.0
    except ValueError:
        return 0.0


def _cursor(cursor: str | None) -> int:
    try:
        return max(0, int(cursor)) if cursor else 0
    except ValueError:
        return 0


def _run_events(events: list[tuple[str, dict]]) -> list[RunEvent]:
    found = []
    for event_id, event in events:
        kind = event.get("event")
        if kind not in _EVENT_KINDS:
            continue
        if kind == "start":
            message = f"training started: {event.get('max_steps')} steps"
            if event.get("resumed_from"):
                message += f", resumed from {Path(str(event['resumed_from'])).name}"
        elif kind == "eval":
            message = f"eval loss {event.get('eval_loss')} at step {event.get('step')}"
        else:
            message = f"checkpoint saved at step {event.get('step')}"
        created = event.get("time")
        found.append(
            RunEvent(
                id=event_id,
                created_at=int(created) if isinstance(created, int | float) else int(time.time()),
                message=message,
            )
        )
    return found
