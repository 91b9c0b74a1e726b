"""What leaves the machine: data that may hold secrets goes out only once released.

Training data, eval sets, held-out splits, distillation prompts and prompts
typed into `chat` may all reach a hosted model (for training, generation, the
teacher or the LLM judge). A dataset whose validation found `possible_secret`
is held: nothing of it is sent until an approver releases it, by name
(`/finetune release d3`, or *Send despite secrets* on a run's card, which
releases that run's datasets). Each release is an audit row naming the
dataset and the approver.
"""

from __future__ import annotations

from bot.errors import UserError
from storage import Dataset, Store

RELEASE = "release_secrets"  # the audit action that releases a dataset


def secret_findings(dataset: Dataset) -> int:
    """How many `possible_secret` findings the dataset's validation made."""
    return int(((dataset.report_json or {}).get("codes") or {}).get("possible_secret", 0))


def released_by(store: Store, dataset_id: str) -> str | None:
    """The approver who released this dataset for hosted models, if one did."""
    for entry in store.audit_log(dataset_id=dataset_id, limit=None):
        if entry.action == RELEASE:
            return entry.actor
    return None


def held(store: Store, datasets: list[Dataset | None]) -> list[Dataset]:
    """Those of `datasets` that may hold secrets and were not released."""
    return [
        d
        for d in datasets
        if d is not None and secret_findings(d) and released_by(store, d.id) is None
    ]


def held_words(datasets: list[Dataset]) -> str:
    """'d3 (4 possible secrets)' for a message, and the command that releases them."""
    names = ", ".join(f"{d.id} ({secret_findings(d):,} possible secret(s))" for d in datasets)
    release = " and ".join(f"`/finetune release {d.id}`" for d in datasets)
    return f"{names} may hold credentials; an approver can send them anyway with {release}"


def release(store: Store, dataset: Dataset, user: str, *, run_id: str | None = None) -> bool:
    """Record that `user` (an approver: the caller checks) releases `dataset`. False if
    there was nothing to release (no possible secrets) or it was released already."""
    if not secret_findings(dataset) or released_by(store, dataset.id):
        return False
    store.audit(
        user,
        RELEASE,
        dataset_id=dataset.id,
        run_id=run_id,
        detail={"possible_secrets": secret_findings(dataset)},
    )
    return True


def find_secrets(text: str) -> list[str]:
    """The kinds of secret `text` looks like it holds (trainers.secrets)."""
    from trainers.secrets import find_secrets as scan

    return scan(text)


def check_prompt(text: str) -> None:
    """A prompt for a hosted model: refused, unsent, when it looks like it holds a secret."""
    kinds = find_secrets(text)
    if kinds:
        raise UserError(
            f"Your prompt looks like it holds a secret ({', '.join(sorted(set(kinds)))}), "
            "so it was not sent to the hosted model.",
            "Remove it and ask again.",
        )
