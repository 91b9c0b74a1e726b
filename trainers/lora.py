"""Local LoRA / QLoRA training worker: ``python -m trainers.lora spec.json``.

The bot starts this module as its own process (``trainers.local.launch``), or
under ``accelerate launch --multi_gpu --num_processes N -m trainers.lora``
for several ranks (gloo on the CPU, NCCL on GPUs), and follows it through
files in the run's ``output_dir``:

- ``progress.jsonl``: one JSON object a line, flushed as it is written: a
  ``start`` event, a ``step`` event per optimizer step (loss, learning rate,
  tokens per second, ETA), ``eval`` and ``checkpoint`` events.
- stdout: each of those records, and the result at the end, also as one line
  ``tunebot-progress <run id> <JSON>`` (`trainers.local.log_line`), for a
  runner that reads the job's log instead of the folder.
- ``result.json``: written once, atomically, at the end: ``succeeded`` (with
  the adapter folder and metrics), ``cancelled`` (with the checkpoint saved on
  the way out) or ``failed`` (one-line error and the tail of ``worker.log``).
- ``checkpoints/checkpoint-<step>/`` (Trainer checkpoints, what ``resume``
  continues from), ``adapter/`` (final adapter and tokenizer), ``merged/``
  (base model with the adapter merged in, when asked).

Only rank 0 writes these files. SIGTERM or SIGINT asks for a clean stop: the
ranks agree on it at the next optimizer step, save a checkpoint and finish
with ``cancelled``; so does a stop file (``main(stop_file=…)``) for workers no
signal reaches (Ray Train's). A signal never kills the process by itself; SIGKILL does.

Data. The training file is OpenAI chat JSONL. Content given as text parts is
joined with newlines (other part types are dropped: these are text models).
Only assistant tokens carry loss, and an assistant message with
``"weight": 0`` carries none (TRL ignores that key; we build the mask
ourselves). Tool traffic is kept as plain-text context, never learned: a
``tool``/``function`` message becomes a user turn ``[tool result NAME]
...``, and an assistant message's ``tool_calls`` / ``function_call`` are
written out as ``[tool call] name(arguments)`` lines in a weight-0 turn.
The base model's own tool-call format is unknown here, so teaching one
invented format would do harm.

The loss mask comes from a chat template with ``{% generation %}`` markers:
the model's own if it has them; else TRL's training variant of the model's
exact template when TRL ships one; else one of ours, chosen from the
tokenizer's special tokens: ChatML (SmolLM2, Qwen) or Llama 3.

Defaults follow the fine-tuning article: r=16, alpha=32, dropout 0.05, three
epochs, batch 4 with gradient accumulation 2, lr 2e-4, 10 % warmup, a
checkpoint each epoch. CPU trains in float32; CUDA in bf16 where supported.
No packing: without flash-attention's variable-length kernels packed
examples would attend to each other; batches are grouped by length instead.

Heavy imports (torch, transformers, peft, trl, datasets) happen inside the
functions that need them: ``import trainers.lora`` stays cheap, and this
module never imports ``bot`` or ``storage``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.local import (
    LOG,
    LOG_TAIL_LINES,
    PROGRESS,
    RESULT,
    complete_checkpoints,
    log_line,
)

if TYPE_CHECKING:
    import datasets
    import torch

log = logging.getLogger("trainers.lora")

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"
SHARDS_DIR = "shards"  # rank-<k>.json with record_shards
QLORA_AUTO_PARAMS = 3_000_000_000  # default_qlora: 4-bit above this many parameters on CUDA
SAVE_TOTAL_LIMIT = 3  # checkpoints kept; an adapter checkpoint is small, optimizer state 2x that
ERROR_CHARS = 500

# `q,k,v,o` shorthand -> the module names of Llama-style attention and MLP blocks.
SHORT_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

# Training chat templates. `{% generation %}` marks the tokens that carry loss:
# the assistant's content and its end-of-turn token (so the model learns to
# stop). They render the same text as the plain inference templates, so a
# model trained with them is prompted with the model family's usual format.
# Newlines are written as expressions: transformers renders with trim_blocks,
# which would eat a newline after a block tag.
CHATML_TEMPLATE = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

LLAMA3_TEMPLATE = r"""{%- for message in messages %}
    {%- if loop.first %}
        {{- bos_token }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---- the spec ------------------------------------------------------------------------------------


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LoraSpec:
    """What one local training run does; the bot writes it as ``spec.json``."""

    run_id: str = field(metadata=_help("The bot's run id, for logs."))
    model: str = field(metadata=_help("Base model: a local folder or a hub id."))
    train_file: str = field(metadata=_help("Training data, OpenAI chat JSONL."))
    output_dir: str = field(metadata=_help("The run's folder: progress, checkpoints, adapter."))
    eval_file: str | None = field(
        default=None, metadata=_help("Held-out chat JSONL for eval loss, or null.")
    )
    epochs: float = field(default=3, metadata=_help("Passes over the training data."))
    lr: float = field(default=2e-4, metadata=_help("Peak learning rate (AdamW, linear decay)."))
    batch: int = field(default=4, metadata=_help("Examples per device per forward pass."))
    grad_accum: int = field(default=2, metadata=_help("Forward passes per optimizer step."))
    warmup: float = field(
        default=0.1,
        metadata=_help("Warm-up: a fraction of the steps in [0, 1), or a whole number of steps."),
    )
    r: int = field(default=16, metadata=_help("LoRA rank."))
    alpha: float = field(default=32, metadata=_help("LoRA scaling numerator (scale = alpha / r)."))
    dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch, in [0, 1)."))
    targets: str | tuple[str, ...] = field(
        default="all-linear",
        metadata=_help(
            "Modules to adapt: 'all-linear', a list of module names, or shorthand 'q,k,v,o'."
        ),
    )
    max_length: int = field(
        default=2048, metadata=_help("Tokens per example; longer ones are cut.")
    )
    qlora: bool | None = field(
        default=False,
        metadata=_help("Load the base model in 4-bit NF4; null picks it by size (default_qlora)."),
    )
    merge: bool = field(
        default=False, metadata=_help("Also save the base with the adapter merged.")
    )
    seed: int = field(default=42, metadata=_help("Seed for LoRA init, shuffling and dropout."))
    resume: bool = field(
        default=False, metadata=_help("Continue from the newest complete checkpoint, if any.")
    )
    max_steps: int | None = field(
        default=None, metadata=_help("Stop after this many optimizer steps (tests); null: epochs.")
    )
    save_steps: int | None = field(
        default=None, metadata=_help("Checkpoint every N steps; null: at the end of each epoch.")
    )
    group_by_length: bool = field(
        default=True, metadata=_help("Batch examples of similar length together (less padding).")
    )
    record_shards: bool = field(
        default=False,
        metadata=_help(
            "Write shards/rank-<k>.json: the batches each rank trains on per epoch, with a "
            "digest of every example (checks data-parallel sharding; one extra pass of loading)."
        ),
    )

    def __post_init__(self) -> None:
        for name in ("run_id", "model", "train_file", "output_dir"):
            _check_text(name, getattr(self, name))
        if self.eval_file is not None:
            _check_text("eval_file", self.eval_file)
        _check_number("epochs", self.epochs, low=0, low_open=True)
        _check_number("lr", self.lr, low=0, low_open=True, high=1)
        _check_int("batch", self.batch, low=1)
        _check_int("grad_accum", self.grad_accum, low=1)
        _check_number("warmup", self.warmup, low=0)
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError(
                f"warmup: {self.warmup!r} is neither a fraction in [0, 1) nor a whole number of steps"
            )
        _check_int("r", self.r, low=1)
        _check_number("alpha", self.alpha, low=0, low_open=True)
        _check_number("dropout", self.dropout, low=0, high=1)
        object.__setattr__(self, "targets", parse_targets(self.targets))
        _check_int("max_length", self.max_length, low=8)
        if self.qlora is not None and not isinstance(self.qlora, bool):
            raise ValueError(f"qlora: must be true, false or null, not {self.qlora!r}")
        for name in ("merge", "resume", "group_by_length", "record_shards"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, not {getattr(self, name)!r}")
        _check_int("seed", self.seed, low=0)
        for name in ("max_steps", "save_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        if not isinstance(data, Mapping):
            raise ValueError(f"spec: must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown spec field")
        for f in fields(cls):
            if f.default is MISSING and f.name not in data:
                raise ValueError(f"{f.name}: required")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LoraSpec:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"spec: {path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.targets, tuple):
            data["targets"] = list(self.targets)
        return data

    def to_json(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(Path(path), self.to_dict())

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, not {value!r}")


def _check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a number, not {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(
            f"{name}: must be {'above' if low_open else 'at least'} {low}, not {value}"
        )
    if high is not None and value >= high:
        raise ValueError(f"{name}: must be below {high}, not {value}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be a whole number, not {value!r}")
    if value < low:
        raise ValueError(f"{name}: must be at least {low}, not {value}")


def parse_targets(value: object) -> str | tuple[str, ...]:
    """'all-linear', a list of module names, or 'q,k,v,o' shorthand -> names like q_proj."""
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        items: list[object] = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"targets: must be 'all-linear' or a list of module names, not {value!r}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _MODULE_NAME.match(item.strip()):
            raise ValueError(f"targets: {item!r} is not a module name")
        name = SHORT_TARGETS.get(item.strip(), item.strip())
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("targets: the list is empty")
    return tuple(names)


def default_qlora(model_params: float, cuda: bool) -> bool:
    """Whether to load in 4-bit by default: on CUDA, above 3B parameters."""
    return bool(cuda) and model_params > QLORA_AUTO_PARAMS


# ---- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chat:
    """One training conversation as the template sees it, with per-message loss weights."""

    messages: tuple[dict[str, str], ...]
    weights: tuple[int, ...]  # 1 or 0 per message; only assistant messages can be 1

    @property
    def trainable(self) -> bool:
        return any(self.weights)


def flatten_content(content: object) -> str:
    """A message's content as one string: text parts joined by newlines, other parts dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    texts.append(text)
        return "\n".join(texts)
    raise ValueError(f"content must be a string or a list of parts, not {type(content).__name__}")


def _tool_calls_text(message: Mapping[str, Any]) -> list[str]:
    calls = list(message.get("tool_calls") or [])
    if message.get("function_call"):
        calls.append({"function": message["function_call"]})
    lines = []
    for call in calls:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        lines.append(f"[tool call] {fn.get('name', '?')}({args})")
    return lines


def to_chat(example: Mapping[str, Any]) -> Chat:
    """An OpenAI chat example -> system/user/assistant messages with string content and weights."""
    raw = example.get("messages") if isinstance(example, Mapping) else None
    if not isinstance(raw, list) or not raw:
        raise ValueError("the example has no 'messages' list")
    messages: list[dict[str, str]] = []
    weights: list[int] = []
    for i, message in enumerate(raw, 1):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is not an object")
        role = message.get("role")
        text = flatten_content(message.get("content"))
        if role in ("system", "user"):
            messages.append({"role": role, "content": text})
            weights.append(0)
        elif role == "assistant":
            calls = _tool_calls_text(message)
            if calls:  # context only: the base model's own tool-call format is unknown
                text = "\n".join([text, *calls]) if text else "\n".join(calls)
                weight = 0
            else:
                weight = 0 if message.get("weight", 1) == 0 else 1
            messages.append({"role": "assistant", "content": text})
            weights.append(weight)
        elif role in ("tool", "function"):
            name = message.get("name") or message.get("tool_call_id") or ""
            label = f"[tool result {name}]" if name else "[tool result]"
            messages.append({"role": "user", "content": f"{label}\n{text}"})
            weights.append(0)
        else:
            raise ValueError(f"message {i} has an unknown role {role!r}")
    return Chat(tuple(messages), tuple(weights))


def read_chats(path: str | os.PathLike[str]) -> Iterator[tuple[int, Chat]]:
    """(line number, Chat) for every example line of a chat JSONL file; blank lines skipped."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                yield n, to_chat(example)
            except ValueError as exc:
                raise ValueError(f"{path}, line {n}: {exc}") from None


# ---- chat templates and the loss mask ---------------------------------------------------------------


def has_generation_markers(template: object) -> bool:
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and _GENERATION_MARKER.search(template) is not None


def detect_family(tokenizer: Any) -> str | None:
    """'chatml', 'llama3' or None, from the tokenizer's special tokens and template text."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def training_template(tokenizer: Any) -> tuple[str, str]:
    """(template with generation markers, where it came from: model, trl, chatml or llama3)."""
    own = tokenizer.chat_template
    if has_generation_markers(own):
        return (own["default"] if isinstance(own, dict) else own), "model"
    if isinstance(own, str | dict):
        try:
            from trl.chat_template_utils import get_training_chat_template

            patched = get_training_chat_template(tokenizer)
        except (ImportError, ValueError, TypeError, KeyError):
            patched = None
        if isinstance(patched, str) and has_generation_markers(patched):
            return patched, "trl"
    family = detect_family(tokenizer)
    if family is None:
        raise ValueError(
            "model: its tokenizer has no chat template with {% generation %} markers and is "
            "neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>); add a training "
            "template to the model's tokenizer_config.json"
        )
    return TEMPLATES[family], family


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs = []
    start = None
    for i, bit in enumerate(mask):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def tokenize_chat(tokenizer: Any, template: str, chat: Chat) -> dict[str, list[int]]:
    """input_ids and assistant_masks (1 = carries loss) for one conversation.

    The template's generation markers mark every assistant turn; each turn is
    one run of 1s, in order, and the runs of weight-0 turns are zeroed.
    """
    out = tokenizer.apply_chat_template(
        list(chat.messages),
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    mask = [int(bool(b)) for b in out["assistant_masks"]]
    assistant_weights = [
        w for m, w in zip(chat.messages, chat.weights, strict=True) if m["role"] == "assistant"
    ]
    if not all(assistant_weights):
        runs = _runs(mask)
        if len(runs) != len(assistant_weights):
            raise ValueError(
                f"the chat template marks {len(runs)} assistant spans for "
                f"{len(assistant_weights)} assistant messages, so weight 0 cannot be applied"
            )
        for (start, end), weight in zip(runs, assistant_weights, strict=True):
            if not weight:
                mask[start:end] = [0] * (end - start)
    return {"input_ids": ids, "assistant_masks": mask}


def build_dataset(tokenizer: Any, template: str, path: str | os.PathLike[str]) -> datasets.Dataset:
    """A pre-tokenized datasets.Dataset (input_ids, assistant_masks) of the trainable examples."""
    import datasets

    rows: dict[str, list[list[int]]] = {"input_ids": [], "assistant_masks": []}
    skipped = 0
    for n, chat in read_chats(path):
        if not chat.trainable:
            skipped += 1
            continue
        try:
            row = tokenize_chat(tokenizer, template, chat)
        except ValueError as exc:
            raise ValueError(f"{path}, line {n}: {exc}") from None
        rows["input_ids"].append(row["input_ids"])
        rows["assistant_masks"].append(row["assistant_masks"])
    if skipped:
        log.info(
            "%s: %d examples have no assistant turn to learn (weight 0); skipped", path, skipped
        )
    if not rows["input_ids"]:
        raise ValueError(f"{path}: no example has an assistant turn to learn from")
    return datasets.Dataset.from_dict(rows)


# ---- files: progress, result, checkpoints -----------------------------------------------------------


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temporary file beside `path`, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ProgressLog:
    """progress.jsonl: one JSON object a line, appended and flushed at once.

    With `run_id`, each record is also printed on stdout as one line
    (`trainers.local.log_line`: ``tunebot-progress <run id> <JSON>``), so a
    runner that cannot read the run folder follows the run in the job's log.
    """

    def __init__(self, path: Path, run_id: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.run_id = run_id
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, event: str, **data: Any) -> None:
        record = {"event": event, **data, "time": round(time.time(), 3)}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.run_id is not None:
            echo(self.run_id, record)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(run_id: str, record: Mapping[str, Any]) -> None:
    """Print `record` on stdout as the progress line of run `run_id`, flushed at once."""
    print(log_line(run_id, record), file=sys.stdout, flush=True)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under output_dir/checkpoints; half-written ones skipped."""
    found = complete_checkpoints(Path(output_dir))
    return found[-1] if found else None


def log_tail(output_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = (output_dir / LOG).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return message[:ERROR_CHARS]


def _rank() -> int:
    """This process's global rank, from the launcher's environment (0 when run alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# ---- cancellation ---------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM / SIGINT, or by `stop_file` appearing; the training callback turns
    it into save-and-stop (every rank agrees on the step through `_agreed`)."""

    def __init__(self, stop_file: str | os.PathLike[str] | None = None) -> None:
        self._requested = False
        self.signal: int | None = None
        self.stop_file = Path(stop_file) if stop_file else None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (a signal, or the stop file exists: one stat)."""
        if not self._requested and self.stop_file is not None and self.stop_file.exists():
            log.warning("%s appeared: saving a checkpoint and stopping", self.stop_file.name)
            self._requested = True
        return self._requested

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may (Ray Train runs workers on a thread of an actor)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self._requested:
            log.warning("signal %d: saving a checkpoint and stopping", signum)
        self._requested = True
        self.signal = signum


def _agreed(flag: bool) -> bool:
    """Whether any rank wants to stop; every rank must take the same decision or DDP hangs."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def make_callback(progress: ProgressLog | None, stop: StopFlag, resumed_from: Path | None) -> Any:
    """The TrainerCallback that writes progress.jsonl and turns a stop request into save-and-stop."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.cancelled = False
            self.tokens0 = 0  # tokens seen before this session (a resumed run starts above 0)
            self._t0 = 0.0
            self._step0 = 0
            self._last_t = 0.0
            self._last_tokens = 0

        def _write(self, state: Any, event: str, **data: Any) -> None:
            if progress is not None and state.is_world_process_zero:
                progress.write(event, **data)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._t0 = self._last_t = time.monotonic()
            self._step0 = state.global_step
            self._last_tokens = self.tokens0 = state.num_input_tokens_seen
            self._write(
                state,
                "start",
                pid=os.getpid(),
                max_steps=state.max_steps,
                epochs=args.num_train_epochs,
                step=state.global_step,
                resumed_from=str(resumed_from) if resumed_from else None,
                world_size=args.world_size,
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _agreed(stop.requested):
                self.cancelled = True
                control.should_save = True
                control.should_training_stop = True

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.cancelled:  # the step that stopped already saved: no second save, no eval
                control.should_save = False
                control.should_evaluate = False

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return  # the eval and end-of-training summaries come through on_log too
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            dt = now - self._last_t
            tps = (tokens - self._last_tokens) / dt if dt > 0 else None
            self._last_t, self._last_tokens = now, tokens
            done = state.global_step - self._step0
            eta = (now - self._t0) / done * (state.max_steps - state.global_step) if done else None
            self._write(
                state,
                "step",
                step=state.global_step,
                max_steps=state.max_steps,
                epoch=round(float(logs.get("epoch", state.epoch or 0.0)), 4),
                loss=_num(logs.get("loss")),
                learning_rate=_num(logs.get("learning_rate")),
                grad_norm=_num(logs.get("grad_norm")),
                tokens_per_second=round(tps, 1) if tps is not None else None,
                eta_seconds=round(eta, 1) if eta is not None else None,
            )

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
        ) -> None:
            if metrics and "eval_loss" in metrics:
                self._write(
                    state, "eval", step=state.global_step, eval_loss=_num(metrics["eval_loss"])
                )

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._write(state, "checkpoint", step=state.global_step, path=str(path))

    return ProgressCallback()


def _num(value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ---- model ----------------------------------------------------------------------------------------


def disable_bnb_cpu_repacking(model: Any) -> int:
    """Work around bitsandbytes 0.50 on CPU: turn off the AVX512-BF16 weight repacking.

    A no-grad forward in eval mode (an evaluation) repacks every Linear4bit
    weight into a CPU-specific layout, after which LoRA gradients come out as
    zeros. Returns how many modules were changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def count_parameters(model_path: str) -> int:
    """Parameters of a model from its config alone (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Device:
    cuda: bool
    bf16: bool
    fp16: bool
    local_rank: int

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def detect_device() -> Device:
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return Device(
        cuda=cuda,
        bf16=bf16,
        fp16=cuda and not bf16,
        local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0),
    )


def load_model(spec: LoraSpec, device: Device, qlora: bool) -> Any:
    """The base model, 4-bit when qlora, wrapped with a fresh LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(spec.seed)  # LoRA's A matrices start random
    kwargs: dict[str, Any] = {"dtype": device.dtype}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.cuda else torch.float32,
        )
        if device.cuda:
            kwargs["device_map"] = {"": device.local_rank}
    model = AutoModelForCausalLM.from_pretrained(spec.model, **kwargs)
    model.config.use_cache = False
    if qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.targets if spec.targets == "all-linear" else list(spec.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if qlora and not device.cuda:
        changed = disable_bnb_cpu_repacking(model)
        log.info("bitsandbytes CPU repacking off on %d 4-bit modules", changed)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %s trainable of %s parameters (%.3f%%)", trainable, total, 100 * trainable / total
    )
    return model


def merge_adapter(spec: LoraSpec, adapter_dir: Path, merged_dir: Path, dtype: Any) -> None:
    """Base model (never 4-bit) + adapter -> merged weights and tokenizer, on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))


# ---- the run --------------------------------------------------------------------------------------


def sft_config(spec: LoraSpec, device: Device, *, qlora: bool, has_eval: bool) -> Any:
    from trl import SFTConfig

    strategy = "epoch" if spec.save_steps is None else "steps"
    warmup = spec.warmup if spec.warmup < 1 else int(spec.warmup)
    return SFTConfig(
        output_dir=str(spec.out / CHECKPOINTS_DIR),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps if spec.max_steps is not None else -1,
        per_device_train_batch_size=spec.batch,
        per_device_eval_batch_size=spec.batch,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.lr,
        warmup_steps=warmup,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy=strategy,
        save_steps=spec.save_steps or 500,
        save_total_limit=SAVE_TOTAL_LIMIT,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=spec.save_steps,
        seed=spec.seed,
        bf16=device.bf16,  # TRL defaults bf16 to True; a CPU trains in float32
        fp16=device.fp16,
        activation_checkpointing=qlora or device.cuda,  # TRL turns it on by default
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=spec.max_length,
        packing=False,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        use_cpu=not device.cuda,  # else accelerate's --multi_gpu ranks on a CPU train alone
        ddp_find_unused_parameters=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run(spec: LoraSpec, stop: StopFlag, progress: ProgressLog | None) -> dict[str, Any] | None:
    """Train; the result.json payload on rank 0, None on other ranks (which pass no progress)."""
    out = spec.out
    rank0 = _rank() == 0
    for name, path in (("train_file", spec.train_file), ("eval_file", spec.eval_file)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name}: {path} does not exist")
    _quiet_libraries()
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    device = detect_device()
    qlora = spec.qlora
    if qlora is None:
        qlora = default_qlora(count_parameters(spec.model), device.cuda)
    log.info(
        "run %s: %s on %s, %s, qlora=%s",
        spec.run_id,
        spec.model,
        "cuda" if device.cuda else "cpu",
        str(device.dtype).removeprefix("torch."),
        qlora,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    template, source = training_template(tokenizer)
    log.info("loss mask from the %s chat template", source)
    train_ds = build_dataset(tokenizer, template, spec.train_file)
    eval_ds = build_dataset(tokenizer, template, spec.eval_file) if spec.eval_file else None
    log.info("%d training examples, %d eval", len(train_ds), len(eval_ds) if eval_ds else 0)

    resume_from = None
    if spec.resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            log.info("resume: no complete checkpoint in %s; starting afresh", out / CHECKPOINTS_DIR)
        else:
            log.info("resuming from %s", resume_from)

    model = load_model(spec, device, qlora)
    callback = make_callback(progress, stop, resume_from)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(spec, device, qlora=qlora, has_eval=eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # progress.jsonl has every step: keep worker.log for what went wrong
    trainer.remove_callback(PrinterCallback)
    if spec.record_shards:
        record_shard(trainer, out / SHARDS_DIR)
    if _agreed(stop.requested):  # asked to stop while loading: there is nothing new to save
        return _cancelled(out, trainer.state.global_step) if rank0 else None

    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    if callback.cancelled and state.global_step < state.max_steps:
        return _cancelled(out, state.global_step) if rank0 else None

    eval_loss = _last_eval_loss(state.log_history)
    if eval_ds is not None and eval_loss is None:
        eval_loss = _num(trainer.evaluate().get("eval_loss"))

    adapter_dir = out / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # every rank calls it; the main process writes
    if not rank0:
        return None
    if not tokenizer.chat_template:  # a base model: leave the format it was trained on
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(adapter_dir))

    merged_dir = None
    if spec.merge:
        dtype = device.dtype
        del trainer, model
        if device.cuda:
            torch.cuda.empty_cache()
        merged_dir = out / MERGED_DIR
        merge_adapter(spec, adapter_dir, merged_dir, dtype)

    # The mean of the logged step losses: unlike output.training_loss it covers the steps
    # before a resume too (their log comes back with the checkpoint's trainer state).
    step_losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_loss = sum(step_losses) / len(step_losses) if step_losses else output.training_loss
    metrics = output.metrics
    runtime = _num(metrics.get("train_runtime"))
    tokens = state.num_input_tokens_seen - callback.tokens0
    tokens_per_second = round(tokens / runtime, 1) if runtime else None
    return {
        "status": "succeeded",
        "adapter_dir": str(adapter_dir),
        "merged_dir": str(merged_dir) if merged_dir else None,
        "metrics": {
            "train_loss": _num(train_loss),
            "eval_loss": eval_loss,
            "train_runtime": runtime,
            "tokens_per_second": tokens_per_second,
            "steps": state.global_step,
        },
        "max_steps": state.max_steps,
    }


def record_shard(trainer: Any, folder: Path) -> Path:
    """Write ``<folder>/rank-<k>.json`` for this rank: {"rank", "world_size", "batches" (per
    epoch), "examples": sha256 of each example's unpadded input ids, in order}. The
    dataloader is the one training uses (sharded by the data-parallel sampler)."""
    import hashlib

    loader = trainer.get_train_dataloader()
    digests = []
    batches = 0
    for batch in loader:
        batches += 1
        masks = batch.get("attention_mask")
        for i, ids in enumerate(batch["input_ids"].tolist()):
            if masks is not None:
                ids = [t for t, m in zip(ids, masks[i].tolist(), strict=True) if m]
            digests.append(hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16])
    rank = _rank()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank}.json"
    payload = {"rank": rank, "world_size": world, "batches": batches, "examples": digests}
    atomic_write_json(path, payload)
    return path


def _cancelled(out: Path, step: int) -> dict[str, Any]:
    checkpoint = latest_checkpoint(out)
    return {
        "status": "cancelled",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "step": step,
    }


def _last_eval_loss(history: Iterable[Mapping[str, Any]]) -> float | None:
    losses = [_num(h["eval_loss"]) for h in history if "eval_loss" in h]
    return losses[-1] if losses else None


def _quiet_libraries() -> None:
    """Progress bars off and library chatter down to warnings: worker.log stays readable."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import datasets
    import transformers

    # peft still calls the names transformers 5 renamed (gradient -> activation checkpointing)
    warnings.filterwarnings(
        "ignore", message=r"`(is_)?gradient_checkpointing", category=FutureWarning
    )
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def _output_dir_of(spec_path: Path) -> Path:
    """Where a failure goes when the spec itself is bad: its output_dir if readable, else beside it."""
    try:
        data = json.loads(spec_path.read_text(encoding="utf-8"))
        if (
            isinstance(data, dict)
            and isinstance(data.get("output_dir"), str)
            and data["output_dir"]
        ):
            return Path(data["output_dir"])
    except (OSError, ValueError):
        pass
    return spec_path.resolve().parent


def main(argv: Sequence[str] | None = None, *, stop_file: str | None = None) -> int:
    """Run the worker on ``argv`` (``[SPEC.json]``); 0 when the run ended (succeeded or
    cancelled), 1 when it failed, 2 for bad arguments. `stop_file`: a path whose
    existence asks for a stop like SIGTERM does (`StopFlag`), for workers the
    signal does not reach (Ray Train's, started by `trainers.ray_train`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m trainers.lora SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(args[0])
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s rank{_rank()} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(logging.INFO)
    stop = StopFlag(stop_file)
    stop.install()
    out = _output_dir_of(spec_path)
    run_id = None
    try:
        spec = LoraSpec.from_json(spec_path)
        run_id = spec.run_id
        out = spec.out
        out.mkdir(parents=True, exist_ok=True)
        with ProgressLog(out / PROGRESS, run_id) if _rank() == 0 else nullcontext() as progress:
            result = run(spec, stop, progress)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if _rank() == 0:
            failed = {"status": "failed", "error": _one_line(exc), "log_tail": log_tail(out)}
            atomic_write_json(out / RESULT, failed)
            if run_id is not None:
                echo(run_id, {"event": "result", **failed})
        return 1
    finally:
        _close_distributed()
    if result is not None:
        atomic_write_json(out / RESULT, result)
        echo(spec.run_id, {"event": "result", **result})
        log.info("run %s: %s", spec.run_id, result["status"])
    return 0


def _close_distributed() -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
