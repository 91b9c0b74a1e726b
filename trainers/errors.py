"""The exceptions trainers/ raises on purpose, under one base.

Catch `TrainerError` for "anything the ML side refused or could not do"; each
also keeps the built-in base it always had, so existing `except ValueError`
and `except RuntimeError` still hold. Each message is one line, worded for a
person, with no server path.

    TrainerError
    ├── UnknownModel (ValueError)          trainers.pricing: not in the price table
    ├── RetiredModel (ValueError)          trainers.pricing: the provider no longer trains it
    ├── TokenizerUnavailable (RuntimeError) trainers.tokens: BPE files could not be loaded
    ├── OpenAIError (RuntimeError)         trainers.openai_ft: a refused or failed API call
    ├── RunnerError                        trainers.runner: a backend refused or was unreachable
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
