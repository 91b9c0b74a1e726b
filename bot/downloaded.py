"""Which local adapter and base model a Together run has, once its adapter is downloaded.

`/finetune download rN` (bot/weights.py) unpacks a Together run's LoRA
adapter into ``<TUNEBOT_HOME>/runs/<run>/together/adapter/``. `local_copy`
turns that folder into something the local evaluation
(``trainers.evaluate.generate_local``) and the chat worker
(``trainers.chat_worker``) can load with no call to Together: a checked
adapter folder and a base model folder on this machine.

The archive came from a provider, so the folder is untrusted input:

- ``adapter_config.json`` must be a file of at most `CONFIG_MAX_BYTES` bytes
  holding a JSON object with ``peft_type`` ``LORA``, a LoRA rank ``r`` and a
  ``lora_alpha`` that are whole numbers from 1 to `MAX_RANK` and
  `MAX_ALPHA`, ``target_modules`` a list of plain module names (PEFT would
  read a string as a regular expression) and the other fields of `KEPT`
  valid; its ``base_model_name_or_path`` may not be an absolute path,
  contain ``..``, or be a URL.
- Weights are read from ``adapter_model.safetensors`` only (its header is
  checked: a JSON object of LoRA tensors, each of a float dtype whose shape
  fills its byte range, the ranges back to back covering the file's data
  exactly, so no claim of a giant tensor reaches the loader); an ``adapter_model.bin`` (a pickle,
  which can run code when loaded) is refused outright.
- Nothing else in the folder is loaded: a checked copy holds a rewritten
  config (only the LoRA fields below, its base set to the resolved folder)
  and the weights file, hard-linked, in
  ``<TUNEBOT_HOME>/runs/<run>/together/checked/<digest>/``.

The base model is the config's ``base_model_name_or_path`` (or what
``base=`` names): a folder under one of ``TUNEBOT_MODEL_DIRS``, looked up as
``<dir>/<owner>/<name>`` then ``<dir>/<name>``, or a full path inside those
dirs, checked after links and ``..`` are resolved (bot/local_models.py). No
hub download is ever tried. Every refusal is a `UserError` of one sentence
with no server path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import UserError
from bot.local_models import LocalModels, inside, is_hub_id
from bot.results import RunResult

if TYPE_CHECKING:
    from bot.config import Settings
    from storage import Run, Store

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
CONFIG_MAX_BYTES = 64 * 1024
HEADER_MAX_BYTES = 16 << 20  # a safetensors header (tensor names, shapes, offsets)
MAX_RANK = 1024
MAX_ALPHA = 65536
MAX_DEPTH = 3  # how deep in the unpacked archive the adapter's folder may be
_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")  # a module name: q_proj, model.layers.0.mlp


def _names(value: Any) -> bool:
    """A list of module names (PEFT reads a string, or a dict's keys, as a regular
    expression: only plain names are kept, so no pattern from the archive runs)."""
    return isinstance(value, list) and all(isinstance(v, str) and _NAME.fullmatch(v) for v in value)


def _by_name(value: Any, top: int) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _NAME.fullmatch(k) and _whole(v, top) for k, v in value.items()
    )


def _whole(value: Any, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


# The LoRA fields the checked config keeps, each with the test its value must pass
# (null is PEFT's default); a value that fails refuses the adapter. Other fields are
# never loaded.
KEPT: dict[str, Any] = {
    "lora_dropout": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
    "target_modules": lambda v: v == "all-linear" or _names(v),
    "bias": lambda v: v in ("none", "all", "lora_only"),
    "fan_in_fan_out": lambda v: isinstance(v, bool),
    "use_rslora": lambda v: isinstance(v, bool),
    "layers_to_transform": lambda v: (
        _whole(v, 10_000) or (isinstance(v, list) and all(_whole(i, 10_000) for i in v))
    ),
    "layers_pattern": _names,
    "rank_pattern": lambda v: _by_name(v, MAX_RANK),
    "alpha_pattern": lambda v: _by_name(v, MAX_ALPHA),
}


@dataclass(frozen=True)
class LocalCopy:
    """A Together run's downloaded adapter and its base model, both on this machine.

    `adapter` is the checked folder (config + safetensors); `base` the
    resolved base model folder; `base_name` and `adapter_name` are what a
    person is shown (the model's name, the adapter's folder under the home).
    """

    run_id: str
    base: Path
    adapter: Path
    base_name: str
    adapter_name: str

    @property
    def label(self) -> str:
        """One line for Slack: where the answers came from."""
        return (
            f"run locally from the downloaded adapter `{self.adapter_name}` on the base "
            f"`{self.base_name}` (no call to Together, $0 hosted)"
        )


class AdapterRefused(UserError):
    """A downloaded adapter failed a check; the message says which, in one sentence."""


def local_copy(settings: Settings, store: Store, run: Run, base_ref: str | None) -> LocalCopy:
    """The checked adapter and the base folder of Together run `run`.

    `base_ref` is ``base=`` as typed (a hub-style name or a full path inside
    TUNEBOT_MODEL_DIRS), None for the adapter config's own base. Raises
    `UserError` (what is missing) or `AdapterRefused` (what is wrong).
    """
    if not (run.plan_json or {}).get("lora", True):
        raise UserError(
            f"{run.id} was a full fine-tune: tunebot runs a downloaded LoRA adapter locally, "
            "not full weights."
        )
    where = (RunResult.of(run).downloads or {}).get("adapter")
    folder = settings.home / where if where else None
    root = (settings.home / "runs" / run.id / "together").resolve()
    unpacked = inside(folder, [root]) if folder is not None else None
    if unpacked is None or not unpacked.is_dir():
        raise UserError(
            f"{run.id} has no downloaded adapter: download it first with "
            f"`/finetune download {run.id}`."
        )
    found = _adapter_folder(unpacked, run.id)
    config_path = inside(found / CONFIG, [found])
    if config_path is None:
        raise AdapterRefused(
            f"{run.id}'s downloaded adapter is refused: its {CONFIG} links outside the adapter."
        )
    config = read_config(config_path, run.id)
    weights = _weights(found, run.id)
    models = LocalModels(settings, store)
    name = base_ref.strip() if base_ref else config["base_model_name_or_path"]
    base = _base_folder(models, name, run.id, from_option=base_ref is not None)
    checked = _checked(root / "checked", config, weights, base)
    shown = name if not name.startswith("/") else f"…/{Path(name).name}"
    return LocalCopy(run.id, base, checked, shown, str(found.relative_to(settings.home.resolve())))


def read_config(path: Path, run_id: str = "the run") -> dict[str, Any]:
    """``adapter_config.json``, checked: the JSON object, with `base_model_name_or_path`
    a name (not a path or URL). Raises `AdapterRefused`."""

    def refuse(why: str) -> AdapterRefused:
        return AdapterRefused(f"{run_id}'s downloaded adapter is refused: {why}.")

    try:
        size = path.stat().st_size
    except OSError:
        raise refuse(f"it has no {CONFIG}") from None
    if not path.is_file():
        raise refuse(f"its {CONFIG} is not a file")
    if size > CONFIG_MAX_BYTES:
        raise refuse(f"its {CONFIG} is {size:,} bytes, more than {CONFIG_MAX_BYTES:,}")
    try:
        config = json.loads(path.read_bytes()[:CONFIG_MAX_BYTES])
    except (OSError, ValueError):
        raise refuse(f"its {CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise refuse(f"its {CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise refuse(f"its peft_type is `{str(config.get('peft_type'))[:40]}`, not `LORA`")
    for key, top in (("r", MAX_RANK), ("lora_alpha", MAX_ALPHA)):
        value = config.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise refuse(f"its `{key}` is not a whole number from 1 to {top:,}")
        config[key] = value
    if config.get("target_modules") is None:
        raise refuse("its target_modules is missing")
    for key, valid in KEPT.items():
        if config.get(key) is not None and not valid(config[key]):
            raise refuse(f"its `{key}` is not valid")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise refuse("its base_model_name_or_path is missing")
    if "://" in base or base.lower().startswith(("http:", "https:", "hf:", "s3:", "file:")):
        raise refuse("its base_model_name_or_path is a URL")
    if ".." in base:
        raise refuse("its base_model_name_or_path contains `..`")
    if base.startswith(("/", "\\", "~")) or (len(base) > 1 and base[1] == ":"):
        raise refuse("its base_model_name_or_path is an absolute path")
    if not is_hub_id(base):
        raise refuse("its base_model_name_or_path is not a model name like `owner/name`")
    return config


def _adapter_folder(unpacked: Path, run_id: str) -> Path:
    """The folder of the archive holding the adapter: the top, or the one folder below
    it (at most `MAX_DEPTH` deep) that has ``adapter_config.json``."""
    if (unpacked / CONFIG).exists() or (unpacked / PICKLED).exists():
        return unpacked
    found = [
        p.parent
        for depth in range(1, MAX_DEPTH + 1)
        for p in unpacked.glob("/".join(["*"] * depth) + "/" + CONFIG)
    ]
    if len(found) > 1:
        raise AdapterRefused(
            f"{run_id}'s downloaded adapter is refused: its archive holds {len(found)} adapters."
        )
    if not found or inside(found[0], [unpacked]) is None:
        raise AdapterRefused(f"{run_id}'s downloaded adapter is refused: it has no {CONFIG}.")
    return found[0]


def _weights(folder: Path, run_id: str) -> Path:
    """``adapter_model.safetensors`` with a sane header; a pickle file is refused."""

    def refuse(why: str) -> AdapterRefused:
        return AdapterRefused(f"{run_id}'s downloaded adapter is refused: {why}.")

    if (folder / PICKLED).exists():
        raise refuse(
            f"it holds {PICKLED}, a pickle file tunebot never loads (only {WEIGHTS} is read)"
        )
    path = inside(folder / WEIGHTS, [folder.resolve()])
    if path is None or not path.is_file():
        raise refuse(f"it has no {WEIGHTS}")
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(HEADER_MAX_BYTES, path.stat().st_size - 8):
                raise ValueError("header size")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        raise refuse(f"its {WEIGHTS} is not a safetensors file") from None
    tensors = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if not tensors or not all("lora_" in k for k in tensors):
        raise refuse(f"its {WEIGHTS} holds no LoRA weights")
    if not _fits(header, tensors, path.stat().st_size - 8 - size):
        raise refuse(f"its {WEIGHTS} header does not match its tensors' data")
    return path


DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # a LoRA's weights are floats


def _fits(header: dict, tensors: list[str], data_bytes: int) -> bool:
    """``__metadata__`` text to text, and every tensor of a safetensors header (name ->
    dtype, shape, data_offsets) of a float dtype whose shape's bytes are its offsets'
    span, the spans back to back covering exactly the `data_bytes` after the header:
    a header claiming more than the file holds (a 16 GiB tensor in a few bytes) never
    reaches the loader."""
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return False  # the loader takes text to text only
    spans = []
    for name in tensors:
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
            return False
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_whole(d, 1 << 40) for d in shape)):
            return False
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return False
        begin, end = offsets
        if not (_whole(begin, data_bytes) and _whole(end, data_bytes) and begin <= end):
            return False
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[info["dtype"]] != end - begin:
            return False
        spans.append((begin, end))
    spans.sort()
    at = 0
    for begin, end in spans:
        if begin != at:
            return False
        at = end
    return at == data_bytes


def _base_folder(models: LocalModels, name: str, run_id: str, *, from_option: bool) -> Path:
    """The model folder `name` names, inside TUNEBOT_MODEL_DIRS; `UserError` if none."""
    roots = models.model_dirs()
    whose = f"`base={name}`" if from_option else f"`{name}`, {run_id}'s base model"
    if from_option and name.startswith("/"):
        found = inside(Path(name), roots) if roots else None
        if found is None or not (found / "config.json").is_file():
            raise UserError(
                "The folder `base=` names is not a model folder inside TUNEBOT_MODEL_DIRS "
                "(after resolving links and `..`)."
            )
        return found
    if not is_hub_id(name):
        raise UserError(f"{whose} is neither a model name like `owner/name` nor a full path.")
    tried = [name, name.rsplit("/", 1)[-1]]
    for root in roots:
        for rel in dict.fromkeys(tried):
            found = inside(root / rel, [root])
            if found is not None and (found / "config.json").is_file():
                return found
    if not roots:
        raise UserError(
            f"No local copy of {whose}: TUNEBOT_MODEL_DIRS is not set, so tunebot has nowhere "
            "to look; ask whoever runs tunebot to set it and put the model's folder there."
        )
    dirs = ", ".join(f"…/{r.name}" for r in roots)
    raise UserError(
        f"No local copy of {whose}: put its folder under TUNEBOT_MODEL_DIRS ({dirs}) as "
        f"`{name}`, or pass `base=` naming a model folder there."
    )


def _checked(into: Path, config: dict[str, Any], weights: Path, base: Path) -> Path:
    """The checked adapter folder: the kept LoRA fields and the weights, hard-linked
    (copied across disks). Named by a digest of both, so it is made once."""
    clean: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "base_model_name_or_path": str(base),
        "inference_mode": True,
    }
    for key in KEPT:
        if config.get(key) is not None:
            clean[key] = config[key]
    text = json.dumps(clean, indent=2, sort_keys=True)
    stat = weights.stat()
    digest = hashlib.sha256(f"{text}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()
    final = into / digest[:16]
    if (final / WEIGHTS).is_file():
        return final
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=into))
    try:
        (tmp / CONFIG).write_text(text)
        try:
            os.link(weights, tmp / WEIGHTS)
        except OSError:
            shutil.copyfile(weights, tmp / WEIGHTS)
        try:
            tmp.rename(final)
        except OSError:  # made meanwhile by another request: theirs is the same
            if not (final / WEIGHTS).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
