"""Together AI fine-tuning over the official SDK, as a `trainers.runner.Runner`.

`TogetherRunner` uploads a validated chat JSONL, creates one job per
idempotency key (LoRA unless ``lora=False``), polls it, cancels it and
downloads its adapter or merged weights. No Slack and no storage here: the
caller keeps the handle and the event cursor and hands them back.

The key. Together's fine-tune create takes no metadata, and its suffix and
W&B run name are user-visible or need W&B, so the key rides on the uploaded
training file's name: ``tunebot-<key, made safe>-<10 hex of sha256(key)>-
train.jsonl`` (the hash keeps ``a:b`` and ``a-b`` apart). `find(key)` lists
the files, keeps those with that name, and returns the newest job in
``fine_tuning.list()`` whose ``training_file`` is one of them. `submit`
looks first and creates nothing when the job exists; an upload already made
for the key (same name and size, validated) is reused rather than sent again,
so a submission that died after its upload and is tried again still makes
one file and one job. Within one process, submissions for the same key run
one at a time (a lock per key); across processes the bot's claim on the run
keeps them apart.

Retries. The SDK (Stainless) retries 408/409/429/5xx and connection errors
itself, ``max_retries`` times, honouring a ``Retry-After`` of up to 60 s and
otherwise backing off from 1 s. It sends no idempotency key, so job creation
goes through a client with retries off: before each retry of its own,
`submit` looks the key up again and returns the job a lost reply created.
Errors reach the caller as `TogetherAPIError` (a `RunnerError`), retryable
for 408/409/429/5xx, timeouts and connection errors.

Routes used (together 3.x; see tests/fakes/together_api.py): ``POST
/v1/files`` (+ a PUT of the bytes to the presigned URL it answers and ``POST
/v1/files/<id>/preprocess``), ``GET /v1/files``, ``GET /v1/files/<id>``,
``GET /v1/fine-tunes/models/limits``, ``POST /v1/fine-tunes/estimate-price``,
``POST /v1/fine-tunes``, ``GET /v1/fine-tunes``, ``GET /v1/fine-tunes/<id>``,
``GET /v1/fine-tunes/<id>/events``, ``GET /v1/fine-tunes/<id>/metrics``,
``POST /v1/fine-tunes/<id>/cancel``, ``GET /v1/finetune/download``.

Price. Together states its own: `TogetherRunner.quote` asks the
estimate-price endpoint (USD, for an uploaded file), and a job reports
``total_price`` in nanodollars once its data is tokenized (`RunState.cost_usd`).
Together's docs give no per-model rates, only the formula (tokens = epochs x
training tokens + n_evals x validation tokens, the rate set by model size,
SFT/DPO and LoRA/full; https://docs.together.ai/docs/fine-tuning/pricing,
read 2026-11-30), so no rate table is kept here.

``import together`` costs about 2 s, so it happens inside the methods that
need it; importing this module stays cheap.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from trainers.runner import Handle, RunEvent, RunnerError, RunState, Step, TrainingSpec

if TYPE_CHECKING:
    import together

DEFAULT_BASE_URL = "https://api.together.ai"
MAX_KEY = 64  # it also names the uploaded file
MAX_SUFFIX = 40  # Together: "up to 40 character suffix"
NANODOLLARS = 1_000_000_000  # per USD: the unit of a job's total_price
MAX_CREATE_DELAY = 60.0  # longest Retry-After `submit` waits between create attempts
FILE_READY_TIMEOUT = 120.0  # seconds `submit` waits for an upload to be validated
FILE_READY_POLL = 1.0
METRIC_POINTS = 1_000  # at most this many (step, loss) points per poll
DOWNLOAD_KINDS = {"adapter": "adapter", "merged": "merged", "model": "model_output_path"}
# A download or an unpack stops before the disk holds less than this free (bytes), and
# an archive of more entries than this is refused: a decompression bomb fills nothing.
UNPACK_HEADROOM_BYTES = 1 << 30
UNPACK_MAX_MEMBERS = 100_000

# Together's job statuses (together.lib.types.fine_tuning.FinetuneJobStatus) as RunState's.
STATUSES: Mapping[str, str] = {
    "pending": "queued",
    "queued": "queued",
    "running": "running",
    "compressing": "running",
    "uploading": "running",
    "cancel_requested": "running",  # still billed until Together stops it
    "completed": "succeeded",
    "error": "failed",
    "user_error": "failed",
    "cancelled": "cancelled",
}
ENDED = frozenset({"completed", "error", "user_error", "cancelled"})
_FILE_PENDING = frozenset({"PENDING", "QUEUED", "RUNNING"})
_FILE_BAD = frozenset({"FAILED", "INVALID_FORMAT"})

_LOCKS: dict[str, threading.Lock] = {}  # one per key submitted in this process
_LOCKS_GUARD = threading.Lock()


class TogetherAPIError(RunnerError):
    """A refused or failed call to Together, with Together's own words.

    ``provider_message`` is Together's text (or the SDK's); ``status`` the
    HTTP status when there was an answer; ``retryable`` as in `RunnerError`.
    """

    def __init__(
        self,
        message: str,
        *,
        provider_message: str,
        status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.provider_message = provider_message
        self.status = status


@dataclass(frozen=True)
class Quote:
    """Together's price estimate for a spec (``POST /v1/fine-tunes/estimate-price``).

    ``total_usd``: the estimated price in USD. Token counts are Together's own
    (its tokenizer): training tokens already multiplied by the epochs, eval
    tokens by ``n_evals``. ``allowed``: Together thinks the account's credit
    covers it; ``limit_usd`` the account's limit. When Together cannot
    estimate (``available`` False), ``reason`` says why (e.g.
    ``train_file_not_validated``) and the numbers are None. ``files`` are the
    uploads made (or found) for the key; `submit` reuses them.
    """

    available: bool
    total_usd: float | None = None
    train_tokens: int | None = None
    eval_tokens: int | None = None
    allowed: bool | None = None
    limit_usd: float | None = None
    reason: str | None = None
    files: tuple[str, ...] = ()


class TogetherRunner:
    """Train on Together AI through a `together.Together`; see the module docstring."""

    name: ClassVar[str] = "together"

    def __init__(
        self,
        client: together.Together,
        *,
        file_ready_timeout: float = FILE_READY_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._create_client = client.with_options(max_retries=0)  # see the module docstring
        self._file_ready_timeout = file_ready_timeout
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls,
        api_key: str,
        base_url: str | None = None,
        before_request: Callable[[], None] | None = None,
        *,
        max_retries: int = 2,
        timeout: float = 60.0,
    ) -> TogetherRunner:
        """A runner with its own client. An empty ``base_url`` means Together's.

        The URL is always passed explicitly so the SDK does not read
        TOGETHER_BASE_URL behind the settings' back. ``before_request`` is
        called before each HTTP request the client sends (retries and the
        upload's PUT included); the bot lets acks go first there. ``timeout``
        is seconds per request.
        """
        if not api_key:
            raise ValueError("api_key is empty: set TOGETHER_API_KEY")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        import together

        http_client = None
        if before_request is not None:
            http_client = together.DefaultHttpxClient(
                timeout=timeout, event_hooks={"request": [lambda request: before_request()]}
            )
        client = together.Together(
            api_key=api_key,
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=max_retries,
            timeout=timeout,
            http_client=http_client,
        )
        return cls(client)

    # -- the Runner interface --------------------------------------------------

    def submit(self, spec: TrainingSpec, key: str, *, step: Step | None = None) -> Handle:
        """The job for ``key``: the existing one (``reused=True``), else upload and create once.

        Uploads the training (and eval) file named after the key, or reuses an
        upload already made for it; then creates the job with SDK retries off,
        looking the key up before each retry of its own. ``step`` is called
        with ("uploaded", file id) per file and ("created", job id); it may
        raise to stop here. Raises `RunnerError` for a spec Together cannot
        take (before any request) and `TogetherAPIError` for refusals.
        """
        _check_key(key)
        arguments = create_arguments(spec)
        _check_files(spec)
        with _key_lock(key):
            found = self.find(key)
            if found is not None:
                return found
            files = self._files(spec, key, step)
            with _translated():
                limits = self._client.fine_tuning.model_limits(model_name=spec.model)
                arguments.update(training_file=files[0], model_limits=limits)
                if len(files) > 1:
                    arguments["validation_file"] = files[1]
                raw = self._create_once(key, arguments)
            if step is not None:
                step("created", raw.id)
            return Handle(self.name, raw.id, files=tuple(files))

    def find(self, key: str) -> Handle | None:
        """The newest job whose training file was uploaded for ``key``, or None."""
        _check_key(key)
        with _translated():
            raw = self._find_raw(key)
        if raw is None:
            return None
        files = tuple(f for f in (raw.training_file, raw.validation_file) if f)
        return Handle(self.name, raw.id, reused=True, files=files)

    def poll(self, handle: Handle, *, cursor: str | None = None) -> RunState:
        """Where the job stands: status, the events after ``cursor``, progress, cost.

        Together lists a job's events oldest first and without paging, so the
        cursor is the number of events already seen (``"0"`` or None: all).
        Progress: ``step`` / ``total_steps`` from the job (its
        ``steps_completed`` / ``total_steps``, else the newest event that has
        them), ``metrics`` (step, training loss) from ``/metrics`` (at most
        `METRIC_POINTS`, evenly spread), ``train_loss`` the newest of those.
        ``error`` is the message of the newest ``job_error`` event.
        ``trained_tokens`` is Together's ``token_count`` and ``cost_usd`` its
        ``total_price``, once known.
        """
        _check_handle(handle)
        seen = _parse_cursor(cursor)
        with _translated():
            # Status first: when it is final, the events read next include the last ones.
            raw = self._client.fine_tuning.retrieve(handle.id)
            events = list(self._client.fine_tuning.list_events(handle.id).data or ())
            rows: list[Mapping[str, float]] = []
            if raw.status not in ("pending", "queued"):
                got = self._client.fine_tuning.list_metrics(handle.id, resolution=METRIC_POINTS)
                rows = list(got.metrics or ())
        status = STATUSES.get(raw.status, "running")  # an unknown status is taken as live
        fresh = tuple(
            _event(handle.id, index, raw_event)
            for index, raw_event in enumerate(events)
            if index >= seen
        )
        metrics = _loss_points(rows)
        step, total = _steps(raw, events, metrics)
        error = None
        if status == "failed":
            error = _failure(events) or f"Together ended the job with status {raw.status!r}"
        output: dict[str, Any] = {}
        if status == "succeeded" and raw.x_model_output_name:
            output["fine_tuned_model"] = raw.x_model_output_name
        tokens = raw.token_count if raw.token_count else None
        cost = None
        if raw.total_price is not None and (raw.total_price > 0 or raw.status in ENDED):
            cost = raw.total_price / NANODOLLARS
        return RunState(
            status=status,
            step=step,
            total_steps=total,
            train_loss=metrics[-1][1] if metrics else None,
            events=fresh,
            cursor=str(max(len(events), seen)),
            metrics=metrics,
            error=error,
            output=output,
            trained_tokens=tokens,
            cost_usd=cost,
        )

    def cancel(self, handle: Handle) -> None:
        """Ask Together to stop the job; one that has ended (or is stopping) is left as it is."""
        _check_handle(handle)
        import together

        settled = ENDED | {"cancel_requested"}
        with _translated():
            if self._client.fine_tuning.retrieve(handle.id).status in settled:
                return
            try:
                self._client.fine_tuning.cancel(handle.id)
            except together.BadRequestError:
                # It may have ended between the two calls.
                if self._client.fine_tuning.retrieve(handle.id).status in settled:
                    return
                raise

    def delete_file(self, file_id: str) -> bool:
        """Delete an uploaded file; False when Together no longer has it."""
        import together

        with _translated():
            try:
                self._client.files.delete(file_id)
            except together.NotFoundError:
                return False
        return True

    # -- beyond the interface --------------------------------------------------

    def quote(self, spec: TrainingSpec, key: str) -> Quote:
        """Together's price estimate for ``spec``, after uploading its files for ``key``.

        Uploading is free on Together and `submit` reuses these uploads, so a
        quote before approval costs one upload, not two. Raises as `submit`.
        """
        _check_key(key)
        arguments = create_arguments(spec)
        _check_files(spec)
        with _key_lock(key):
            files = self._files(spec, key, None)
        training_type: dict[str, Any] = {"type": "Full"}
        with _translated():
            if arguments["lora"]:
                rank = arguments.get("lora_r")
                if rank is None:
                    limits = self._client.fine_tuning.model_limits(model_name=spec.model)
                    rank = limits.lora_training.default_rank
                alpha = arguments.get("lora_alpha") or 2 * rank
                training_type = {"type": "Lora", "lora_r": rank, "lora_alpha": int(alpha)}
            method: dict[str, Any] = {"method": arguments["training_method"]}
            if method["method"] == "sft":
                method["train_on_inputs"] = arguments["train_on_inputs"]
            extra: dict[str, Any] = {}
            if len(files) > 1:
                extra["validation_file"] = files[1]
            raw = self._client.fine_tuning.estimate_price(
                training_file=files[0],
                model=spec.model,
                n_epochs=arguments.get("n_epochs", 1),
                n_evals=arguments.get("n_evals", 0),
                training_method=method,  # type: ignore[arg-type]
                training_type=training_type,  # type: ignore[arg-type]
                **extra,
            )
        if raw.estimation_available is False:
            return Quote(False, reason=raw.unavailable_reason, files=tuple(files))
        return Quote(
            True,
            total_usd=raw.estimated_total_price,
            train_tokens=_int_or_none(raw.estimated_train_token_count),
            eval_tokens=_int_or_none(raw.estimated_eval_token_count),
            allowed=raw.allowed_to_proceed,
            limit_usd=raw.user_limit,
            files=tuple(files),
        )

    def download(
        self,
        handle: Handle,
        dest: str | Path,
        kind: str = "adapter",
        *,
        max_bytes: int | None = None,
    ) -> Path:
        """Download a completed job's weights into directory ``dest``; returns the archive.

        ``kind``: ``adapter`` (the LoRA adapter), ``merged`` (base model with
        the adapter fused in; LoRA jobs whose model Together merges) or
        ``model`` (a full fine-tune's weights). The archive is written to a
        temporary file in ``dest`` and renamed when whole, as
        ``<output name>-<kind>.tar.zst`` (or ``.tar.gz`` / ``.tar``, by its
        first bytes); `unpack` opens it. An archive longer than ``max_bytes``
        (default: the free space of ``dest``'s disk less ``UNPACK_HEADROOM_BYTES``)
        is abandoned part-way and its temporary file removed. Raises `RunnerError`
        for a job that has not completed, a kind it does not have, or an archive
        over ``max_bytes``.
        """
        _check_handle(handle)
        if kind not in DOWNLOAD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(DOWNLOAD_KINDS)}, not {kind!r}")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with _translated():
            raw = self._client.fine_tuning.retrieve(handle.id)
        if raw.status != "completed":
            raise RunnerError(
                f"Together job {handle.id} is {raw.status}; only a completed job has weights"
            )
        full = getattr(raw.training_type, "type", None) == "Full"
        if full != (kind == "model"):
            have = "model" if full else "adapter or merged"
            raise RunnerError(f"Together job {handle.id} has {have} weights, not {kind!r}")
        if max_bytes is None:
            max_bytes = max(shutil.disk_usage(dest).free - UNPACK_HEADROOM_BYTES, 0)
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".together-download-")
        tmp = Path(tmp_name)
        head = b""
        written = 0
        try:
            with os.fdopen(fd, "wb") as out, _translated():
                content = self._client.fine_tuning.with_streaming_response.content
                with content(ft_id=handle.id, checkpoint=DOWNLOAD_KINDS[kind]) as response:  # type: ignore[arg-type]
                    for chunk in response.iter_bytes():
                        if len(head) < 8:
                            head += chunk[: 8 - len(head)]
                        written += len(chunk)
                        if written > max_bytes:
                            raise RunnerError(
                                f"Together's archive for job {handle.id} is over "
                                f"{max_bytes / 1e9:,.1f} GB, more than there is room for; "
                                "not downloaded"
                            )
                        out.write(chunk)
            if not head:
                raise RunnerError(f"Together sent an empty archive for job {handle.id}")
            final = dest / f"{_safe(raw.x_model_output_name or handle.id)}-{kind}{_suffix(head)}"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    # -- plumbing --------------------------------------------------------------

    def _files(self, spec: TrainingSpec, key: str, step: Step | None) -> list[str]:
        """Training (and eval) file ids for ``key``: found again, else uploaded."""
        files: list[str] = []
        for part, path in (("train", spec.train_file), ("eval", spec.eval_file)):
            if path is None:
                continue
            file_id = self._find_file(key, part, Path(path)) or self._upload(
                Path(path), file_name(key, part)
            )
            files.append(file_id)
            if step is not None:
                step("uploaded", file_id)
        return files

    def _find_file(self, key: str, part: str, path: Path) -> str | None:
        """A validated upload for ``key`` of this size (newest), or None.

        An upload whose bytes all arrived but whose last step (``POST
        /v1/files/<id>/preprocess``, Together's validation) never came — the
        process that sent it died in between — is finished here instead of
        sent again; one Together cannot finish (a checksum mismatch) is skipped.
        """
        name, size = file_name(key, part), path.stat().st_size
        with _translated():
            listed = self._client.files.list().data or ()
        mine = sorted(
            (
                f
                for f in listed
                if f.filename == name and f.bytes == size and f.purpose == "fine-tune"
            ),
            key=lambda f: f.created_at,
            reverse=True,
        )
        done = [f for f in mine if f.processing_status in (None, "COMPLETED")]
        if done:
            return done[0].id
        for stalled in (f for f in mine if f.processing_status == "PENDING"):
            try:
                return self._ready(stalled.id, self._preprocess(stalled.id))
            except TogetherAPIError as err:
                if err.retryable:
                    raise
        return None

    def _preprocess(self, file_id: str) -> str | None:
        """The upload's last step, as ``files.upload`` sends it; the status it answers."""
        from together.types import FileResponse

        with _translated():
            answer = self._client.post(f"/v1/files/{file_id}/preprocess", cast_to=FileResponse)
        return answer.processing_status

    def _upload(self, path: Path, name: str) -> str:
        """Upload ``path`` as ``name`` and wait until Together has validated it."""
        import together

        # The SDK names the upload after the local path: give it one with our name.
        with tempfile.TemporaryDirectory(prefix="tunebot-together-") as tmp:
            alias = Path(tmp) / name
            try:
                alias.symlink_to(path.resolve())
            except OSError:
                shutil.copyfile(path, alias)
            with _translated():
                try:
                    uploaded = self._client.files.upload(alias, purpose="fine-tune", check=True)
                except together.FileTypeError as err:
                    raise TogetherAPIError(
                        f"the together SDK refused the file before upload: {err}",
                        provider_message=str(err),
                    ) from err
        return self._ready(uploaded.id, uploaded.processing_status)

    def _ready(self, file_id: str, status: str | None) -> str:
        deadline = time.monotonic() + self._file_ready_timeout
        with _translated():
            while status in _FILE_PENDING:
                if time.monotonic() >= deadline:
                    raise RunnerError(
                        f"Together is still validating file {file_id}; will retry", retryable=True
                    )
                self._sleep(FILE_READY_POLL)
                status = self._client.files.retrieve(file_id).processing_status
            if status in _FILE_BAD:
                report = self._client.files.retrieve(file_id).validation_report
                said = (report.error if report is not None else None) or status
                raise TogetherAPIError(
                    f"Together rejected the training data: {said}", provider_message=said
                )
        return file_id

    def _find_raw(self, key: str) -> Any:
        name = file_name(key, "train")
        ids = {f.id for f in self._client.files.list().data or () if f.filename == name}
        if not ids:
            return None
        jobs = [j for j in self._client.fine_tuning.list().data or () if j.training_file in ids]
        return max(jobs, key=lambda j: j.created_at) if jobs else None

    def _create_once(self, key: str, arguments: dict[str, Any]) -> Any:
        import together

        attempts = self._client.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._create_client.fine_tuning.create(**arguments)
            except (together.APIStatusError, together.APIConnectionError) as err:
                if attempt + 1 >= attempts or not _retryable(err):
                    raise
                delay = _retry_delay(err, attempt)
            # The failed attempt may have created the job (a 502 after the work,
            # a reply lost on the wire): look before creating again.
            self._sleep(delay)
            found = self._find_raw(key)
            if found is not None:
                return found
        raise AssertionError("unreachable")  # the loop returns or raises


# -- the spec, as fine_tuning.create's arguments ---------------------------------

# TrainingSpec.hyperparameters name -> fine_tuning.create's argument.
HYPERPARAMETERS: Mapping[str, str] = {
    "epochs": "n_epochs",
    "batch": "batch_size",
    "lr": "learning_rate",
    "r": "lora_r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "lora_trainable_modules",
    "max_length": "max_seq_length",
    "n_evals": "n_evals",
    "n_checkpoints": "n_checkpoints",
    "warmup_ratio": "warmup_ratio",
    "seed": "random_seed",
    "train_on_inputs": "train_on_inputs",
    "beta": "dpo_beta",
    "lora": "lora",
    "method": "training_method",
}
_LORA_ONLY = ("r", "alpha", "dropout", "targets")


def create_arguments(spec: TrainingSpec) -> dict[str, Any]:
    """``fine_tuning.create`` keyword arguments for ``spec``, files and model limits aside.

    Hyper-parameters (`HYPERPARAMETERS` gives the mapping): ``epochs`` (1+),
    ``batch`` (1+ or ``"max"``), ``lr`` (> 0), ``lora`` (bool, default True),
    ``r`` (1+), ``alpha`` (> 0), ``dropout`` (0 <= x < 1), ``targets`` (module
    names, a list or a comma-separated string), ``max_length`` (tokens),
    ``n_evals`` (0+; 1 by default when there is an eval file, so it is used),
    ``n_checkpoints`` (1+), ``warmup_ratio`` (0..1), ``seed``,
    ``train_on_inputs`` (bool or ``"auto"``, the default), ``method``
    (``"sft"``, the default, or ``"dpo"``) and ``beta`` (DPO only). None is
    Together's default. Raises `RunnerError` (not retryable) naming the
    first value Together cannot take, before any request.
    """
    if not spec.model:
        raise RunnerError("model is empty")
    hyper = {k: v for k, v in spec.hyperparameters.items() if v is not None}
    unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
    if unknown:
        raise RunnerError(f"Together does not take the hyper-parameter(s) {', '.join(unknown)}")
    lora = hyper.get("lora", True)
    if not isinstance(lora, bool):
        raise RunnerError(f"lora must be true or false, not {lora!r}")
    if not lora:
        given = [name for name in _LORA_ONLY if name in hyper]
        if given:
            raise RunnerError(f"{', '.join(given)} apply to LoRA only; lora is false")
    method = hyper.get("method", "sft")
    if method not in ("sft", "dpo"):
        raise RunnerError(f"method must be 'sft' or 'dpo', not {method!r}")
    if "beta" in hyper and method != "dpo":
        raise RunnerError("beta applies to method=dpo only")
    out: dict[str, Any] = {"model": spec.model, "lora": lora, "training_method": method}
    for name, value in hyper.items():
        if name in ("lora", "method"):
            continue
        out[HYPERPARAMETERS[name]] = _checked(name, value)
    if method == "sft":
        out.setdefault("train_on_inputs", "auto")
    elif "train_on_inputs" in out:
        raise RunnerError("train_on_inputs applies to method=sft only")
    if spec.eval_file is None and out.get("n_evals"):
        raise RunnerError("n_evals needs an eval file")
    if spec.eval_file is not None:
        out.setdefault("n_evals", 1)
    if spec.suffix is not None:
        if not 0 < len(spec.suffix) <= MAX_SUFFIX:
            raise RunnerError(f"suffix must be 1..{MAX_SUFFIX} characters, got {len(spec.suffix)}")
        out["suffix"] = spec.suffix
    return out


def _checked(name: str, value: Any) -> Any:
    def integer(low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RunnerError(f"{name} must be an integer of at least {low}, not {value!r}")
        return value

    def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise RunnerError(f"{name} must be a number in the allowed range, not {value!r}")
        return float(value)

    if name == "batch":
        return value if value == "max" else integer(1)
    if name in ("epochs", "r", "max_length", "n_checkpoints"):
        return integer(1)
    if name == "n_evals":
        return integer(0)
    if name == "seed":
        return integer(0)
    if name in ("lr", "alpha", "beta"):
        return number(0, math.inf, low_open=True, high_open=True)
    if name == "dropout":
        return number(0, 1, high_open=True)
    if name == "warmup_ratio":
        return number(0, 1)
    if name == "targets":
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)
        raise RunnerError(f"targets must be module names, not {value!r}")
    if name == "train_on_inputs":
        if isinstance(value, bool) or value == "auto":
            return value
        raise RunnerError(f"train_on_inputs must be true, false or 'auto', not {value!r}")
    raise AssertionError(name)  # every other name is handled by create_arguments


# -- files and archives ------------------------------------------------------------


def file_name(key: str, part: str = "train") -> str:
    """The name an upload for ``key`` carries: readable, unique per key, ``.jsonl``."""
    _check_key(key)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"tunebot-{_safe(key)}-{digest}-{part}.jsonl"


def unpack(
    archive: str | Path,
    into: str | Path,
    *,
    max_bytes: int | None = None,
    max_members: int = UNPACK_MAX_MEMBERS,
) -> Path:
    """Extract a downloaded archive into directory ``into``; returns ``into``.

    ``.tar.gz`` and ``.tar`` use the standard library; ``.tar.zst`` (what
    Together usually sends) needs the ``zstandard`` package. Members that
    would land outside ``into`` (absolute paths, ``..``, links out) are
    refused (tarfile's ``data`` filter). An archive that unpacks to more than
    ``max_bytes`` bytes (default: the free space of ``into``'s disk less
    ``UNPACK_HEADROOM_BYTES``, so a decompression bomb cannot fill the disk)
    or holds more than ``max_members`` entries is refused as it is read: what
    was written stays in ``into`` (the caller removes it). Raises `RunnerError`.
    """
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    if max_bytes is None:
        max_bytes = max(shutil.disk_usage(into).free - UNPACK_HEADROOM_BYTES, 0)
    seen = {"bytes": 0, "members": 0}

    def guard(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        checked = tarfile.data_filter(member, path)
        seen["members"] += 1
        seen["bytes"] += checked.size if checked.isfile() else 0
        if seen["members"] > max_members:
            raise RunnerError(
                f"{archive.name} holds more than {max_members:,} entries; not unpacked"
            )
        if seen["bytes"] > max_bytes:
            raise RunnerError(
                f"{archive.name} unpacks to more than {max_bytes / 1e9:,.1f} GB, more than "
                "there is room for; not unpacked"
            )
        return checked

    try:
        if archive.name.endswith(".tar.zst"):
            try:
                import zstandard
            except ImportError:
                raise RunnerError(
                    f"{archive.name} is zstd-compressed: install the zstandard package to unpack it"
                ) from None
            with (
                archive.open("rb") as raw,
                zstandard.ZstdDecompressor().stream_reader(raw) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                tar.extractall(into, filter=guard)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter=guard)
    except (tarfile.TarError, OSError) as err:
        raise RunnerError(f"could not unpack {archive.name}: {err}") from err
    return into


def _suffix(head: bytes) -> str:
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return ".tar.zst"
    if head.startswith(b"\x1f\x8b"):
        return ".tar.gz"
    return ".tar"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


# -- helpers -------------------------------------------------------------------------


def _key_lock(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("key is empty")
    if len(key) > MAX_KEY:
        raise ValueError(f"key is over {MAX_KEY} characters")


def _check_handle(handle: Handle) -> None:
    if handle.runner != TogetherRunner.name or not handle.id:
        raise ValueError(f"not a Together job handle: {handle!r}")


def _check_files(spec: TrainingSpec) -> None:
    for label, path in (("train_file", spec.train_file), ("eval_file", spec.eval_file)):
        if path is not None and not Path(path).is_file():
            raise RunnerError(f"{label}: no such file: {path}")


def _parse_cursor(cursor: str | None) -> int:
    if cursor is None or cursor == "":
        return 0
    if not cursor.isdigit():
        raise ValueError(f"not a Together event cursor: {cursor!r}")
    return int(cursor)


def _unix(stamp: Any) -> int:
    if isinstance(stamp, dt.datetime):
        return int(stamp.timestamp())
    if isinstance(stamp, str) and stamp:
        with suppress(ValueError):
            parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            return int(parsed.timestamp())
    return 0


def _event(job_id: str, index: int, raw: Any) -> RunEvent:
    level = str(raw.level or "info")
    if "error" in level or raw.type == "job_error":
        level = "error"
    elif "warning" in level or raw.type == "warning":
        level = "warning"
    else:
        level = "info"
    return RunEvent(f"{job_id}:{index}", _unix(raw.created_at), raw.message or "", level)


def _failure(events: list[Any]) -> str | None:
    for raw in reversed(events):
        if (raw.type == "job_error" or raw.level == "error") and raw.message:
            return raw.message
    return None


def _loss_points(rows: list[Mapping[str, Any]]) -> tuple[tuple[int, float], ...]:
    points: dict[int, float] = {}
    for row in rows:
        step, loss = row.get("train/global_step"), row.get("train/loss")
        if isinstance(step, int | float) and isinstance(loss, int | float) and math.isfinite(loss):
            points[int(step)] = float(loss)
    return tuple(sorted(points.items()))


def _steps(
    raw: Any, events: list[Any], metrics: tuple[tuple[int, float], ...]
) -> tuple[int | None, int | None]:
    step = _int_or_none(getattr(raw, "steps_completed", None))
    total = _int_or_none(getattr(raw, "total_steps", None))
    for event in reversed(events):
        if step is None and event.step is not None:
            step = event.step
        if total is None and event.total_steps is not None:
            total = event.total_steps
    if metrics and (step is None or metrics[-1][0] > step):
        step = metrics[-1][0]
    if not total:
        total = None
    if step is not None and raw.status == "completed" and total:
        step = max(step, total)
    return step, total


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _retryable(err: Exception) -> bool:
    import together

    if isinstance(err, together.APIConnectionError):
        return True
    if isinstance(err, together.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
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
    return min(1.0 * 2**attempt, 10.0)


def _provider_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
        if isinstance(body.get("message"), str):
            return body["message"]
    if isinstance(body, str) and body.strip():
        return body.strip()
    return str(getattr(err, "message", "") or err)


def _status_error(err: Any) -> TogetherAPIError:
    status = err.status_code
    said = _provider_message(err)
    retryable = status in (408, 409, 429) or status >= 500
    if status == 401:
        meaning = "Together rejected the API key: TOGETHER_API_KEY is wrong, revoked or expired"
    elif status == 429:
        meaning = "rate limited by Together even after retries; will retry at the next poll"
    elif status >= 500:
        meaning = f"Together is having trouble (HTTP {status}); will retry at the next poll"
    elif retryable:
        meaning = f"Together asked to try again later (HTTP {status})"
    elif status == 404:
        meaning = "Together has no such job, file or model for this API key"
    elif status == 402:
        meaning = "the Together account is out of credit"
    else:
        meaning = f"Together refused the request (HTTP {status})"
    return TogetherAPIError(
        f"{meaning}: {said}", provider_message=said, status=status, retryable=retryable
    )


@contextmanager
def _translated() -> Iterator[None]:
    """Turn the SDK's exceptions (and its ValueErrors) into `TogetherAPIError`."""
    import together

    try:
        yield
    except RunnerError:
        raise
    except together.APIStatusError as err:
        raise _status_error(err) from err
    except together.APIConnectionError as err:
        said = str(err.__cause__ or err.message)
        raise TogetherAPIError(
            f"could not reach Together (network, proxy or base URL); will retry: {said}",
            provider_message=said,
            retryable=True,
        ) from err
    except together.APIError as err:
        raise TogetherAPIError(
            f"Together sent an answer tunebot cannot read: {err.message}",
            provider_message=err.message,
        ) from err
    except together.TogetherError as err:  # the SDK's own checks (file type, download)
        raise TogetherAPIError(
            f"the together SDK refused: {err}", provider_message=str(err)
        ) from err
    except ValueError as err:  # the SDK checks arguments against the model's limits
        raise TogetherAPIError(
            f"Together cannot train this model so: {err}", provider_message=str(err)
        ) from err
