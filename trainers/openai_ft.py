"""OpenAI fine-tuning over the official SDK: upload, create once per run, poll, cancel.

No Slack and no storage here: the caller keeps the run id, the job id and the
last event id, and hands them back on the next call.

One idempotency key maps to at most one OpenAI job. The caller makes the key
unique to its installation and run (``tb3f…:r4``); the job carries it as
``metadata={"tunebot_key": key}``, and the uploaded training file is named
after it, so `find` and `find_file` can tell, after a crash or on another
poll, whether the job or the upload already happened. `start` looks first
and creates nothing if the job exists, so a restarted bot or a double click
never pays twice, and two installations on one OpenAI project never take
each other's jobs.

Retries. The SDK retries 408/409/429/5xx and connection errors itself
(``max_retries`` times; it waits for a ``Retry-After`` above 0 and up to 120 s,
and otherwise backs off from 0.5 s, so ``Retry-After: 0`` still waits) for
every call but job creation: openai 3.x sends no idempotency key, so a retried
create whose first attempt reached OpenAI would start a second paid job.
`start` therefore creates with SDK retries off and, before each retry of its
own, looks the run id up again.

``import openai`` costs about 1.5 s, so it happens inside the functions that
need it; importing this module stays cheap.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.errors import RunnerError

if TYPE_CHECKING:
    import openai
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
KEY_NAME = "tunebot_key"  # the metadata field holding the idempotency key
DEFAULT_BASE_URL = "https://api.openai.com/v1"

EVENT_PAGE_SIZE = 100
MAX_EVENT_PAGES = 20  # a first poll of a huge job returns the newest 2,000 events
MAX_JOBS_SCANNED = 1_000  # bound on the run-id lookup if the API ignored the filter
MAX_KEY = 64  # kept short: it also names the uploaded file (OpenAI allows 512 in metadata)
MAX_FILES_SCANNED = 2_000  # bound on the file-name lookup
MAX_SUFFIX = 64
MAX_CREATE_DELAY = 60.0  # longest Retry-After `start` waits between create attempts

_STEP_MESSAGE = re.compile(r"Step (\d+)/(\d+): training loss=([-+0-9.eE]+|nan|inf)")

_TRAINING_NOT_AVAILABLE = (
    "this organisation can no longer create fine-tuning jobs; OpenAI stops new jobs "
    "for everyone on 2027-01-06"
)


class OpenAIError(RunnerError, RuntimeError):
    """A refused or failed call to OpenAI, in OpenAI's words and in plain ones.

    ``message`` is OpenAI's own text; ``meaning`` says what it means for a
    tunebot user; ``retryable`` is true when trying again later may succeed
    (the SDK has already retried by the time this is raised).
    """

    def __init__(
        self,
        message: str,
        *,
        meaning: str,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        retryable: bool = False,
        request_id: str | None = None,
    ) -> None:
        head = f"OpenAI {status}" if status is not None else "OpenAI"
        if code:
            head += f" {code}"
        super().__init__(f"{meaning} ({head}: {message})", retryable=retryable)
        self.message = message
        self.meaning = meaning
        self.status = status
        self.code = code
        self.param = param
        self.retryable = retryable
        self.request_id = request_id

    @property
    def summary(self) -> str:
        """OpenAI's words, its code, and what they mean for a tunebot user."""
        text = self.message + (f" ({self.code})" if self.code else "")
        return f"{text}: {self.meaning}" if self.meaning else text


@dataclass(frozen=True)
class Job:
    """A fine-tuning job as `start` created or found it."""

    id: str
    status: str
    model: str
    training_file: str
    created_at: int
    validation_file: str | None = None
    reused: bool = False  # found for the key rather than created by this call


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as OpenAI wrote it."""

    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Event:
    id: str
    created_at: int
    level: str
    message: str
    type: str | None = None  # "message" or "metrics"
    data: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class JobState:
    """One poll of a job.

    ``events`` are those newer than the ``after_event_id`` given to `poll`,
    oldest first; pass ``last_event_id`` to the next poll. ``step``,
    ``total_steps`` and ``train_loss`` come from the newest metrics event seen
    (None when none was in reach: keep the previous poll's). ``metrics`` is
    (step, train_loss) for every step, from the result file, once succeeded.
    """

    job_id: str
    status: str
    model: str
    fine_tuned_model: str | None
    trained_tokens: int | None
    error: JobError | None
    events: tuple[Event, ...]
    last_event_id: str | None
    estimated_finish: int | None
    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    metrics: tuple[tuple[int, float], ...] = ()
    result_files: tuple[str, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def progress(self) -> float | None:
        """Fraction of steps done, 0..1, when known."""
        if self.status == "succeeded":
            return 1.0
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


class OpenAIFineTuner:
    """Upload, start, poll and cancel OpenAI fine-tuning jobs through an `openai.OpenAI`."""

    def __init__(self, client: openai.OpenAI) -> None:
        self._client = client
        self._create_client = client.with_options(max_retries=0)  # see the module docstring

    @classmethod
    def from_settings(
        cls,
        api_key: str,
        base_url: str | None = None,
        max_retries: int = 3,
        timeout: float = 60.0,
        before_request: Callable[[], None] | None = None,
    ) -> OpenAIFineTuner:
        """A tuner with its own client. An empty ``base_url`` means OpenAI's.

        The URL is always passed explicitly so the SDK does not read
        OPENAI_BASE_URL behind the settings' back. `before_request` is called
        before each HTTP request the SDK sends (its retries included); the bot
        lets acks go first there.
        """
        if not api_key:
            raise ValueError("api_key is empty: set OPENAI_API_KEY")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        import openai

        http_client = None
        if before_request is not None:
            http_client = openai.DefaultHttpx2Client(
                timeout=timeout, event_hooks={"request": [lambda request: before_request()]}
            )
        client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=max_retries,
            timeout=timeout,
            http_client=http_client,
        )
        return cls(client)

    # -- files -----------------------------------------------------------------

    def upload(
        self, path: str | Path, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> str:
        """Upload a file and return its id.

        ``filename`` is the name OpenAI shows (default: the path's). The
        fine-tuning API refuses names that do not end in ``.jsonl``, and
        content-addressed blobs have none, so one is added for ``fine-tune``.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no such file to upload: {path}")
        name = filename or path.name
        if purpose == "fine-tune" and not name.endswith(".jsonl"):
            name += ".jsonl"
        with _translated(), path.open("rb") as fh:
            # A seekable handle lets the SDK rewind it for a retry.
            return self._client.files.create(file=(name, fh), purpose=purpose).id  # type: ignore[arg-type]

    def delete_file(self, file_id: str) -> bool:
        """Delete an uploaded file; False if OpenAI had no such file."""
        if not file_id:
            raise ValueError("file_id is empty")
        import openai

        with _translated():
            try:
                return bool(self._client.files.delete(file_id).deleted)
            except openai.NotFoundError:
                return False

    # -- jobs ------------------------------------------------------------------

    @staticmethod
    def file_name(key: str, part: str = "train") -> str:
        """The name an upload for ``key`` carries, so `find_file` can find it again."""
        _check_key(key)
        return f"tunebot-{re.sub(r'[^A-Za-z0-9_-]', '-', key)}-{part}.jsonl"

    def find_file(self, key: str, part: str = "train", *, size: int | None = None) -> str | None:
        """The id of a fine-tune file already uploaded for ``key`` (newest), or None.

        ``size`` (bytes), when given, must match too: a half-written upload
        is not reused.
        """
        name = self.file_name(key, part)
        with _translated():
            files = self._client.files.list(purpose="fine-tune", limit=10_000, order="desc")
            for scanned, obj in enumerate(files):
                if obj.filename == name and (size is None or obj.bytes == size):
                    return obj.id
                if scanned + 1 >= MAX_FILES_SCANNED:
                    break
        return None

    def find(self, key: str) -> Job | None:
        """The newest job created for idempotency key ``key``, or None."""
        _check_key(key)
        with _translated():
            raw = self._find_raw(key)
        return _job(raw, reused=True) if raw is not None else None

    def create(
        self,
        key: str,
        model: str,
        training_file: str,
        *,
        validation_file: str | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr_multiplier: float | None = None,
        suffix: str | None = None,
        seed: int | None = None,
    ) -> Job:
        """Create the job for ``key`` from files already uploaded, once.

        Looks for the key before every retry of its own (the SDK's retries are
        off for this call), and returns the job found there instead.
        Raises ValueError for bad arguments and OpenAIError for refusals.
        """
        if not training_file:
            raise ValueError("training_file is empty")
        hyper = _check_job(key, model, epochs, batch_size, lr_multiplier, suffix, seed)
        params: dict[str, Any] = {
            "model": model,
            "training_file": training_file,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "metadata": {KEY_NAME: key},
        }
        if validation_file is not None:
            params["validation_file"] = validation_file
        if suffix is not None:
            params["suffix"] = suffix
        if seed is not None:
            params["seed"] = seed
        with _translated():
            return _job(self._create_once(key, params))

    def start(
        self,
        key: str,
        training_path: str | Path,
        model: str,
        *,
        validation_path: str | Path | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr_multiplier: float | None = None,
        suffix: str | None = None,
        seed: int | None = None,
    ) -> Job:
        """The job for ``key``: the existing one if any (``reused=True``), else a new one.

        Uploads the training (and validation) file named after the key, then
        `create`. Unset hyper-parameters are left to OpenAI ("auto"). A job
        that exists is returned whatever its status: a new attempt needs a
        new key. After a definite refusal the uploads are deleted.
        """
        _check_job(key, model, epochs, batch_size, lr_multiplier, suffix, seed)
        for name, value in (("training_path", training_path), ("validation_path", validation_path)):
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name}: no such file: {value}")

        existing = self.find(key)
        if existing is not None:
            return existing

        uploaded = [self.upload(training_path, filename=self.file_name(key))]
        if validation_path is not None:
            uploaded.append(self.upload(validation_path, filename=self.file_name(key, "eval")))
        try:
            return self.create(
                key,
                model,
                uploaded[0],
                validation_file=uploaded[1] if validation_path is not None else None,
                epochs=epochs,
                batch_size=batch_size,
                lr_multiplier=lr_multiplier,
                suffix=suffix,
                seed=seed,
            )
        except OpenAIError as err:
            if not err.retryable:
                # A definite refusal: no job uses the files, so don't leave them behind.
                # (After a retryable error a job may exist and need them.)
                for file_id in uploaded:
                    self._delete_quietly(file_id)
            raise

    def poll(self, job_id: str, *, after_event_id: str | None = None) -> JobState:
        """The job's status, the events since ``after_event_id`` and its progress."""
        if not job_id:
            raise ValueError("job_id is empty")
        with _translated():
            # Status first, events second: when the status is terminal the events
            # fetched afterwards include the last ones, and the caller stops polling.
            raw = self._client.fine_tuning.jobs.retrieve(job_id)
            fresh, progress = self._events_since(job_id, after_event_id)
            metrics: tuple[tuple[int, float], ...] = ()
            if raw.status == "succeeded":
                metrics = self._step_metrics(raw.result_files)
        step, total, loss = progress
        if metrics:
            step, loss = metrics[-1]
            total = total or step
        error = None
        if raw.error is not None and (raw.error.code or raw.error.message):
            error = JobError(raw.error.code or "", raw.error.message or "", raw.error.param)
        return JobState(
            job_id=raw.id,
            status=raw.status,
            model=raw.model,
            fine_tuned_model=raw.fine_tuned_model,
            trained_tokens=raw.trained_tokens,
            error=error,
            events=tuple(fresh),
            last_event_id=fresh[-1].id if fresh else after_event_id,
            estimated_finish=raw.estimated_finish,
            step=step,
            total_steps=total,
            train_loss=loss,
            metrics=metrics,
            result_files=tuple(raw.result_files or ()),
        )

    def cancel(self, job_id: str) -> Job:
        """Cancel a job. Cancelling one that has already ended returns it unchanged."""
        if not job_id:
            raise ValueError("job_id is empty")
        import openai

        with _translated():
            try:
                return _job(self._client.fine_tuning.jobs.cancel(job_id))
            except openai.BadRequestError:
                raw = self._client.fine_tuning.jobs.retrieve(job_id)
                if raw.status in TERMINAL:
                    return _job(raw)
                raise

    # -- plumbing --------------------------------------------------------------

    def _find_raw(self, key: str) -> FineTuningJob | None:
        jobs = self._client.fine_tuning.jobs.list(metadata={KEY_NAME: key}, limit=100)
        for scanned, raw in enumerate(jobs):  # newest first; the SDK follows `after`
            # Checked here too, in case an API without the filter returns every job.
            if (raw.metadata or {}).get(KEY_NAME) == key:
                return raw
            if scanned + 1 >= MAX_JOBS_SCANNED:
                break
        return None

    def _create_once(self, key: str, params: dict[str, Any]) -> FineTuningJob:
        import openai

        attempts = self._client.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._create_client.fine_tuning.jobs.create(**params)
            except (openai.APIStatusError, openai.APIConnectionError) as err:
                if attempt + 1 >= attempts or not _retryable(err):
                    raise
                delay = _retry_delay(err, attempt)
            # The failed attempt may have created the job (a 502 after the work,
            # a reply lost on the wire): look before creating again.
            time.sleep(delay)
            found = self._find_raw(key)
            if found is not None:
                return found
        raise AssertionError("unreachable")  # the loop returns or raises

    def _events_since(
        self, job_id: str, after_event_id: str | None
    ) -> tuple[list[Event], tuple[int | None, int | None, float | None]]:
        """Events newer than ``after_event_id``, oldest first, and the newest progress seen.

        OpenAI lists events newest first and its ``after`` cursor pages towards
        older ones, so new events are read from the top down to the known id.
        """
        fresh: list[Event] = []
        progress: tuple[int | None, int | None, float | None] = (None, None, None)
        first = self._client.fine_tuning.jobs.list_events(job_id, limit=EVENT_PAGE_SIZE)
        for number, page in enumerate(first.iter_pages()):
            reached = False
            for raw in page.data:
                if progress[0] is None:
                    # Read on past the known id: progress from an older event on
                    # a page already fetched beats none.
                    progress = _progress(raw)
                reached = reached or raw.id == after_event_id
                if not reached:
                    fresh.append(_event(raw))
            if reached or number + 1 >= MAX_EVENT_PAGES:
                break
        fresh.reverse()
        return fresh, progress

    def _step_metrics(self, result_files: list[str] | None) -> tuple[tuple[int, float], ...]:
        import openai

        for file_id in result_files or ():
            try:
                text = self._client.files.content(file_id).text
            except openai.NotFoundError:
                continue  # deleted since; the job's status still stands
            rows = parse_step_metrics(text)
            if rows:
                return rows
        return ()

    def _delete_quietly(self, file_id: str) -> None:
        # The refusal being reported matters more than a leftover file.
        with suppress(OpenAIError):
            self.delete_file(file_id)


def parse_step_metrics(text: str) -> tuple[tuple[int, float], ...]:
    """(step, train_loss) rows from a result file's CSV; rows without a loss are skipped."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"step", "train_loss"} <= set(reader.fieldnames):
        return ()
    rows: list[tuple[int, float]] = []
    for row in reader:
        try:
            rows.append((int(float(row["step"])), float(row["train_loss"])))
        except (TypeError, ValueError):
            continue
    return tuple(rows)


# -- helpers -------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("key is empty")
    if len(key) > MAX_KEY:
        raise ValueError(f"key is over {MAX_KEY} characters")


def _check_job(
    key: str,
    model: str,
    epochs: int | None,
    batch_size: int | None,
    lr_multiplier: float | None,
    suffix: str | None,
    seed: int | None,
) -> dict[str, Any]:
    """Check a job's arguments before any request; returns the hyper-parameters to send."""
    _check_key(key)
    if not model:
        raise ValueError("model is empty")
    hyper = _hyperparameters(epochs, batch_size, lr_multiplier)
    if suffix is not None and not 0 < len(suffix) <= MAX_SUFFIX:
        raise ValueError(f"suffix must be 1..{MAX_SUFFIX} characters, got {len(suffix)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return hyper


def _hyperparameters(
    epochs: int | None, batch_size: int | None, lr_multiplier: float | None
) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    for name, key, value in (
        ("epochs", "n_epochs", epochs),
        ("batch_size", "batch_size", batch_size),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        hyper[key] = value
    if lr_multiplier is not None:
        if isinstance(lr_multiplier, bool) or not isinstance(lr_multiplier, int | float):
            raise ValueError(f"lr_multiplier must be a number, got {lr_multiplier!r}")
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be positive, got {lr_multiplier!r}")
        hyper["learning_rate_multiplier"] = lr_multiplier
    return hyper


def _job(raw: FineTuningJob, *, reused: bool = False) -> Job:
    return Job(
        id=raw.id,
        status=raw.status,
        model=raw.model,
        training_file=raw.training_file,
        created_at=raw.created_at,
        validation_file=raw.validation_file,
        reused=reused,
    )


def _event(raw: FineTuningJobEvent) -> Event:
    data = raw.data if isinstance(raw.data, dict) else {}
    return Event(raw.id, raw.created_at, raw.level, raw.message, raw.type, dict(data))


def _progress(raw: FineTuningJobEvent) -> tuple[int | None, int | None, float | None]:
    """(step, total steps, train loss) from a metrics event, else (None, None, None)."""
    data = raw.data if isinstance(raw.data, dict) else {}
    try:
        if "step" in data and "train_loss" in data:
            total = data.get("total_steps")
            return (
                int(data["step"]),
                int(total) if total is not None else None,
                float(data["train_loss"]),
            )
    except (TypeError, ValueError):
        pass
    match = _STEP_MESSAGE.search(raw.message or "")
    if match:
        return int(match[1]), int(match[2]), float(match[3])
    return None, None, None


def _retryable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError):
        return True
    if isinstance(err, openai.APIStatusError):
        if err.status_code == 429:
            return _code(err) != "insufficient_quota"  # no credit: waiting won't help
        return err.status_code in (408, 409) or err.status_code >= 500
    return False


def _retry_delay(err: Exception, attempt: int) -> float:
    """Seconds to wait before create attempt ``attempt + 2``: Retry-After, else backoff."""
    response = getattr(err, "response", None)
    headers = response.headers if response is not None else {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if 0 <= value <= MAX_CREATE_DELAY:
            return value
    return min(0.5 * 2**attempt, 8.0)


def _code(err: Any) -> str | None:
    code = getattr(err, "code", None)
    return str(code) if code else None


def _meaning(status: int, code: str | None) -> tuple[str, bool]:
    """(plain words, retryable) for an HTTP error OpenAI answered."""
    if status == 403 and code == "training_not_available":
        return _TRAINING_NOT_AVAILABLE, False
    if status == 401:
        return "OpenAI rejected the API key: OPENAI_API_KEY is wrong, revoked or expired", False
    if status == 429 and code == "insufficient_quota":
        return "the OpenAI organisation is out of credit or over its spending limit", False
    if status == 429:
        return "rate limited by OpenAI even after retries; will retry at the next poll", True
    if status >= 500:
        return f"OpenAI is having trouble (HTTP {status}); will retry at the next poll", True
    if status in (408, 409):
        return "OpenAI timed out on the request; will retry at the next poll", True
    if status == 403:
        return "this API key may not do that: check its project and permissions", False
    if status == 404:
        return "OpenAI has no such job or file for this API key", False
    if status == 400:
        return "OpenAI refused the request as invalid", False
    return f"OpenAI answered HTTP {status}", False


def _status_error(err: openai.APIStatusError) -> OpenAIError:
    body = err.body if isinstance(err.body, dict) else {}
    message = body.get("message") if isinstance(body.get("message"), str) else None
    message = message or (err.response.text.strip() if err.response is not None else "")
    code = _code(err)
    meaning, retryable = _meaning(err.status_code, code)
    return OpenAIError(
        message or f"HTTP {err.status_code}",
        meaning=meaning,
        status=err.status_code,
        code=code,
        param=err.param,
        retryable=retryable,
        request_id=err.request_id,
    )


@contextmanager
def _translated() -> Iterator[None]:
    """Turn the SDK's exceptions into `OpenAIError`; nothing else is touched."""
    import openai

    try:
        yield
    except openai.APIStatusError as err:
        raise _status_error(err) from err
    except openai.APITimeoutError as err:
        raise OpenAIError(
            err.message,
            meaning="OpenAI did not answer in time; will retry at the next poll",
            retryable=True,
        ) from err
    except openai.APIConnectionError as err:
        raise OpenAIError(
            str(err.__cause__ or err.message),
            meaning="could not reach OpenAI (network, proxy or base URL); will retry at the next poll",
            retryable=True,
        ) from err
    except openai.APIError as err:
        raise OpenAIError(err.message, meaning="OpenAI sent an answer tunebot cannot read") from err
