"""OpenAI fine-tuning as a Runner (trainers.runner): the bot's view of `OpenAIFineTuner`.

`submit` looks for the key's job first, then for an upload named after the
key, uploads the training file only when there is none, and creates the
job once (see trainers.openai_ft for how creation is kept to one). Statuses
map onto the Runner's: ``validating_files`` and ``queued`` are queued,
``running`` is running, the rest are as OpenAI names them.
"""

from __future__ import annotations

from typing import ClassVar

from trainers.openai_ft import Job, JobState, OpenAIFineTuner
from trainers.runner import STATUSES, Handle, RunEvent, RunState, Step, TrainingSpec

_STATUS = {"validating_files": "queued", "queued": "queued", "running": "running"}


class OpenAIRunner:
    """Runner over one `OpenAIFineTuner`. Raises OpenAIError (a RunnerError)."""

    name: ClassVar[str] = "openai"

    def __init__(self, tuner: OpenAIFineTuner) -> None:
        self.tuner = tuner

    def find(self, key: str) -> Handle | None:
        job = self.tuner.find(key)
        return None if job is None else _handle(job)

    def submit(self, spec: TrainingSpec, key: str, *, step: Step | None = None) -> Handle:
        """The key's job: found, or created from one upload of `spec.train_file`.

        `step` hears ("uploading", file name) before an upload, ("uploaded", file
        id) once the file is there (found or uploaded), and ("creating", file id)
        before the job is created; it may raise to stop there.
        """
        step = step or _nothing
        found = self.find(key)
        if found is not None:
            return found
        name = self.tuner.file_name(key)
        file_id = self.tuner.find_file(key, size=spec.train_file.stat().st_size)
        if file_id is None:
            step("uploading", name)
            file_id = self.tuner.upload(spec.train_file, filename=name)
        step("uploaded", file_id)
        step("creating", file_id)
        hp = spec.hyperparameters
        job = self.tuner.create(
            key,
            spec.model,
            file_id,
            epochs=hp.get("epochs"),
            batch_size=hp.get("batch"),
            lr_multiplier=hp.get("lr_mult"),
            suffix=spec.suffix,
        )
        return _handle(job)

    def poll(self, handle: Handle, *, cursor: str | None = None) -> RunState:
        return run_state(self.tuner.poll(handle.id, after_event_id=cursor))

    def cancel(self, handle: Handle) -> None:
        self.tuner.cancel(handle.id)

    def delete_file(self, file_id: str) -> bool:
        return self.tuner.delete_file(file_id)


def run_state(state: JobState) -> RunState:
    """One OpenAI poll in the Runner's terms."""
    error = None
    if state.error is not None:
        error = state.error.message or state.error.code or "the job failed"
    output = {"fine_tuned_model": state.fine_tuned_model} if state.fine_tuned_model else {}
    return RunState(
        status=_status(state.status),
        step=state.step,
        total_steps=state.total_steps,
        train_loss=state.train_loss,
        events=tuple(
            RunEvent(id=e.id, created_at=e.created_at, message=e.message, level=e.level)
            for e in state.events
        ),
        cursor=state.last_event_id,
        metrics=state.metrics,
        error=error,
        output=output,
        trained_tokens=state.trained_tokens,
        estimated_finish=state.estimated_finish,
    )


def _status(status: str) -> str:
    if status in STATUSES:
        return status
    return _STATUS.get(status, "running")  # a status newer than this code: still going


def _handle(job: Job) -> Handle:
    return Handle(
        runner=OpenAIRunner.name,
        id=job.id,
        reused=job.reused,
        files=(job.training_file,),
        status=_status(job.status),
    )


def _nothing(what: str, value: str) -> None:
    pass
