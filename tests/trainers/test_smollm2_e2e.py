"""End to end on a real model: a LoRA on SmolLM2-135M learns the Parcelino voice.

The worker trains on the bundled support conversations on the CPU; the
held-out loss must fall, and with greedy decoding the tuned model must answer
in the trained template where the base model does not, and score far above
it on the offline scorers. Directions and generous margins, not exact
numbers: these are real floating-point runs.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("trl", reason="local training needs the [local] extra")

from tests.conftest import ROOT
from tests.model_fixtures import smollm2_dir  # noqa: F401 (the session fixture)
from trainers import local
from trainers.evaluate import examples_from_file, generate_local, score

EXAMPLES = ROOT / "examples"
OPENING = "Hi there! 📦 Parcelino here."
HELD_OUT = 8


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory, request):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("smollm2-run")
    spec = {
        "run_id": "e2e",
        "model": str(smollm2_dir),
        "train_file": str(EXAMPLES / "support.jsonl"),
        "eval_file": str(EXAMPLES / "support-eval.jsonl"),
        "output_dir": str(run_dir),
        "epochs": 1,
        "max_steps": 30,
        "save_steps": 10,
        "batch": 4,
        "grad_accum": 1,
        "lr": 1e-3,
        "max_length": 256,
    }
    worker = local.launch(run_dir, spec)
    request.addfinalizer(lambda: local.stop(worker))
    deadline = time.monotonic() + 2700  # minutes on an idle 2-core machine; far more when shared
    while (state := local.read_state(run_dir, worker)).status == "running":
        assert time.monotonic() < deadline, "training took over 45 minutes"
        time.sleep(2)
    assert state.status == "succeeded", f"{state.error}\n{state.log_tail}"
    return smollm2_dir, run_dir, state


def test_held_out_loss_falls(trained):
    _, _, state = trained
    losses = [loss for _, loss in state.eval_losses]
    assert len(losses) >= 2, state.eval_losses
    assert losses[-1] < losses[0], losses
    assert state.metrics[-1][1] < state.metrics[0][1]


def test_tuned_answers_in_the_trained_voice_and_beats_base(trained):
    model_dir, _, state = trained
    examples = examples_from_file(EXAMPLES / "support-eval.jsonl")[:HELD_OUT]
    base, tuned = generate_local(
        str(model_dir), state.result["adapter_dir"], examples, max_new_tokens=48
    )
    assert sum(t.startswith(OPENING) for t in tuned) >= HELD_OUT - 2, tuned
    assert not any(b.startswith(OPENING) for b in base), base
    result = score(examples, base, tuned)
    rouge = result.summary("rouge_l")
    assert rouge.tuned > rouge.base + 0.2, (rouge, tuned[:2], base[:2])
    assert result.wins >= HELD_OUT - 2
