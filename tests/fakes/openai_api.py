"""A fake OpenAI API (files, fine-tuning jobs, chat completions) on 127.0.0.1 for the real SDK.

Point the SDK at it with ``OpenAI(api_key=fake.api_key, base_url=fake.base_url)``.
openai 3.x talks through httpx2, so transport mocks miss it; a real socket does not.

How jobs move. Every ``GET /v1/fine_tuning/jobs/{id}`` (what ``jobs.retrieve``
sends, i.e. every poll) is one tick, and so is ``fake.advance(job_id)``:

    validating_files --polls_per_stage--> queued --polls_per_stage--> running
    running --running_polls--> succeeded (or failed, see below)

While running, each tick trains ``ceil(total_steps / running_polls)`` steps and
emits one ``metrics`` event per step ("Step k/N: training loss=…"). The loss is a
fixed function of the step, so runs are reproducible. Listing jobs, events or
checkpoints never moves a job.

Sizes and tokens. ``total_steps = n_epochs * ceil(examples / batch_size)``;
``"auto"`` resolves to ``AUTO_EPOCHS`` epochs, batch size 1 and a learning-rate
multiplier of 1.8 as soon as the job is created. Tokens are counted by a rule
that only has to be consistent, not tiktoken's: each message costs
``MESSAGE_OVERHEAD`` plus one token per whitespace-separated word of its text
content (see `count_tokens`). ``trained_tokens = n_epochs * tokens(training file)``;
the fake knows no prices, so cost is the caller's ``trained_tokens x price``.

Failure. A training file with fewer than ``min_examples`` valid examples, or any
line that is not a JSON object with a ``messages`` list, fails the job when
validation ends, as OpenAI does. ``fake.fail_next_job = "message"`` (or a dict
with ``code``/``message``/``param``) fails the next created job the same way.

Faults. ``fake.inject(method, path_prefix, status, ...)`` answers the next
matching request(s) with an error in OpenAI's JSON shape, optionally with a
``Retry-After`` header, either instead of handling it or after handling it
(``after_handling=True``: the work is done but the reply is lost, as with a 502
from a proxy).

Chat completions. ``POST /v1/chat/completions`` answers with
``fake.chat_script(request_json)`` when set: a string is the assistant's reply;
a ``(status, body)`` pair is sent as it is (an error, say). The default script
echoes deterministically: ``"[<model>] <last user message>"``. Usage counts
follow `count_tokens`' rule: the prompt is ``MESSAGE_OVERHEAD`` plus one token
per word for each message, the completion one token per word of the reply.
``fake.latency`` seconds are slept per handled chat call, outside the fake's
lock, so concurrent calls overlap as they would against the real API.
``fake.in_flight`` / ``fake.max_in_flight`` count requests being served (any
endpoint, faults included), for tests of a client's concurrency bound.
"""

from __future__ import annotations

import csv
import email.parser
import email.policy
import io
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.local_server import LocalHTTPServer

AUTO_EPOCHS = 3
AUTO_BATCH_SIZE = 1
AUTO_LR_MULTIPLIER = 1.8
MESSAGE_OVERHEAD = 3  # role and framing tokens per message, in the fake's count
MIN_EXAMPLES = 10  # OpenAI refuses training files with fewer examples
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ORGANIZATION = "org-tunebot"

# OpenAI's own wording for the common server-side errors.
_DEFAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to perform this action.", "invalid_request_error", None),
    404: ("Not found.", "invalid_request_error", None),
    408: ("Request timed out.", "timeout", None),
    409: ("The resource is locked; try again.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


@dataclass(frozen=True)
class Call:
    """One HTTP request the fake received. Header names are lower-cased.

    ``path`` has no query string; ``query`` maps each parameter to its last
    value; ``params`` is the parsed body: JSON, or multipart fields (a file part
    as bytes).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: Any
    status: int
    at: float


@dataclass(frozen=True)
class FilePart:
    """A file field of a multipart request, as recorded in `Call.params`."""

    filename: str
    content: bytes


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
    total_steps: int
    steps_per_epoch: int
    has_validation: bool
    fail_with: dict[str, Any] | None
    ticks: int = 0  # ticks spent in the current stage
    step: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    rows: list[dict[str, Any]] = field(default_factory=list)  # result CSV rows


class ApiError(Exception):
    """Raised inside a handler to answer with OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.payload = {"message": message, "type": type, "param": param, "code": code}


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
            problems.append(f"line {number}: not valid JSON")
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f"line {number}: no messages list")
            continue
        examples += 1
        for message in messages:
            tokens += MESSAGE_OVERHEAD + len(_text_of(message).split())
    return examples, tokens, problems


def _text_of(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def train_loss(step: int) -> float:
    """The loss the fake reports at ``step``: falls smoothly towards 0.1."""
    return round(2.4 * 0.85**step + 0.1, 4)


def train_accuracy(step: int) -> float:
    return round(0.4 + 0.55 * (1 - 0.85**step), 4)


class FakeOpenAI(LocalHTTPServer):
    """OpenAI's files and fine-tuning endpoints in a ThreadingHTTPServer on 127.0.0.1."""

    thread_name = "fake-openai-http"

    def __init__(
        self,
        api_key: str = "sk-test",
        *,
        polls_per_stage: int = 1,
        running_polls: int = 3,
        min_examples: int = MIN_EXAMPLES,
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
        # Answer GET /fine_tuning/jobs as an API without the metadata filter would.
        self.ignore_metadata_filter = False
        # Fails the next created job when its validation ends: a message, or a
        # dict with code / message / param.
        self.fail_next_job: str | Mapping[str, Any] | None = None
        # POST /chat/completions: request JSON -> reply text, or (status, JSON body).
        self.chat_script: Callable[[dict[str, Any]], str | tuple[int, Any]] | None = None
        self.latency = 0.0  # seconds per handled chat completion
        # Seconds each upload is held before its answer (the file is stored
        # first, so a client killed meanwhile leaves it behind, as on OpenAI).
        self.upload_delay = 0.0
        self.in_flight = 0  # requests being served now
        self.max_in_flight = 0  # the most served at once since start (or reset)

        self.calls: list[Call] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self._jobs: dict[str, _Job] = {}
        self._order: list[str] = []  # job ids, oldest first
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    @property
    def base_url(self) -> str:
        """What ``OpenAI(base_url=...)`` takes: ``http://127.0.0.1:PORT/v1``."""
        return f"{self._root()}/v1"

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

        ``path_prefix`` may omit the leading ``/v1``; ``exact=True`` matches the
        whole path only (so ``/fine_tuning/jobs`` does not catch ``…/cancel``).
        ``retry_after`` (seconds, may be fractional) is sent as ``Retry-After``.
        ``body`` replaces the default error JSON. ``after_handling=True`` first
        handles the request (a job gets created) and then answers the error.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(
                _Fault(
                    method.upper(),
                    _full_path(path_prefix),
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
        wanted = _full_path(path_prefix) if path_prefix else ""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.method == method.upper() and _path_matches(c.path, wanted, exact)
            ]

    def job(self, job_id: str) -> dict[str, Any]:
        """The job object as the API would return it now (a copy)."""
        with self._lock:
            return json.loads(json.dumps(self._get_job(job_id).obj))

    def jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first (copies)."""
        with self._lock:
            return [self.job(job_id) for job_id in self._order]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first (copies)."""
        with self._lock:
            return json.loads(json.dumps(self._get_job(job_id).events))

    def advance(self, job_id: str, ticks: int = 1) -> dict[str, Any]:
        """Move a job on by ``ticks`` polls; returns the job object."""
        with self._lock:
            job = self._get_job(job_id)
            for _ in range(ticks):
                self._tick(job)
            return self.job(job_id)

    def run_to_end(self, job_id: str) -> dict[str, Any]:
        """Tick a job until it is succeeded, failed or cancelled; returns the job object."""
        with self._lock:
            job = self._get_job(job_id)
            while job.obj["status"] not in TERMINAL:
                self._tick(job)
            return self.job(job_id)

    def chat_calls(self) -> list[Call]:
        """Recorded ``POST /v1/chat/completions`` calls, oldest first."""
        return self.calls_to("POST", "/chat/completions", exact=True)

    def reset_in_flight(self) -> None:
        """Forget the in-flight high-water mark (between two runs of a benchmark)."""
        with self._lock:
            self.max_in_flight = self.in_flight

    def add_file(
        self, content: bytes, filename: str = "train.jsonl", purpose: str = "fine-tune"
    ) -> dict[str, Any]:
        """Store a file as if uploaded; returns the file object."""
        with self._lock:
            return dict(self._store_file(content, filename, purpose))

    # -- plumbing --------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._ids):06d}"

    def _get_job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(
                404, f"Could not find fine-tune: {job_id}", param="fine_tune_id", code=None
            )
        return job

    def _get_file(self, file_id: str) -> dict[str, Any]:
        obj = self.files.get(file_id)
        if obj is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return obj

    def _store_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = self._new_id("file")
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[file_id] = obj
        self.contents[file_id] = content
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

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._serve(req)
        finally:
            with self._lock:
                self.in_flight -= 1

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
                    self._check_auth(headers.get("authorization", ""))
                    reply = self._route(method, path, pairs, params)
                    if fault is not None:
                        reply = _fault_reply(fault)
            except ApiError as err:
                reply = _json_reply({"error": err.payload}, err.status)
            except ValueError:
                reply = _json_reply(
                    error_body("We could not parse the JSON body of your request."), 400
                )
            self.calls.append(
                Call(method, path, dict(pairs), headers, body, params, reply.status, time.time())
            )

        if reply.delay > 0:
            time.sleep(reply.delay)
        req.send_response(reply.status)
        req.send_header("Content-Type", reply.content_type)
        req.send_header("Content-Length", str(len(reply.body)))
        req.send_header("x-request-id", f"req_fake{len(self.calls):06d}")
        for name, value in reply.headers.items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(reply.body)

    def _check_auth(self, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if token != self.api_key:
            shown = f"{token[:3]}{'*' * 8}{token[-4:]}" if len(token) > 8 else "*" * len(token)
            raise ApiError(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    def _route(self, method: str, path: str, pairs: list[tuple[str, str]], params: Any) -> _Reply:
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"]:
            raise ApiError(404, f"Invalid URL ({method} {path})")
        parts = parts[1:]
        match method, parts:
            case "POST", ["chat", "completions"]:
                return self._chat_completion(params)
            case "POST", ["files"]:
                reply = _json_reply(self._create_file(params))
                reply.delay = self.upload_delay
                return reply
            case "GET", ["files"]:
                purpose = dict(pairs).get("purpose")
                files = [
                    f for f in reversed(self.files.values()) if purpose in (None, f["purpose"])
                ]
                return _json_reply(_page(files, pairs, default_limit=10_000))
            case "GET", ["files", file_id]:
                return _json_reply(self._get_file(file_id))
            case "DELETE", ["files", file_id]:
                self._get_file(file_id)
                del self.files[file_id]
                self.contents.pop(file_id, None)
                return _json_reply({"id": file_id, "object": "file", "deleted": True})
            case "GET", ["files", file_id, "content"]:
                self._get_file(file_id)
                return _Reply(200, self.contents[file_id], "application/octet-stream")
            case "POST", ["fine_tuning", "jobs"]:
                return _json_reply(self._create_job(params))
            case "GET", ["fine_tuning", "jobs"]:
                return _json_reply(self._list_jobs(pairs))
            case "GET", ["fine_tuning", "jobs", job_id]:
                job = self._get_job(job_id)
                if self.advance_on_get:
                    self._tick(job)
                return _json_reply(job.obj)
            case "POST", ["fine_tuning", "jobs", job_id, "cancel"]:
                return _json_reply(self._cancel(self._get_job(job_id)))
            case "GET", ["fine_tuning", "jobs", job_id, "events"]:
                job = self._get_job(job_id)
                return _json_reply(_page(job.events[::-1], pairs, default_limit=20))
            case "GET", ["fine_tuning", "jobs", job_id, "checkpoints"]:
                job = self._get_job(job_id)
                return _json_reply(_page(job.checkpoints[::-1], pairs, default_limit=10))
        raise ApiError(404, f"Invalid URL ({method} {path})")

    # -- endpoints (called with the lock held) --------------------------------

    def _chat_completion(self, params: Any) -> _Reply:
        if not isinstance(params, dict):
            raise ApiError(400, "We could not parse the JSON body of your request.")
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        messages = params.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array", param="messages")
        script = self.chat_script or _echo
        try:
            answer = script(params)
        except Exception as exc:  # a broken test script: say so rather than drop the line
            raise ApiError(500, f"chat_script raised {exc!r}", type="server_error") from exc
        if isinstance(answer, tuple):
            status, payload = answer
            return _json_reply(payload, status)
        prompt_tokens = sum(MESSAGE_OVERHEAD + len(_text_of(m).split()) for m in messages)
        words = answer.split()
        limit = params.get("max_completion_tokens") or params.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and len(words) > limit:  # cut at the limit, as OpenAI does
            answer, words, finish = " ".join(words[:limit]), words[:limit], "length"
        completion_tokens = len(words)
        reply = _json_reply(
            {
                "id": self._new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )
        reply.delay = self.latency
        return reply

    def _create_file(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict) or not isinstance(params.get("file"), FilePart):
            raise ApiError(400, "'file' is a required property", param="file")
        purpose = params.get("purpose")
        if purpose not in ("fine-tune", "batch", "assistants", "user_data", "evals", "vision"):
            raise ApiError(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        upload: FilePart = params["file"]
        if purpose == "fine-tune" and not upload.filename.endswith(".jsonl"):
            raise ApiError(
                400,
                f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {upload.filename}).",
                param="file",
            )
        return self._store_file(upload.content, upload.filename, purpose)

    def _fine_tune_file(self, file_id: Any, param: str) -> dict[str, Any]:
        obj = self.files.get(file_id) if isinstance(file_id, str) else None
        if obj is None or obj["purpose"] != "fine-tune":
            raise ApiError(
                400,
                f"invalid {param}: {file_id}",
                param=param,
                code=f"invalid_{param}",
            )
        return obj

    def _create_job(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise ApiError(400, "We could not parse the JSON body of your request.")
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is a required property", param="model")
        training = self._fine_tune_file(params.get("training_file"), "training_file")
        validation = None
        if params.get("validation_file") is not None:
            validation = self._fine_tune_file(params["validation_file"], "validation_file")
        hyper = _hyperparameters(params)
        suffix = params.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
            raise ApiError(400, "suffix must be a string of at most 64 characters", param="suffix")
        metadata = params.get("metadata")
        _check_metadata(metadata)

        examples, tokens, problems = count_tokens(self.contents[training["id"]])
        fail_with = _as_error(self.fail_next_job) if self.fail_next_job is not None else None
        self.fail_next_job = None
        if fail_with is None and problems:
            fail_with = {
                "code": "invalid_training_file",
                "message": f"The job failed due to an invalid training file. {problems[0]}.",
                "param": "training_file",
            }
        elif fail_with is None and examples < self.min_examples:
            fail_with = {
                "code": "invalid_training_file",
                "message": (
                    f"Training file has {examples} example(s), but must have at least "
                    f"{self.min_examples} examples"
                ),
                "param": "training_file",
            }

        steps_per_epoch = max(1, math.ceil(examples / hyper["batch_size"]))
        job_id = self._new_id("ftjob")
        seed = params.get("seed")
        obj: dict[str, Any] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": dict(hyper),
            "model": model,
            "organization_id": ORGANIZATION,
            "result_files": [],
            "seed": seed if isinstance(seed, int) else 1000 + len(self._order),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": training["id"],
            "validation_file": validation["id"] if validation else None,
            "estimated_finish": None,
            "integrations": [],
            "metadata": metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": dict(hyper)}},
            "user_provided_suffix": suffix,
        }
        job = _Job(
            obj,
            examples,
            tokens,
            total_steps=hyper["n_epochs"] * steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            has_validation=validation is not None,
            fail_with=fail_with,
        )
        self._jobs[job_id] = job
        self._order.append(job_id)
        self._event(job, f"Created fine-tuning job: {job_id}")
        files = f"Validating training file: {training['id']}"
        if validation:
            files += f" and validation file: {validation['id']}"
        self._event(job, files)
        return obj

    def _list_jobs(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        # metadata[k]=v selects jobs whose metadata has k == v; metadata=null those without.
        wanted = {k[len("metadata[") : -1]: v for k, v in pairs if k.startswith("metadata[")}
        want_null = ("metadata", "null") in pairs
        if self.ignore_metadata_filter:
            wanted, want_null = {}, False
        if wanted and want_null:
            raise ApiError(400, "Do not combine metadata=null with metadata[k]=v", param="metadata")
        jobs = [self._jobs[j].obj for j in reversed(self._order)]  # newest first
        if want_null:
            jobs = [j for j in jobs if not j["metadata"]]
        elif wanted:
            jobs = [
                j for j in jobs if all((j["metadata"] or {}).get(k) == v for k, v in wanted.items())
            ]
        return _page(jobs, pairs, default_limit=20)

    def _cancel(self, job: _Job) -> dict[str, Any]:
        status = job.obj["status"]
        if status in TERMINAL:
            raise ApiError(400, f"Job {job.obj['id']} has already {_past(status)}.", param="id")
        job.obj.update(status="cancelled", finished_at=int(time.time()), estimated_finish=None)
        self._event(job, "Fine-tuning job cancelled")
        return job.obj

    # -- the job state machine (called with the lock held) ---------------------

    def _event(
        self,
        job: _Job,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        job.events.append(
            {
                "id": f"ftevent-fake{next(self._ids):06d}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data or {},
                "type": type,
            }
        )

    def _tick(self, job: _Job) -> None:
        obj = job.obj
        status = obj["status"]
        if status in TERMINAL:
            return
        job.ticks += 1
        if status == "validating_files" and job.ticks >= self.polls_per_stage:
            job.ticks = 0
            if job.fail_with is not None:
                self._fail(job, job.fail_with)
            else:
                obj["status"] = "queued"
                self._event(job, "Files validated, moving job to queued state")
        elif status == "queued" and job.ticks >= self.polls_per_stage:
            job.ticks = 0
            obj["status"] = "running"
            self._event(job, "Fine-tuning job started")
            obj["estimated_finish"] = int(time.time()) + 60 * self.running_polls
        elif status == "running":
            self._train(job)

    def _train(self, job: _Job) -> None:
        per_tick = math.ceil(job.total_steps / self.running_polls)
        for _ in range(per_tick):
            if job.step >= job.total_steps:
                break
            job.step += 1
            self._train_step(job, job.step)
        left = self.running_polls - job.ticks
        job.obj["estimated_finish"] = int(time.time()) + 60 * max(left, 0)
        if job.step >= job.total_steps:
            self._succeed(job)

    def _train_step(self, job: _Job, step: int) -> None:
        total = job.total_steps
        loss, accuracy = train_loss(step), train_accuracy(step)
        epoch_end = step % job.steps_per_epoch == 0
        valid = job.has_validation and epoch_end
        data: dict[str, Any] = {
            "step": step,
            "train_loss": loss,
            "total_steps": total,
            "train_mean_token_accuracy": accuracy,
        }
        message = f"Step {step}/{total}: training loss={loss:.4f}"
        row: dict[str, Any] = {
            "step": step,
            "train_loss": loss,
            "train_accuracy": accuracy,
            "valid_loss": "",
            "valid_mean_token_accuracy": "",
        }
        if valid:
            vloss, vacc = round(loss + 0.05, 4), round(accuracy - 0.02, 4)
            data.update(valid_loss=vloss, valid_mean_token_accuracy=vacc)
            row.update(valid_loss=vloss, valid_mean_token_accuracy=vacc)
            message += f", validation loss={vloss:.4f}"
        self._event(job, message, type="metrics", data=data)
        job.rows.append(row)
        if epoch_end:
            model = self._model_name(job)
            job.checkpoints.append(
                {
                    "id": f"ftckpt-fake{next(self._ids):06d}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": int(time.time()),
                    "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}",
                    "fine_tuning_job_id": job.obj["id"],
                    "metrics": {
                        "step": float(step),
                        "train_loss": loss,
                        "train_mean_token_accuracy": accuracy,
                        "valid_loss": data.get("valid_loss"),
                        "valid_mean_token_accuracy": data.get("valid_mean_token_accuracy"),
                    },
                    "step_number": step,
                }
            )
            self._event(job, f"Checkpoint created at step {step}")

    def _model_name(self, job: _Job) -> str:
        obj = job.obj
        short = obj["id"].removeprefix("ftjob-")
        suffix = obj.get("user_provided_suffix") or ""
        return f"ft:{obj['model']}:{ORGANIZATION}:{suffix}:{short}"

    def _succeed(self, job: _Job) -> None:
        obj = job.obj
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(job.rows)
        result = self._store_file(out.getvalue().encode(), "step_metrics.csv", "fine-tune-results")
        obj.update(
            status="succeeded",
            fine_tuned_model=self._model_name(job),
            finished_at=int(time.time()),
            trained_tokens=obj["hyperparameters"]["n_epochs"] * job.tokens,
            result_files=[result["id"]],
            estimated_finish=None,
        )
        self._event(job, f"New fine-tuned model created: {obj['fine_tuned_model']}")
        self._event(job, "The job has successfully completed")

    def _fail(self, job: _Job, error: dict[str, Any]) -> None:
        job.obj.update(
            status="failed",
            error=dict(error),
            finished_at=int(time.time()),
            estimated_finish=None,
        )
        self._event(job, error["message"], level="error")


# -- helpers -------------------------------------------------------------------


def _full_path(path: str) -> str:
    path = "/" + path.lstrip("/")
    return path if path.startswith("/v1/") or path == "/v1" else "/v1" + path


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
        message, type_, code = _DEFAULT_ERRORS.get(
            fault.status, (f"HTTP {fault.status}", "invalid_request_error", None)
        )
        payload = error_body(message, type=type_, code=code)
    reply = _json_reply(payload, fault.status)
    if fault.retry_after is not None:
        value = fault.retry_after
        reply.headers["Retry-After"] = str(int(value)) if float(value).is_integer() else str(value)
    return reply


def _page(
    items: list[dict[str, Any]], pairs: list[tuple[str, str]], *, default_limit: int
) -> dict[str, Any]:
    """Cursor pagination as OpenAI does it: ``after`` is the id of the last item seen."""
    query = dict(pairs)
    try:
        limit = int(query.get("limit", default_limit))
    except ValueError:
        raise ApiError(400, "limit must be an integer", param="limit") from None
    if limit < 1:
        raise ApiError(400, "limit must be at least 1", param="limit")
    start = 0
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"Invalid 'after' cursor: {after}", param="after")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items)}


def _hyperparameters(params: dict[str, Any]) -> dict[str, Any]:
    method = params.get("method")
    given: Any = params.get("hyperparameters") or {}
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise ApiError(400, "The fake only runs supervised fine-tuning", param="method")
        given = (method.get("supervised") or {}).get("hyperparameters") or {}
    if not isinstance(given, dict):
        raise ApiError(400, "hyperparameters must be an object", param="hyperparameters")
    unknown = set(given) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise ApiError(
            400, f"Unknown hyperparameter: {sorted(unknown)[0]}", param="hyperparameters"
        )
    out = {
        "n_epochs": given.get("n_epochs", "auto"),
        "batch_size": given.get("batch_size", "auto"),
        "learning_rate_multiplier": given.get("learning_rate_multiplier", "auto"),
    }
    limits = {"n_epochs": (1, 50), "batch_size": (1, 256)}
    for name, (low, high) in limits.items():
        value = out[name]
        if value != "auto" and (type(value) is not int or not low <= value <= high):
            raise ApiError(
                400, f"{name} must be 'auto' or an integer in [{low}, {high}]", param=name
            )
    lr = out["learning_rate_multiplier"]
    if lr != "auto" and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
        raise ApiError(
            400, "learning_rate_multiplier must be 'auto' or a positive number", param="lr"
        )
    # The real API resolves "auto" once it has looked at the data; the fake at once.
    if out["n_epochs"] == "auto":
        out["n_epochs"] = AUTO_EPOCHS
    if out["batch_size"] == "auto":
        out["batch_size"] = AUTO_BATCH_SIZE
    if lr == "auto":
        out["learning_rate_multiplier"] = AUTO_LR_MULTIPLIER
    return out


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise ApiError(400, "metadata must be an object of at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise ApiError(
                400,
                "metadata keys are at most 64 characters; values are strings of at most 512",
                param="metadata",
            )


def _as_error(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"code": "invalid_training_file", "message": spec, "param": "training_file"}
    return {
        "code": spec.get("code", "invalid_training_file"),
        "message": spec.get("message", "The job failed."),
        "param": spec.get("param"),
    }


def _echo(params: dict[str, Any]) -> str:
    """The default chat script: the model's name and the last user message."""
    users = [m for m in params["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    last = _text_of(users[-1]) if users else ""
    return f"[{params['model']}] {last}".strip()


def _past(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}[status]


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if content_type.startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            payload = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            fields[name] = FilePart(filename, payload) if filename else payload.decode()
        return fields
    return json.loads(body)


def _handler_for(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "FakeOpenAI/1.0"
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pool expects
        # Headers and body go out in two writes; with Nagle on, each reply waits ~40 ms
        # for the client's delayed ACK.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            fake._handle(self)

        def do_POST(self) -> None:
            fake._handle(self)

        def do_DELETE(self) -> None:
            fake._handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # every request is in fake.calls

    return Handler
