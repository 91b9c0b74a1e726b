"""The /finetune grammar: `train d3 provider=local epochs=3 suffix="support bot"`.

Words and `key=value` options; values with spaces go in double quotes (Slack's
curly quotes count too); Slack's HTML escaping (&amp; &lt; &gt;) is undone.
Parsing is pure: it never touches Slack or the database.
"""

from __future__ import annotations

import html
import shlex
from dataclasses import dataclass, field

from bot.errors import BotError


class CommandError(BotError, ValueError):
    """The text is not a valid command; the message says what to type instead."""


@dataclass(frozen=True)
class Spec:
    name: str
    usage: str
    summary: str
    options: tuple[str, ...] = ()
    max_args: int = 0


# Later subcommands (train, cancel, eval, audit, …) add their Spec here.
SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("help", "help", "this list"),
        Spec("datasets", "datasets", "the datasets uploaded in this channel"),
        Spec(
            "validate",
            "validate [dataset]",
            "post a dataset's validation report again (default: the latest here)",
            max_args=1,
        ),
        Spec(
            "estimate",
            "estimate [dataset] [model=…] [epochs=N|auto]",
            "training cost and GPU time for a dataset",
            options=("model", "epochs"),
            max_args=1,
        ),
        Spec(
            "convert",
            "convert [dataset] from=sharegpt|alpaca|csv|json",
            "turn a dropped ShareGPT, Alpaca, CSV, JSON or UTF-16 file into chat JSONL "
            "(a new dataset, checked like any upload)",
            options=("from",),
            max_args=1,
        ),
        Spec(
            "train",
            "train [dataset] provider=openai|local|together|<providers-file name> model=… "
            "epochs=N|auto batch=… eval=<dataset>|split=0.1 "
            "(openai: lr_mult=… suffix=…; local: lr=… r=… alpha=… targets=all-linear|q,k,v,o "
            "max_length=… qlora=true|false merge=true|false gpus=N nodes=M; together: batch_size=… "
            "learning_rate=… lora=true|false lora_r=… lora_alpha=… lora_dropout=… suffix=…)",
            "ask for a training run (paid runs need approval)",
            options=(
                "provider",
                "model",
                "epochs",
                "batch",
                "eval",
                "split",
                "lr_mult",
                "suffix",
                "lr",
                "r",
                "alpha",
                "targets",
                "max_length",
                "qlora",
                "merge",
                "batch_size",
                "learning_rate",
                "lora",
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "gpus",
                "nodes",
            ),
            max_args=1,
        ),
        Spec(
            "migrate",
            "migrate <run> provider=local|together|… [model=…]",
            "train a finished run again on another provider from the same data and held-out "
            "set (hyperparameters carried, differences listed; paid runs need approval), then "
            "compare the two models",
            options=("provider", "model"),
            max_args=1,
        ),
        Spec(
            "release",
            "release <dataset>",
            "(approvers) let a dataset with possible secrets go to hosted models; audited",
            max_args=1,
        ),
        Spec(
            "distill",
            'distill [dataset] teacher=<model> [system="…"]',
            "a teacher model answers a prompts file; the answers become a dataset (paid: approval)",
            options=("teacher", "system"),
            max_args=1,
        ),
        Spec(
            "chat",
            'chat <run> [local] "<prompt>" [base=…]',
            "the base and the tuned model answer the same prompt, side by side (`local`: a "
            "Together run's downloaded adapter answers here, on its base from TUNEBOT_MODEL_DIRS "
            "or base=, at $0 hosted)",
            options=("prompt", "base"),
            max_args=3,
        ),
        Spec("runs", "runs", "training runs in this channel"),
        Spec("status", "status [run]", "where a run is (default: the latest here)", max_args=1),
        Spec("cancel", "cancel <run>", "stop a run or withdraw a request", max_args=1),
        Spec(
            "resume",
            "resume <run>",
            "continue a stopped local run from its last checkpoint",
            max_args=1,
        ),
        Spec(
            "download",
            "download <run> [merged]",
            "fetch a Together run's LoRA adapter (or the merged model) into tunebot's home",
            max_args=2,
        ),
        Spec(
            "eval",
            "eval <run> [local] [eval=<dataset>] [base=…]",
            "evaluate a run again, base vs tuned (on another held-out set with eval=; `local`: "
            "a Together run from its downloaded adapter, here, at $0 hosted)",
            options=("eval", "base"),
            max_args=2,
        ),
        Spec("budget", "budget", "this month's spend by run and by person, estimate vs actual"),
        Spec("providers", "providers", "where runs can train, their models and prices"),
        Spec(
            "advise", "advise", "should we fine-tune at all? a few questions, then a recommendation"
        ),
        Spec(
            "audit",
            "audit [run]",
            "who asked, approved, rejected or overrode what, and when",
            max_args=1,
        ),
        Spec(
            "forget",
            "forget <dataset>",
            "delete a dataset's file here and its copies on OpenAI",
            max_args=1,
        ),
    )
}


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str | None:
        """The dataset or run the command names, if any."""
        return self.args[0] if self.args else None


def _unescape(text: str) -> str:
    text = html.unescape(text)
    return (
        text.replace("\u201c", '"')
        .replace("\u201d", '"')
        .replace("\u2018", "'")
        .replace("\u2019", "'")
    )


def parse(text: str) -> Command:
    """Parse /finetune's text. An empty or unknown subcommand means help.

    Raises CommandError for unbalanced quotes, unknown options and extra words.
    """
    try:
        words = shlex.split(_unescape(text or ""), posix=True)
    except ValueError:
        raise CommandError(
            "a quote is not closed; put values with spaces in double quotes"
        ) from None
    if not words:
        return Command("help")
    name = words[0].lower()
    spec = SPECS.get(name)
    if spec is None:
        return Command("help", (name,))  # the help text says the word was not understood
    args: list[str] = []
    options: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if eq and key and not any(c.isspace() for c in key):  # "what does x=1 mean" is text
            key = key.lower()
            if key not in spec.options:
                valid = ", ".join(f"{o}=" for o in spec.options) or "none"
                raise CommandError(f"`{name}` has no option `{key}`; valid options: {valid}")
            if not value:
                raise CommandError(f"`{key}=` needs a value, e.g. `{key}=…`")
            options[key] = value
        else:
            args.append(word)
    if len(args) > spec.max_args:
        raise CommandError(f"too many words after `{name}`: usage is `/finetune {spec.usage}`")
    return Command(name, tuple(args), options)


def help_lines() -> list[str]:
    return [f"/finetune {s.usage} — {s.summary}" for s in SPECS.values()]
