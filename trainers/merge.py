"""A base model with a LoRA adapter merged in, saved as a plain model folder.

A local run can train on an earlier run (`model=r3`). When that run saved a
merged model (`merge=true`) its folder is used as it is; otherwise its base
and its adapter are merged once into a folder of the new run, by
`merged(base, adapter, out)`, which runs ``python -m trainers.merge`` in a
process of its own (the caller never loads torch), with the environment of
`trainers.local.worker_env`.

The folder is built beside `out` and renamed into place with a marker file
written last, so a crash leaves nothing half-made under `out`'s name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainers.errors import TrainerError

MARKER = ".tunebot-merged.json"
MERGE_TIMEOUT_S = 3600


class MergeError(TrainerError, RuntimeError):
    """The merge failed; the message is one line."""


def is_merged(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def merged(
    base: str,
    adapter: str | Path,
    out: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = MERGE_TIMEOUT_S,
) -> Path:
    """`out`, holding `base` with `adapter` merged in; made unless it is there already."""
    from trainers.local import _project_root, worker_env

    out = Path(out)
    if is_merged(out):
        return out
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise MergeError(
            f"{Path(adapter).name} has no adapter_config.json: not a saved LoRA adapter"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.build"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trainers.merge", str(base), str(adapter), str(build)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=worker_env(os.environ if env is None else env),
            cwd=_project_root(),
        )
        if done.returncode != 0 or not is_merged(build):
            raise MergeError(
                f"merging the adapter failed: {_last_line(done.stderr or done.stdout)}"
            )
        if out.exists():
            shutil.rmtree(out)  # a folder without the marker: an interrupted merge
        os.replace(build, out)
    except subprocess.TimeoutExpired:
        raise MergeError(f"merging the adapter took over {timeout:.0f} s") from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out


def merge(base: str, adapter: str, out: Path) -> None:
    """Load, merge and save in this process (the worker's side)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(source).save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"base": base, "adapter": adapter}, indent=2) + "\n")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m trainers.merge BASE ADAPTER OUT", file=sys.stderr)
        return 2
    merge(args[0], args[1], Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
