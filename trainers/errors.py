"""The exceptions trainers/ raises on purpose, under one base.

Catch `TrainerError` for "anything the ML side refused or could not do"; each
also keeps the built-in base it always had, so existing `except ValueError`
and `except RuntimeError` still hold. Each message is one line, worded for a
person, with no server path.

    TrainerError
    ├── UnknownModel (ValueError)          trainers.pricing: not in the price table
    ├── RetiredModel (ValueError)          trainers.pricing: the provider no longer trains it
    ├── TokenizerUnavailable (RuntimeError) trainers.tokens: BPE files could not be loaded
    ├── RunnerError                        trainers.runner: a training backend refused or failed
    │   ├── StoreError                     trainers.ray_runner: the artifacts store did not answer
    │   ├── OpenAIError (RuntimeError)     trainers.openai_ft: a refused or failed API call
    │   └── TogetherAPIError               trainers.together_ft: a refused or failed API call
    ├── ModelFetchError (RuntimeError)     trainers.models: download or conversion failed
    ├── MergeError (RuntimeError)          trainers.merge: merging an adapter failed
    └── ChatError (RuntimeError)           trainers.chat_worker: a chat was not answered
        ├── ChatBusy                       too many chats waiting
        └── ChatWorkerDied                 the worker process ended
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every exception trainers/ raises on purpose."""


class RunnerError(TrainerError):
    """A training backend (trainers.runner) refused or could not be reached.

    `message` is the backend's own text; `summary` is what a person is shown;
    `retryable` is true when trying again later may work.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    @property
    def summary(self) -> str:
        return self.message


class StoreError(RunnerError):
    """The artifacts store (an object store under a Ray runner) refused or did not answer.

    `message` names the run folder for the log; `summary`, shown to a person,
    names neither the bucket, the prefix nor the store's endpoint: only the
    kind of error (`kind`, e.g. ``EndpointConnectionError``). Retryable.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, retryable=True)
        self.kind = kind

    @property
    def summary(self) -> str:
        return f"the artifacts store did not answer: {self.kind}"
