"""Launching and following the local LoRA worker (`python -m trainers.lora`).

The worker is its own process group, writing `progress.jsonl` and, at the
end, `result.json` in the run's folder. Everything the bot knows about a
local run comes from those files and from whether the process still lives,
so a restarted bot re-attaches by reading the same files. `LocalRunner` is
this as a Runner (trainers.runner): one folder per run under `runs_dir`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from trainers.runner import Handle, RunState, Step, TrainingSpec

PROGRESS = "progress.jsonl"
RESULT = "result.json"
LOG = "worker.log"
PIDFILE = "worker.pid"
SPEC = "spec.json"
LOG_TAIL_LINES = 40
# A progress record on the worker's stdout: ``tunebot-progress <run id> <JSON object>``, the
# object one line of progress.jsonl, or ``{"event": "result", ...result.json}`` at the end.
# A runner that cannot read the run folder follows the run from these lines in the job's log.
LOG_MARK = "tunebot-progress"
LOG_LINE_CHARS = 65_536  # a longer line is no record of ours
# Ray may put its worker's name before a line, in colour: "\x1b[36m(RayTrainWorker pid=1)\x1b[0m ".
_LOG_LINE = re.compile(
    r"^(?:\x1b\[[0-9;]{0,20}m|\([^()\n]{0,200}\)| ){0,8}tunebot-progress (\S{1,200}) (\{.*\})\s*$"
)
_LOG_KINDS = ("start", "step", "eval", "checkpoint", "result")
_RESULT_STATUSES = ("succeeded", "cancelled", "failed")


@dataclass(frozen=True)
class Worker:
    pid: int
    started: str  # the kernel's start time of that pid: guards against pid reuse

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "started": self.started})

    @classmethod
    def from_json(cls, text: str) -> Worker:
        data = json.loads(text)
        return cls(int(data["pid"]), str(data["started"]))


@dataclass(frozen=True)
class LocalState:
    status: str  # running, succeeded, failed, cancelled
    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    eta_seconds: float | None = None
    tokens_per_second: float | None = None
    metrics: tuple[tuple[int, float], ...] = ()
    eval_losses: tuple[tuple[int, float], ...] = ()
    error: str | None = None
    log_tail: str | None = None
    result: dict = field(default_factory=dict)


def command(
    spec_path: Path, *, processes: int = 1, accelerate_config: str | None = None
) -> list[str]:
    """The worker's command line: plain Python, or accelerate for several processes."""
    if processes <= 1 and not accelerate_config:
        return [sys.executable, "-m", "trainers.lora", str(spec_path)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:
        # Without GPUs, --multi_gpu still starts N gloo ranks on the CPU.
        cmd += ["--multi_gpu", "--num_processes", str(processes)]
    return [*cmd, "-m", "trainers.lora", str(spec_path)]


def launch(
    run_dir: Path,
    spec: dict,
    *,
    processes: int = 1,
    accelerate_config: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Worker:
    """Write the spec and start the worker in its own session (so a signal reaches all ranks).

    The worker gets `worker_env(env)`: `env` (default `os.environ`) reduced to
    what Python, torch and the worker need; the bot's tokens and keys stay out.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / SPEC
    spec_path.write_text(json.dumps(spec, indent=2))
    (run_dir / RESULT).unlink(missing_ok=True)  # a resumed run writes a new one
    with open(run_dir / LOG, "ab") as log:
        proc = subprocess.Popen(
            command(spec_path, processes=processes, accelerate_config=accelerate_config),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=worker_env(os.environ if env is None else env),
            cwd=_project_root(),
        )
    worker = Worker(proc.pid, _start_time(proc.pid) or "")
    (run_dir / PIDFILE).write_text(worker.to_json())
    _reap_later(proc)
    return worker


# What the worker may inherit: names, and prefixes that carry no secrets.
WORKER_ENV_NAMES = frozenset(
    {
        # the system and Python
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
        "TMPDIR", "TEMP", "TMP", "XDG_CACHE_HOME", "LD_LIBRARY_PATH",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
        "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONWARNINGS", "PYTHONFAULTHANDLER",
        "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
        # Hugging Face caches and offline switches (never HF_TOKEN: the bot fetches models)
        "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_ENABLE_HF_TRANSFER",
        "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
        "TOKENIZERS_PARALLELISM", "TORCH_HOME",
        # threads and devices
        "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
    }
)  # fmt: skip
WORKER_ENV_PREFIXES = (
    "LC_", "CUDA_", "NCCL_", "NVIDIA_", "MKL_", "OPENBLAS_", "OMP_", "KMP_", "GOMP_",
    "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "ACCELERATE_", "BNB_", "DS_",
)  # fmt: skip
# Never passed, even under an allowed prefix: a name containing any of these
# (TORCH_HUB_TOKENS, DS_SECRETKEY, ACCELERATE_HUBTOKEN as much as TORCH_X_TOKEN).
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSW", "KEY", "CREDENTIAL", "AUTH")
_NOT_SECRETS = frozenset({"NCCL_IB_PKEY"})  # InfiniBand's partition key: a number, not a secret


def worker_env(source: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: only what Python, torch and the trainer need.

    Kept by name: PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, TZ, TERM, TMPDIR,
    TEMP, TMP, XDG_CACHE_HOME, LD_LIBRARY_PATH, SSL_CERT_FILE, SSL_CERT_DIR,
    REQUESTS_CA_BUNDLE; PYTHONPATH, PYTHONHOME, PYTHONUNBUFFERED,
    PYTHONDONTWRITEBYTECODE, PYTHONHASHSEED, PYTHONIOENCODING, PYTHONWARNINGS,
    PYTHONFAULTHANDLER, VIRTUAL_ENV, CONDA_PREFIX, CONDA_DEFAULT_ENV; HF_HOME,
    HF_HUB_CACHE, HF_DATASETS_CACHE, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
    HF_HUB_DISABLE_TELEMETRY, HF_HUB_DISABLE_PROGRESS_BARS,
    HF_DATASETS_DISABLE_PROGRESS_BARS, HF_HUB_ENABLE_HF_TRANSFER,
    TRANSFORMERS_CACHE, TRANSFORMERS_OFFLINE, TRANSFORMERS_VERBOSITY,
    TOKENIZERS_PARALLELISM, TORCH_HOME; OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES,
    HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES.

    Kept by prefix: LC_*, CUDA_*, NCCL_*, NVIDIA_*, MKL_*, OPENBLAS_*, OMP_*,
    KMP_*, GOMP_*, PYTORCH_*, TORCH_*, TORCHINDUCTOR_*, TRITON_*, ACCELERATE_*,
    BNB_* (bitsandbytes), DS_* (DeepSpeed).

    Everything else stays out: SLACK_BOT_TOKEN, SLACK_APP_TOKEN,
    SLACK_SIGNING_SECRET, OPENAI_API_KEY, HF_TOKEN, TUNEBOT_*, proxies (their
    URLs can hold passwords; the worker needs no network, the bot fetches the
    model first), cloud credentials. A prefixed name containing TOKEN, SECRET,
    PASSW, KEY, CREDENTIAL or AUTH anywhere (TORCH_X_TOKEN, DS_SECRETKEY,
    ACCELERATE_HUBTOKEN) is dropped even under an allowed prefix.
    """
    return {
        name: value
        for name, value in source.items()
        if name in WORKER_ENV_NAMES
        or (
            name.startswith(WORKER_ENV_PREFIXES)
            and (name in _NOT_SECRETS or not any(w in name.upper() for w in _SECRET_WORDS))
        )
    }


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _reap_later(proc: subprocess.Popen) -> None:
    """Collect the child's exit status when it ends, so it never lingers as a zombie."""
    import threading

    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has finished
        return None
    return fields[19]  # starttime, field 22 of the full line


def worker_of(run_dir: Path) -> Worker | None:
    try:
        return Worker.from_json((run_dir / PIDFILE).read_text())
    except (OSError, ValueError, KeyError):
        return None


def alive(worker: Worker | None) -> bool:
    if worker is None:
        return False
    started = _start_time(worker.pid)
    return started is not None and (not worker.started or started == worker.started)


def stop(worker: Worker | None) -> bool:
    """Ask the worker to save a checkpoint and stop. False when it was not running."""
    if not alive(worker):
        return False
    try:
        os.killpg(worker.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = (run_dir / LOG).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def read_state(run_dir: Path, worker: Worker | None = None) -> LocalState:
    """Where the run is, from its files; a worker gone without a result has died."""
    common = progress_fields(_events(run_dir / PROGRESS))
    result = _result(run_dir)
    if result is not None:
        return state_from_result(result, common)
    if worker is not None and not alive(worker):
        return LocalState(
            status="failed",
            error="the training worker stopped without a result (killed, or out of memory)",
            log_tail=log_tail(run_dir),
            **common,
        )
    return LocalState(status="running", **common)


def progress_fields(events: Iterable[dict]) -> dict:
    """What `progress.jsonl`'s events say, as `LocalState` fields (every backend reads them so).

    Keyed by step: a resumed run logs again the steps after its checkpoint.
    """
    steps: dict[int, float] = {}
    evals: dict[int, float] = {}
    last: dict = {}
    total = None
    for event in events:
        kind = event.get("event")
        if kind == "start":
            total = event.get("max_steps") or total
        elif kind == "step":
            last = event
            total = event.get("max_steps") or total
            if event.get("loss") is not None:
                steps[int(event["step"])] = float(event["loss"])
        elif kind == "eval" and event.get("eval_loss") is not None:
            evals[int(event.get("step", 0))] = float(event["eval_loss"])
    return {
        "step": last.get("step"),
        "total_steps": total,
        "train_loss": last.get("loss"),
        "eta_seconds": last.get("eta_seconds"),
        "tokens_per_second": last.get("tokens_per_second"),
        "metrics": tuple(sorted(steps.items())),
        "eval_losses": tuple(sorted(evals.items())),
    }


def state_from_result(result: dict, common: dict) -> LocalState:
    """The state `result.json` gives (with `progress_fields`' `common`)."""
    return LocalState(
        status=result.get("status", "failed"),
        error=result.get("error"),
        log_tail=result.get("log_tail"),
        result=result,
        **common,
    )


def parse_events(text: str) -> list[dict]:
    """`progress.jsonl`'s events; a line that is not JSON yet (being written) is skipped."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(event, dict):
            events.append(event)
    return events


def parse_result(text: str) -> dict | None:
    """`result.json`'s object, or None while it is missing or not whole."""
    try:
        result = json.loads(text)
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def log_line(run_id: str, record: Mapping) -> str:
    """The stdout line of one progress record (``LOG_MARK``, the run id, the JSON object)."""
    return f"{LOG_MARK} {run_id} {json.dumps(record, separators=(',', ':'))}"


def parse_log(text: str, run_id: str) -> tuple[list[dict], dict | None]:
    """(progress events, the result or None) from the lines of a job's log that are
    progress records of run `run_id` (`log_line`), oldest first.

    Strict: every other line is skipped, and so is a line that looks like a record
    but names another run, is longer than ``LOG_LINE_CHARS``, is not one JSON
    object, has an unknown ``event``, or has a field of the wrong type (a step
    that is not a whole number >= 0, a loss or time that is not a finite
    number, a result whose status is not succeeded/cancelled/failed). A line
    Ray prefixes with its worker's name (``(RayTrainWorker pid=1) ``) counts.
    The result is the last valid one, and only when no record of the run follows
    it (the worker prints its own result last); it only says how the run ended
    once the job has ended (the caller's rule: a line cannot end a running job).
    """
    events: list[dict] = []
    result = None
    for line in text.splitlines():
        if LOG_MARK not in line or len(line) > LOG_LINE_CHARS:
            continue
        match = _LOG_LINE.match(line)
        if match is None or match.group(1) != run_id:
            continue
        try:
            record = json.loads(match.group(2))
        except ValueError:
            continue
        if not isinstance(record, dict) or not _valid_record(record):
            continue
        if record["event"] == "result":
            result = {k: v for k, v in record.items() if k != "event"}
        else:
            events.append(record)
            result = None  # the worker prints its result last: one the run went on after is none
    return events, result


def _valid_record(record: dict) -> bool:
    kind = record.get("event")
    if kind not in _LOG_KINDS:
        return False
    if kind == "result":
        metrics = record.get("metrics")
        return (
            record.get("status") in _RESULT_STATUSES
            and all(_is(record.get(k), str) for k in ("adapter_dir", "merged_dir", "checkpoint"))
            and all(_is(record.get(k), str) for k in ("error", "log_tail"))
            and (metrics is None or (isinstance(metrics, dict) and all(
                _is_number(v) for v in metrics.values())))
        )  # fmt: skip
    numbers = ("time", "loss", "eval_loss", "learning_rate", "grad_norm", "epoch",
               "eta_seconds", "tokens_per_second")  # fmt: skip
    counts = ("step", "max_steps")
    return (
        all(_is_number(record.get(k)) for k in numbers)
        and all(record.get(k) is None or _is_count(record[k]) for k in counts)
        and (kind not in ("step", "eval", "checkpoint") or _is_count(record.get("step")))
    )


def _is(value: object, kind: type) -> bool:
    return value is None or isinstance(value, kind)


def _is_number(value: object) -> bool:
    """None, or a finite int or float (not a bool)."""
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _events(path: Path) -> list[dict]:
    try:
        raw = path.read_text(errors="replace")
    except OSError:
        return []
    return parse_events(raw)


def _result(run_dir: Path) -> dict | None:
    try:
        return parse_result((run_dir / RESULT).read_text())
    except OSError:
        return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints a run can resume from, oldest first; a half-written one is skipped."""
    found = []
    for path in (run_dir / "checkpoints").glob("checkpoint-*"):
        weights = any((path / name).exists() for name in _ADAPTER_FILES)
        if (path / "trainer_state.json").is_file() and weights:
            try:
                found.append((int(path.name.rsplit("-", 1)[1]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


_ADAPTER_FILES: Sequence[str] = ("adapter_model.safetensors", "adapter_model.bin")


class LocalRunner:
    """The worker on this machine as a Runner: `runs_dir / <run id>` holds each run.

    The key's last part (after the last ``:``) is the run id: keys are
    ``"<installation id>:<run id>"``. The spec's `hyperparameters` are the
    worker's spec fields (trainers.lora); `output_dir` defaults to the run's
    folder. A run with complete checkpoints resumes from the newest.
    """

    name: ClassVar[str] = "local"

    def __init__(
        self,
        runs_dir: Path,
        *,
        processes: int = 1,
        accelerate_config: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.processes = processes
        self.accelerate_config = accelerate_config
        self.env = env

    def run_dir(self, key: str) -> Path:
        return self.runs_dir / key.rsplit(":", 1)[-1]

    def find(self, key: str) -> Handle | None:
        """The key's worker while it runs (a finished one is not found: resume starts anew)."""
        run_dir = self.run_dir(key)
        worker = worker_of(run_dir)
        if not alive(worker):
            return None
        return Handle(
            self.name, f"pid:{worker.pid}", reused=True, where=str(run_dir), status="running"
        )

    def submit(self, spec: TrainingSpec, key: str, *, step: Step | None = None) -> Handle:
        found = self.find(key)
        if found is not None:
            return found
        run_dir = Path(spec.output_dir) if spec.output_dir else self.run_dir(key)
        worker_spec = {
            "run_id": spec.run_id,
            "model": spec.model,
            "train_file": str(spec.train_file),
            "eval_file": str(spec.eval_file) if spec.eval_file else None,
            "output_dir": str(run_dir),
            **spec.hyperparameters,
            "resume": bool(complete_checkpoints(run_dir)),
        }
        if step is not None:
            step("launching", str(run_dir))
        worker = launch(
            run_dir,
            worker_spec,
            processes=self.processes,
            accelerate_config=self.accelerate_config,
            env=self.env,
        )
        return Handle(self.name, f"pid:{worker.pid}", where=str(run_dir), status="running")

    def poll(self, handle: Handle, *, cursor: str | None = None) -> RunState:
        run_dir = _folder(handle)
        state = read_state(run_dir, worker_of(run_dir))
        return RunState(
            status=state.status,
            step=state.step,
            total_steps=state.total_steps,
            train_loss=state.train_loss,
            metrics=state.metrics,
            error=state.error,
            output=state.result,
            log_tail=state.log_tail,
            eta_seconds=state.eta_seconds,
            tokens_per_second=state.tokens_per_second,
        )

    def cancel(self, handle: Handle) -> None:
        """SIGTERM to the worker's group: it saves a checkpoint and stops."""
        stop(worker_of(_folder(handle)))

    def delete_file(self, file_id: str) -> bool:
        return False  # nothing is uploaded: the run's files stay in its folder


def _folder(handle: Handle) -> Path:
    """The run folder a local handle names (`submit` and `find` always set it)."""
    if not handle.where:
        raise ValueError(f"handle {handle.id!r} names no run folder")
    return Path(handle.where)
