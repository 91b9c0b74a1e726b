"""A fake Together AI API (files, fine-tunes, download) on 127.0.0.1 for the real SDK.

Point the SDK at it with ``Together(api_key=fake.api_key, base_url=fake.base_url)``
(the SDK's paths carry ``/v1`` themselves, so ``base_url`` is the bare root).
It answers exactly the routes and JSON shapes the `together` 3.x SDK sends
and parses (read from its source: ``together/resources/fine_tuning.py``,
``together/resources/files.py``, ``together/lib/resources/files.py`` and the
``together/types`` models):

==========================================  ==============================================
route                                       SDK call
==========================================  ==============================================
POST   /v1/files                            files.upload, step 1: multipart fields
                                            purpose, file_name, file_type, checksum
                                            (sha256); answers 302 with ``Location`` (a
                                            presigned URL, here ``/upload/<id>`` on the
                                            fake) and ``X-Together-File-Id``
PUT    /upload/<file id>                    step 2: the raw bytes, no Authorization
POST   /v1/files/<id>/preprocess            step 3: validates; answers the FileResponse
GET    /v1/files                            files.list -> ``{"data": [...]}``
GET    /v1/files/<id>                       files.retrieve
DELETE /v1/files/<id>                       files.delete -> ``{"id", "deleted"}``
GET    /v1/fine-tunes/models/limits         fine_tuning.model_limits(model_name=)
POST   /v1/fine-tunes/estimate-price        fine_tuning.estimate_price
POST   /v1/fine-tunes                       fine_tuning.create (the FinetuneRequest JSON)
GET    /v1/fine-tunes                       fine_tuning.list -> ``{"data": [...]}``
GET    /v1/fine-tunes/<id>                  fine_tuning.retrieve
POST   /v1/fine-tunes/<id>/cancel           fine_tuning.cancel
GET    /v1/fine-tunes/<id>/events           fine_tuning.list_events -> ``{"data": [...]}``
GET    /v1/fine-tunes/<id>/metrics          fine_tuning.list_metrics -> ``{"metrics": [...]}``
GET    /v1/finetune/download                fine_tuning.content(ft_id=, checkpoint=):
                                            302 to ``/blobs/<name>``, a tar.gz archive
                                            (an adapter's files: ``fake.adapter_files``
                                            when a test sets it)
POST   /v1/chat/completions                 Together's OpenAI-compatible chat (the openai
                                            SDK at ``<base_url>/v1``): a base model the
                                            fake knows, or a completed job's
                                            ``model_output_name``
==========================================  ==============================================

Chat completions answer deterministically: ``"[<model>] <last user message>"``,
usage counted by `count_tokens`' rule (one token per word, `MESSAGE_OVERHEAD`
per message); an unknown model is a 404 like Together's.

Errors use the envelope ``{"error": {"message", "type", "param", "code"}}``.

How jobs move. Every ``GET /v1/fine-tunes/<id>`` (what ``retrieve`` sends,
i.e. every poll) is one tick, and so is ``fake.advance(job_id)``:

    pending --polls_per_stage--> queued --polls_per_stage--> running
    running --running_polls--> compressing --1--> uploading --1--> completed

Entering ``running`` the job is "tokenized": ``token_count``, ``total_steps`` and
``total_price`` (nanodollars, as Together reports it) are set. While running
each tick trains ``ceil(total_steps / running_polls)`` steps and records one
metrics row per step (``train/global_step``, ``train/loss``, ...); an
``epoch_complete`` event carries ``step`` and ``total_steps``. The loss is a
fixed function of the step (`train_loss`). ``fake.fail_next_job = "message"``
fails the next created job, with a ``job_error`` event in those words, when it
would start running; ``fake.fail(job_id, message)`` fails one now. A cancel
moves a live job to ``cancel_requested``; the next tick ends it
``cancelled``. Cancelling an ended job is a 400.

Sizes. ``total_steps = n_epochs * ceil(examples / batch)``, ``"max"`` batch is
`MAX_BATCH`. Tokens follow a rule that only has to be consistent: each
message costs `MESSAGE_OVERHEAD` plus one token per whitespace-separated word
(`count_tokens`). The price is the fake's own per-1M-token rate per model
(`FAKE_RATES`), not Together's.

Files. A file is listed as soon as its bytes arrive (``processing_status``
``PENDING``) and is ``COMPLETED`` after preprocess, or ``INVALID_FORMAT``
with a ``validation_report.error`` when a line is not a JSON object with a
non-empty ``messages`` list, or there are fewer than ``min_examples``.
``fake.upload_delay`` seconds are slept in the PUT after the bytes are
stored (so a client that dies meanwhile leaves a PENDING file behind).

Faults. ``fake.inject(method, path_prefix, status, ...)`` answers the next
matching request(s) with an error (optionally with ``Retry-After``), either
instead of handling it or after handling it (``after_handling=True``: the
work is done but the reply is lost, as with a 502 from a proxy).
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import hashlib
import io
import itertools
import json
import math
import tarfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.local_server import LocalHTTPServer

MESSAGE_OVERHEAD = 3  # role and framing tokens per message, in the fake's count
MAX_BATCH = 8  # what batch_size "max" resolves to
USER_ID = "user-fake-tunebot"
NAMESPACE = "tunebot-fake"
TERMINAL = frozenset({"completed", "error", "user_error", "cancelled"})
LIVE = frozenset({"pending", "queued", "running", "compressing", "uploading"})

# The fake's prices, USD per 1M tokens (LoRA, full); not Together's.
FAKE_RATES: dict[str, tuple[float, float]] = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": (0.48, 0.54),
    "Qwen/Qwen3-8B": (0.48, 0.54),
    "Qwen/Qwen3-32B": (1.50, 1.65),
}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    409: "conflict_error",
    429: "rate_limit_error",
}
_DEFAULT_MESSAGES = {
    400: "Invalid request.",
    401: "Invalid API key provided.",
    403: "You are not allowed to perform this action.",
    404: "Not found.",
    408: "Request timed out.",
    409: "Conflict.",
    429: "Rate limit exceeded. Please retry later.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable. Please try again later.",
}


def limits_for(model: str) -> dict[str, Any]:
    """The ``FinetuneModelLimits`` JSON the fake answers for a model it knows."""
    big = "32B" in model
    return {
        "model_name": model,
        "default_gradient_accumulation_steps": 1,
        "lora_training": {
            "default_rank": 16 if big else 8,
            "max_rank": 64,
            "max_batch_size": 16,
            "max_batch_size_dpo": 8,
            "min_batch_size": 1,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "full_training": None
        if big
        else {"max_batch_size": 16, "max_batch_size_dpo": 8, "min_batch_size": 1},
        "max_learning_rate": 1.0,
        "min_learning_rate": 1e-8,
        "max_num_checkpoints": 10,
        "max_num_epochs": 20,
        "max_num_evals": 100,
        "max_seq_length_sft": 32768,
        "max_seq_length_dpo": 16384,
        "min_max_seq_length": 512,
        "merge_output_lora": True,
        "supports_full_training": not big,
        "supports_reasoning": True,
        "supports_tools": True,
        "supports_vision": False,
    }


def count_tokens(content: bytes) -> tuple[int, int, list[str]]:
    """(valid examples, tokens, problems) for a chat JSONL file, by the fake's rule."""
    examples = tokens = 0
    problems: list[str] = []
    for number, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            problems.append(f"Line {number}: invalid JSON")
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f"Line {number}: missing a non-empty 'messages' list")
            continue
        examples += 1
        for message in messages:
            content_ = message.get("content") if isinstance(message, dict) else None
            words = len(content_.split()) if isinstance(content_, str) else 0
            tokens += MESSAGE_OVERHEAD + words
    return examples, tokens, problems


def train_loss(step: int) -> float:
    """The loss the fake reports at ``step``: falls smoothly towards 0.1."""
    return round(2.4 * 0.85**step + 0.1, 4)


def _iso(t: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_body(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass(frozen=True)
class Call:
    """One HTTP request the fake received. Header names are lower-cased.

    ``path`` has no query string; ``query`` maps each parameter to its last
    value; ``params`` is the parsed body: JSON, multipart fields, or None.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: Any
    status: int
    at: float


@dataclass
class _Fault:
    method: str
    path_prefix: str
    status: int
    times: int
    retry_after: float | None
    body: dict[str, Any] | None
    exact: bool
    after_handling: bool


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait, outside the lock, before answering


@dataclass
class _Job:
    obj: dict[str, Any]
    examples: int
    tokens: int
    eval_tokens: int
    steps_per_epoch: int
    fail_with: str | None
    total_steps: int = 0
    ticks: int = 0  # ticks spent in the current stage
    step: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    metrics: list[dict[str, Any]] = field(default_factory=list)  # oldest first


class ApiError(Exception):
    """Raised inside a handler to answer with the error envelope."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.payload = error_body(message, status, code)


class FakeTogether(LocalHTTPServer):
    """Together's files and fine-tunes endpoints in a ThreadingHTTPServer on 127.0.0.1."""

    thread_name = "fake-together-http"

    def __init__(
        self,
        api_key: str = "tg-test",
        *,
        polls_per_stage: int = 1,
        running_polls: int = 3,
        min_examples: int = 1,
        advance_on_get: bool = True,
    ) -> None:
        super().__init__()
        if polls_per_stage < 1 or running_polls < 1:
            raise ValueError("polls_per_stage and running_polls must be at least 1")
        self.api_key = api_key
        self.polls_per_stage = polls_per_stage
        self.running_polls = running_polls
        self.min_examples = min_examples
        self.advance_on_get = advance_on_get
        self.fail_next_job: str | None = None  # a job_error message for the next job
        self.upload_delay = 0.0  # seconds each PUT is held after its bytes are stored
        self.download_delay = 0.0  # seconds each archive (``/blobs/<name>``) is held
        # What an adapter archive holds (name -> bytes, e.g. a real PEFT adapter's files);
        # None: a stand-in config and an empty safetensors file.
        self.adapter_files: dict[str, bytes] | None = None
        self.credit_limit_usd = 100.0  # estimate-price's user_limit
        self.calls: list[Call] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self._checksums: dict[str, str] = {}
        self._jobs: dict[str, _Job] = {}
        self._order: list[str] = []  # job ids, oldest first
        self._blobs: dict[str, tuple[bytes, str]] = {}  # download name -> (bytes, type)
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    @property
    def base_url(self) -> str:
        """What ``Together(base_url=...)`` takes: ``http://127.0.0.1:PORT``."""
        return self._root()

    # -- what tests drive and read --------------------------------------------

    def inject(
        self,
        method: str,
        path_prefix: str,
        status: int,
        times: int = 1,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
        *,
        exact: bool = False,
        after_handling: bool = False,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` and the path with ``status``.

        ``path_prefix`` is the full path (``/v1/fine-tunes``); ``exact=True``
        matches the whole path only (so ``/v1/fine-tunes`` does not catch
        ``/v1/fine-tunes/<id>``). ``retry_after`` (seconds) is sent as
        ``Retry-After``; ``body`` replaces the default error JSON;
        ``after_handling=True`` handles the request first, then answers the error.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(
                _Fault(
                    method.upper(),
                    path_prefix,
                    status,
                    times,
                    retry_after,
                    dict(body) if body is not None else None,
                    exact,
                    after_handling,
                )
            )

    def calls_to(self, method: str, path_prefix: str = "", *, exact: bool = False) -> list[Call]:
        """Recorded calls with this HTTP method whose path starts with (or is) the given one."""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.method == method.upper() and _path_matches(c.path, path_prefix, exact)
            ]

    def job(self, job_id: str) -> dict[str, Any]:
        """The job object as ``retrieve`` would return it now (a copy, no tick)."""
        with self._lock:
            return _copy(self._full(self._get_job(job_id)))

    def jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first (copies)."""
        with self._lock:
            return [self.job(job_id) for job_id in self._order]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first (copies)."""
        with self._lock:
            return _copy(self._get_job(job_id).events)

    def advance(self, job_id: str, ticks: int = 1) -> dict[str, Any]:
        """Move a job on by ``ticks`` polls; returns the job object."""
        with self._lock:
            job = self._get_job(job_id)
            for _ in range(ticks):
                self._tick(job)
            return self.job(job_id)

    def run_to_end(self, job_id: str) -> dict[str, Any]:
        """Tick a job until it has ended; returns the job object."""
        with self._lock:
            job = self._get_job(job_id)
            while job.obj["status"] not in TERMINAL:
                self._tick(job)
            return self.job(job_id)

    def fail(self, job_id: str, message: str) -> dict[str, Any]:
        """End a live job with status ``error`` and a ``job_error`` event saying ``message``."""
        with self._lock:
            self._fail(self._get_job(job_id), message)
            return self.job(job_id)

    def adapter_archive(self, job_id: str, kind: str = "adapter") -> bytes:
        """The tar.gz a download of the job's ``kind`` checkpoint answers."""
        with self._lock:
            return _archive(self._get_job(job_id).obj, kind, self.adapter_files)

    # -- plumbing --------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._ids):06d}"

    def _get_job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"Fine-tune job {job_id} not found")
        return job

    def _get_file(self, file_id: str) -> dict[str, Any]:
        obj = self.files.get(file_id)
        if obj is None:
            raise ApiError(404, f"File {file_id} not found")
        return obj

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method and _path_matches(path, fault.path_prefix, fault.exact):
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # -- HTTP dispatch ---------------------------------------------------------

    def _serve(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in req.headers.items()}
        split = urlsplit(req.path)
        path = unquote(split.path)
        pairs = parse_qsl(split.query, keep_blank_values=True)
        method = req.command.upper()
        params: Any = None

        with self._lock:
            fault = self._take_fault(method, path)
            try:
                params = _parse_body(body, headers.get("content-type", ""))
                if fault is not None and not fault.after_handling:
                    reply = _fault_reply(fault)
                else:
                    if not path.startswith(("/upload/", "/blobs/")):  # presigned: no key
                        self._check_auth(headers.get("authorization", ""))
                    reply = self._route(method, path, dict(pairs), params, body)
                    if fault is not None:
                        reply = _fault_reply(fault)
            except ApiError as err:
                reply = _json_reply(err.payload, err.status)
            except ValueError:
                reply = _json_reply(error_body("Could not parse the request body.", 400), 400)
            self.calls.append(
                Call(method, path, dict(pairs), headers, body, params, reply.status, time.time())
            )

        if reply.delay > 0:
            time.sleep(reply.delay)
        req.send_response(reply.status)
        req.send_header("Content-Type", reply.content_type)
        req.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(reply.body)

    def _check_auth(self, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing API key. Pass it as 'Authorization: Bearer <key>'.")
        if token != self.api_key:
            raise ApiError(401, "Invalid API key provided.", code="invalid_api_key")

    def _route(
        self, method: str, path: str, query: dict[str, str], params: Any, body: bytes
    ) -> _Reply:
        parts = path.strip("/").split("/")
        match method, parts:
            case "POST", ["v1", "files"]:
                return self._start_upload(params)
            case "PUT", ["upload", file_id]:
                return self._receive_upload(file_id, body)
            case "POST", ["v1", "files", file_id, "preprocess"]:
                return _json_reply(self._preprocess(file_id))
            case "GET", ["v1", "files"]:
                listed = [f for f in reversed(self.files.values()) if f["bytes"] is not None]
                return _json_reply({"data": listed})
            case "GET", ["v1", "files", file_id]:
                return _json_reply(self._get_file(file_id))
            case "DELETE", ["v1", "files", file_id]:
                self._get_file(file_id)
                del self.files[file_id]
                self.contents.pop(file_id, None)
                return _json_reply({"id": file_id, "deleted": True})
            case "GET", ["v1", "fine-tunes", "models", "limits"]:
                return _json_reply(self._limits(query.get("model_name", "")))
            case "POST", ["v1", "fine-tunes", "estimate-price"]:
                return _json_reply(self._estimate(params))
            case "POST", ["v1", "fine-tunes"]:
                return _json_reply(self._truncated(self._create_job(params)))
            case "GET", ["v1", "fine-tunes"]:
                jobs = [self._truncated(self._jobs[j]) for j in reversed(self._order)]
                return _json_reply({"data": jobs})
            case "GET", ["v1", "fine-tunes", job_id]:
                job = self._get_job(job_id)
                if self.advance_on_get:
                    self._tick(job)
                return _json_reply(self._full(job))
            case "POST", ["v1", "fine-tunes", job_id, "cancel"]:
                return _json_reply(self._truncated(self._cancel(self._get_job(job_id))))
            case "GET", ["v1", "fine-tunes", job_id, "events"]:
                return _json_reply({"data": self._get_job(job_id).events})
            case "GET", ["v1", "fine-tunes", job_id, "metrics"]:
                return _json_reply({"metrics": self._metrics(self._get_job(job_id), query)})
            case "GET", ["v1", "finetune", "download"]:
                return self._download(query)
            case "POST", ["v1", "chat", "completions"]:
                return _json_reply(self._chat(params))
            case "GET", ["blobs", name]:
                if name not in self._blobs:
                    raise ApiError(404, "No such object")
                content, kind = self._blobs[name]
                return _Reply(200, content, kind, delay=self.download_delay)
        raise ApiError(404, f"Invalid URL ({method} {path})")

    # -- files (called with the lock held) -------------------------------------

    def _start_upload(self, params: Any) -> _Reply:
        if not isinstance(params, dict):
            raise ApiError(400, "Expected multipart/form-data fields")
        purpose = params.get("purpose")
        if purpose not in ("fine-tune", "eval", "batch-api", "calibration"):
            raise ApiError(400, f"Invalid purpose: {purpose!r}")
        name = params.get("file_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "file_name is required")
        if params.get("file_type") not in ("jsonl", "parquet", "csv"):
            raise ApiError(400, f"Invalid file_type: {params.get('file_type')!r}")
        file_id = self._new_id("file")
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": None,  # not listed until its bytes arrive
            "created_at": int(time.time()),
            "filename": name,
            "FileType": params["file_type"],
            "purpose": purpose,
            "processing_status": "PENDING",
        }
        self._checksums[file_id] = str(params.get("checksum", ""))
        headers = {"Location": f"{self._root()}/upload/{file_id}", "X-Together-File-Id": file_id}
        return _Reply(302, b"", "text/plain", headers)

    def _receive_upload(self, file_id: str, body: bytes) -> _Reply:
        obj = self._get_file(file_id)
        obj["bytes"] = len(body)
        self.contents[file_id] = body
        return _Reply(200, b"", "text/plain", delay=self.upload_delay)

    def _preprocess(self, file_id: str) -> dict[str, Any]:
        obj = self._get_file(file_id)
        content = self.contents.get(file_id)
        if content is None:
            raise ApiError(400, f"File {file_id} has no content yet")
        if self._checksums.get(file_id) != hashlib.sha256(content).hexdigest():
            raise ApiError(400, f"Checksum mismatch for file {file_id}")
        examples, _, problems = count_tokens(content)
        if not problems and examples < self.min_examples:
            problems = [f"File has {examples} example(s); at least {self.min_examples} needed"]
        report: dict[str, Any] = {"valid": not problems, "file_id": file_id, "nlines": examples}
        if problems:
            report.update(error=problems[0], error_type="INVALID_FORMAT")
            obj["processing_status"] = "INVALID_FORMAT"
        else:
            report["dataset_format"] = "CONVERSATION"
            obj["processing_status"] = "COMPLETED"
        obj["validation_report"] = report
        return obj

    def _training_file(self, file_id: Any, param: str) -> dict[str, Any]:
        obj = self.files.get(file_id) if isinstance(file_id, str) else None
        if obj is None or obj["purpose"] != "fine-tune":
            raise ApiError(400, f"{param} {file_id!r} is not an uploaded fine-tune file")
        if obj["processing_status"] == "INVALID_FORMAT":
            raise ApiError(
                400, f"{param} {file_id} is invalid: {obj['validation_report']['error']}"
            )
        if obj["processing_status"] != "COMPLETED":
            raise ApiError(400, f"{param} {file_id} has not been validated yet")
        return obj

    # -- fine-tunes (called with the lock held) --------------------------------

    def _limits(self, model: str) -> dict[str, Any]:
        if model not in FAKE_RATES:
            raise ApiError(404, f"Model {model!r} is not available for fine-tuning")
        return limits_for(model)

    def _price(self, model: str, lora: bool, tokens: int) -> float:
        rate = FAKE_RATES[model][0 if lora else 1]
        return round(tokens * rate / 1e6, 6)

    def _estimate(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise ApiError(400, "Expected a JSON body")
        model = params.get("model") or ""
        self._limits(model)
        for name in ("training_file", "validation_file"):
            file_id = params.get(name)
            if name == "validation_file" and not file_id:
                continue
            obj = self.files.get(file_id) if isinstance(file_id, str) else None
            if obj is None:
                raise ApiError(404, f"File {file_id} not found")
            if obj["processing_status"] != "COMPLETED":
                short = "train" if name == "training_file" else "eval"
                state = (
                    "invalid" if obj["processing_status"] == "INVALID_FORMAT" else "not_validated"
                )
                return {
                    "estimation_available": False,
                    "unavailable_reason": f"{short}_file_{state}",
                }
        n_epochs = int(params.get("n_epochs") or 1)
        n_evals = int(params.get("n_evals") or 0)
        train = count_tokens(self.contents[params["training_file"]])[1] * n_epochs
        evals = 0
        if params.get("validation_file"):
            evals = count_tokens(self.contents[params["validation_file"]])[1] * n_evals
        kind = (params.get("training_type") or {}).get("type", "Lora")
        price = self._price(model, kind != "Full", train + evals)
        return {
            "estimation_available": True,
            "estimated_total_price": price,
            "allowed_to_proceed": price <= self.credit_limit_usd,
            "user_limit": self.credit_limit_usd,
            "estimated_train_token_count": train,
            "estimated_eval_token_count": evals,
        }

    def _create_job(self, params: Any) -> _Job:
        if not isinstance(params, dict):
            raise ApiError(400, "Expected a JSON body")
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required")
        limits = self._limits(model)
        training = self._training_file(params.get("training_file"), "training_file")
        validation = None
        if params.get("validation_file"):
            validation = self._training_file(params["validation_file"], "validation_file")
        n_epochs = params.get("n_epochs")
        if type(n_epochs) is not int or not 1 <= n_epochs <= limits["max_num_epochs"]:
            raise ApiError(400, f"n_epochs must be between 1 and {limits['max_num_epochs']}")
        n_evals = params.get("n_evals") or 0
        if n_evals and validation is None:
            raise ApiError(400, "n_evals > 0 requires a validation_file")
        lr = params.get("learning_rate")
        if not isinstance(lr, int | float) or not (
            limits["min_learning_rate"] <= lr <= limits["max_learning_rate"]
        ):
            raise ApiError(400, "learning_rate is out of range for this model")
        suffix = params.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 40):
            raise ApiError(400, "suffix must be at most 40 characters")
        training_type = params.get("training_type") or {
            "type": "Lora",
            "lora_r": limits["lora_training"]["default_rank"],
            "lora_alpha": 2 * limits["lora_training"]["default_rank"],
            "lora_dropout": 0.0,
            "lora_trainable_modules": "all-linear",
        }
        lora = training_type.get("type") == "Lora"
        if not lora and not limits["supports_full_training"]:
            raise ApiError(400, f"Full fine-tuning is not supported for {model}")
        if (
            lora
            and not 1 <= int(training_type.get("lora_r", 0)) <= limits["lora_training"]["max_rank"]
        ):
            raise ApiError(
                400, f"lora_r must be between 1 and {limits['lora_training']['max_rank']}"
            )
        batch = params.get("batch_size", "max")
        size = MAX_BATCH if batch in ("max", None) else batch
        if type(size) is not int or size < 1:
            raise ApiError(400, "batch_size must be a positive integer or 'max'")

        examples, tokens, _ = count_tokens(self.contents[training["id"]])
        eval_tokens = count_tokens(self.contents[validation["id"]])[1] if validation else 0
        job_id = self._new_id("ft")
        short = job_id.removeprefix("ft-")
        output = f"{NAMESPACE}/{model.split('/')[-1]}" + (f"-{suffix}" if suffix else "")
        output += f"-{short}"
        now = time.time()
        steps_per_epoch = max(1, math.ceil(examples / size))
        obj: dict[str, Any] = {
            "id": job_id,
            "status": "pending",
            "user_id": USER_ID,
            "owner_address": "tunebot@example.com",
            "created_at": _iso(now),
            "updated_at": _iso(now),
            "started_at": None,
            "model": model,
            "model_output_name": output,
            "adapter_output_name": f"{output}-adapter" if lora else None,
            "training_file": training["id"],
            "validation_file": validation["id"] if validation else None,
            "n_epochs": n_epochs,
            "n_evals": n_evals,
            "n_checkpoints": params.get("n_checkpoints", 1),
            "batch_size": size,
            "learning_rate": lr,
            "lr_scheduler": params.get("lr_scheduler"),
            "warmup_ratio": params.get("warmup_ratio", 0.0),
            "max_grad_norm": params.get("max_grad_norm", 1.0),
            "weight_decay": params.get("weight_decay", 0.0),
            "max_seq_length": params.get("max_seq_length"),
            "packing": params.get("packing", True),
            "suffix": suffix,
            "random_seed": params.get("random_seed"),
            "training_type": training_type,
            "training_method": params.get("training_method")
            or {"method": "sft", "train_on_inputs": "auto"},
            "train_on_inputs": (params.get("training_method") or {}).get("train_on_inputs"),
            "token_count": 0,
            "total_price": 0,
            "param_count": None,
            "total_steps": None,  # known once the data is tokenized
            "steps_completed": None,
            "epochs_completed": 0,
            "evals_completed": 0,
            "queue_depth": 0,
            "progress": {"estimate_available": False, "seconds_remaining": 0},
            "wandb_project_name": params.get("wandb_project_name"),
        }
        job = _Job(obj, examples, tokens, eval_tokens, steps_per_epoch, self.fail_next_job)
        job.total_steps = n_epochs * steps_per_epoch
        self.fail_next_job = None
        self._jobs[job_id] = job
        self._order.append(job_id)
        self._event(job, "job_pending", "Fine-tune request created")
        return job

    def _truncated(self, job: _Job) -> dict[str, Any]:
        """The FinetuneResponseTruncated shape of list, create and cancel (no events)."""
        return {k: v for k, v in self._full(job).items() if k != "events"}

    def _full(self, job: _Job) -> dict[str, Any]:
        return {**job.obj, "events": job.events}

    def _metrics(self, job: _Job, query: dict[str, str]) -> list[dict[str, Any]]:
        rows = job.metrics
        low, high = query.get("global_step_from"), query.get("global_step_to")
        if low is not None:
            rows = [r for r in rows if r["train/global_step"] >= int(low)]
        if high is not None:
            rows = [r for r in rows if r["train/global_step"] <= int(high)]
        resolution = query.get("resolution")
        if resolution is not None and int(resolution) > 0:
            train = [r for r in rows if "train/loss" in r]
            n = int(resolution)
            if len(train) > n:  # uniform sample, the last row always kept
                keep = {round(i * (len(train) - 1) / max(n - 1, 1)) for i in range(n)}
                picked = {id(train[i]) for i in keep}
                rows = [r for r in rows if "train/loss" not in r or id(r) in picked]
        return rows

    def _cancel(self, job: _Job) -> _Job:
        status = job.obj["status"]
        if status in TERMINAL:
            raise ApiError(400, f"Cannot cancel fine-tune job {job.obj['id']}: it is {status}")
        if status != "cancel_requested":
            job.obj["status"] = "cancel_requested"
            job.obj["updated_at"] = _iso()
            self._event(job, "cancel_requested", "Cancel requested by user")
        return job

    def _download(self, query: dict[str, str]) -> _Reply:
        job = self._get_job(query.get("ft_id", ""))
        obj = job.obj
        if obj["status"] != "completed":
            raise ApiError(
                400, f"Fine-tune job {obj['id']} is {obj['status']}; only completed jobs download"
            )
        kind = query.get("checkpoint") or "merged"
        lora = obj["training_type"].get("type") == "Lora"
        allowed = ("adapter", "merged") if lora else ("model_output_path",)
        if kind not in allowed:
            raise ApiError(400, f"checkpoint must be one of {', '.join(allowed)} for this job")
        name = f"{obj['id']}-{kind}.tar.gz"
        self._blobs[name] = (_archive(obj, kind, self.adapter_files), "application/x-tar")
        return _Reply(302, b"", "text/plain", {"Location": f"{self._root()}/blobs/{name}"})

    def _chat(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict) or not isinstance(params.get("messages"), list):
            raise ApiError(400, "messages is required")
        model = params.get("model")
        outputs = {j.obj["model_output_name"] for j in self._jobs.values()}
        if model not in FAKE_RATES and model not in outputs:
            raise ApiError(404, f"Unable to access model {model}.", code="model_not_available")
        users = [m for m in params["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        said = str(users[-1].get("content", "")) if users else ""
        reply = f"[{model}] {said}"
        prompt = sum(
            MESSAGE_OVERHEAD + len(str(m.get("content", "")).split())
            for m in params["messages"]
            if isinstance(m, dict)
        )
        completion = len(reply.split())
        return {
            "id": self._new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    # -- the job state machine (called with the lock held) ---------------------

    def _event(self, job: _Job, type_: str, message: str, level: str = "info", **extra: Any):
        job.events.append(
            {
                "object": "fine-tune-event",
                "created_at": _iso(),
                "level": level,
                "message": message,
                "type": type_,
                "param_count": None,
                "token_count": None,
                "wandb_url": None,
                "hash": None,
                **extra,
            }
        )
        job.obj["updated_at"] = _iso()

    def _tick(self, job: _Job) -> None:
        obj = job.obj
        status = obj["status"]
        if status in TERMINAL:
            return
        job.ticks += 1
        if status == "cancel_requested":
            obj["status"] = "cancelled"
            self._event(job, "job_stopped", "Job was cancelled")
        elif status == "pending" and job.ticks >= self.polls_per_stage:
            job.ticks = 0
            obj["status"] = "queued"
            obj["queue_depth"] = 1
        elif status == "queued" and job.ticks >= self.polls_per_stage:
            job.ticks = 0
            obj["queue_depth"] = 0
            if job.fail_with is not None:
                self._fail(job, job.fail_with)
                return
            self._start(job)
        elif status == "running":
            self._train(job)
        elif status == "compressing":
            obj["status"] = "uploading"
            self._event(job, "model_compression_complete", "Compressing output model complete")
            self._event(job, "model_uploading", "Uploading output model")
        elif status == "uploading":
            obj["status"] = "completed"
            obj["progress"] = {"estimate_available": False, "seconds_remaining": 0}
            self._event(job, "model_upload_complete", "Model upload complete")
            self._event(
                job,
                "job_complete",
                f"Job finished at {_iso()}. Model output name: {obj['model_output_name']}",
            )

    def _start(self, job: _Job) -> None:
        obj = job.obj
        obj["status"] = "running"
        obj["started_at"] = _iso()
        lora = obj["training_type"].get("type") == "Lora"
        billed = obj["n_epochs"] * job.tokens + obj["n_evals"] * job.eval_tokens
        obj["token_count"] = billed
        obj["total_price"] = round(self._price(obj["model"], lora, billed) * 1e9)  # nanodollars
        obj["param_count"] = 8_030_261_248
        obj["total_steps"], obj["steps_completed"] = job.total_steps, 0
        obj["progress"] = {"estimate_available": True, "seconds_remaining": 60 * self.running_polls}
        self._event(job, "job_start", f"Job started at {_iso()}")
        self._event(job, "model_downloading", f"Downloading model data for {obj['model']}")
        self._event(job, "model_download_complete", "Model data downloaded")
        self._event(job, "training_data_downloading", "Downloading training data")
        self._event(
            job,
            "training_data_download_complete",
            "Training data downloaded",
            token_count=billed,
        )
        self._event(job, "training_start", "Training started", total_steps=obj["total_steps"])

    def _train(self, job: _Job) -> None:
        obj = job.obj
        total = obj["total_steps"]
        per_tick = math.ceil(total / self.running_polls)
        for _ in range(per_tick):
            if job.step >= total:
                break
            job.step += 1
            step = job.step
            job.metrics.append(
                {
                    "timestamp": time.time_ns(),
                    "train/global_step": step,
                    "train/epoch": round(step / job.steps_per_epoch, 4),
                    "train/loss": train_loss(step),
                    "train/learning_rate": obj["learning_rate"],
                    "train/grad_norm": 1.0,
                }
            )
            if step % job.steps_per_epoch == 0:
                epoch = step // job.steps_per_epoch
                obj["epochs_completed"] = epoch
                if obj["validation_file"] and obj["n_evals"]:
                    job.metrics.append(
                        {
                            "timestamp": time.time_ns(),
                            "train/global_step": step,
                            "eval/loss": round(train_loss(step) + 0.05, 4),
                        }
                    )
                    obj["evals_completed"] += 1
                self._event(
                    job,
                    "epoch_complete",
                    f"Epoch {epoch} completed, at step {step}",
                    step=step,
                    total_steps=total,
                )
        obj["steps_completed"] = job.step
        left = max(self.running_polls - job.ticks, 0)
        obj["progress"] = {"estimate_available": True, "seconds_remaining": 60 * left}
        if job.step >= total:
            self._event(job, "checkpoint_save", f"Checkpoint saved at step {total}", step=total)
            self._event(job, "training_complete", "Training completed")
            self._event(job, "model_compressing", "Compressing output model")
            obj["status"] = "compressing"

    def _fail(self, job: _Job, message: str) -> None:
        if job.obj["status"] in TERMINAL:
            return
        job.obj["status"] = "error"
        job.obj["progress"] = {"estimate_available": False, "seconds_remaining": 0}
        self._event(job, "job_error", message, level="error")


# -- helpers -------------------------------------------------------------------


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _path_matches(path: str, wanted: str, exact: bool) -> bool:
    if exact:
        return path.rstrip("/") == wanted.rstrip("/")
    return path.startswith(wanted)


def _json_reply(payload: Any, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(payload).encode())


def _fault_reply(fault: _Fault) -> _Reply:
    if fault.body is not None:
        payload = fault.body
    else:
        message = _DEFAULT_MESSAGES.get(fault.status, f"HTTP {fault.status}")
        payload = error_body(message, fault.status)
    reply = _json_reply(payload, fault.status)
    if fault.retry_after is not None:
        value = fault.retry_after
        reply.headers["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
    return reply


def _archive(job: dict[str, Any], kind: str, adapter: Mapping[str, bytes] | None = None) -> bytes:
    """A small tar.gz standing in for the job's adapter or merged weights; `adapter`
    (name -> bytes) is what an adapter archive holds instead, when given."""
    ttype = job["training_type"]
    files: dict[str, bytes] = {}
    header = json.dumps({"__metadata__": {"format": "pt", "fake": "together"}}).encode()
    weights = len(header).to_bytes(8, "little") + header  # a valid, empty safetensors file
    if kind == "adapter" and adapter is not None:
        files.update(adapter)
    elif kind == "adapter":
        config = {
            "base_model_name_or_path": job["model"],
            "peft_type": "LORA",
            "r": ttype.get("lora_r"),
            "lora_alpha": ttype.get("lora_alpha"),
            "lora_dropout": ttype.get("lora_dropout", 0.0),
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        }
        files["adapter_config.json"] = json.dumps(config).encode()
        files["adapter_model.safetensors"] = weights
    else:
        files["config.json"] = json.dumps({"_name_or_path": job["model_output_name"]}).encode()
        files["model.safetensors"] = weights
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if content_type.startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            if name:
                fields[name] = (part.get_payload(decode=True) or b"").decode()
        return fields
    if content_type.startswith("application/json"):
        return json.loads(body)
    return None  # a raw upload


def _handler_for(fake: FakeTogether) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "FakeTogether/1.0"
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pool expects
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_GET(self) -> None:
            fake._serve(self)

        def do_POST(self) -> None:
            fake._serve(self)

        def do_PUT(self) -> None:
            fake._serve(self)

        def do_DELETE(self) -> None:
            fake._serve(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # every request is in fake.calls

    return Handler
