"""What `model=` may name on a local run, over signed HTTP: names, hub ids, folders, runs.

Refused forms are usage errors listing what is allowed and create no run; a
folder inside TUNEBOT_MODEL_DIRS (the tiny model) and a succeeded run of the
same channel are accepted; a folder that moved out of the dirs after the
request is refused again at launch; an unmerged run is merged at launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from bot.local_models import is_hub_id
from tests.bot.test_runs import click, request, texts, upload
from tests.conftest import training_file
from tests.fakes.signing import file_share_message_event
from trainers import local

try:  # the folder tests need the tiny model; the refusals need no torch
    from tests.trainers.test_lora import tiny
except pytest.skip.Exception:

    @pytest.fixture(scope="session")
    def tiny():
        pytest.skip("needs the [local] extra")


ALLOWED = (
    "`model=` takes",
    "tunebot models",
    "`smollm2`",
    "owner/name",
    "TUNEBOT_MODEL_DIRS",
    "rN",
)


def assert_usage_error(body: dict, needle: str) -> None:
    text = body["text"]
    assert body["response_type"] == "ephemeral", text
    assert needle in text, text
    for word in ALLOWED:
        assert word in text, (word, text)


@pytest.fixture
def models_bot(paid_bot, tmp_path):
    """A local bot whose runs wait for approval (nothing trains), with one models folder."""

    def start(**overrides):
        dirs = tmp_path / "models"
        (dirs / "ok").mkdir(parents=True, exist_ok=True)
        settings = {
            "default_provider": "local",
            "local_needs_approval": True,
            "model_dirs": (str(dirs),),
            **overrides,
        }
        return paid_bot(**settings)

    return start


def test_hub_ids_follow_the_hubs_rules():
    for good in ("owner/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "a_b/c.d-1"):
        assert is_hub_id(good), good
    for bad in (
        "a/b/c",
        "owner/..",
        "a..b/c",
        "-a/b",
        "a/b.",
        "a--b/c",
        "",
        "/x",
        "a/",
        "~x",
        "a b",
    ):
        assert not is_hub_id(bad), bad
    assert not is_hub_id("o/" + "n" * 97)


def test_refused_models_list_what_is_allowed_and_create_no_run(models_bot, tmp_path):
    bot = models_bot()
    dirs, outside = tmp_path / "models", tmp_path / "elsewhere"
    outside.mkdir()
    (dirs / "link-out").symlink_to(outside)
    upload(bot)
    refused = {
        "~/x": "`~` paths are not allowed",
        "~": "`~` paths are not allowed",
        "~root/models/m": "`~` paths are not allowed",
        "/etc": "outside TUNEBOT_MODEL_DIRS",
        str(outside): "outside TUNEBOT_MODEL_DIRS",
        f"{dirs}/../elsewhere": "outside TUNEBOT_MODEL_DIRS",
        f"{dirs}/link-out": "outside TUNEBOT_MODEL_DIRS",
        f"{dirs}/missing": "there is no such folder",
        "../x": "relative paths are not allowed",
        "./ok": "relative paths are not allowed",
        "a/b/c": "neither a known name, a hub id",
        "owner/..": "neither a known name, a hub id",
        "owner/a..b": "neither a known name, a hub id",
        "bot": "a folder on this server",  # beside the bot: transformers would read it
        "tests/fakes": "a folder on this server",
        "r1": "there is no run r1 in this channel",
    }
    for model, why in refused.items():
        body = request(bot, f"train provider=local model={model}")
        assert_usage_error(body, why)
        assert "is not allowed" in body["text"]
    assert bot.store.runs(limit=None) == []


def test_no_folder_is_allowed_without_model_dirs(models_bot, tmp_path):
    bot = models_bot(model_dirs=())
    upload(bot)
    body = request(bot, f"train provider=local model={tmp_path / 'models' / 'ok'}")
    assert_usage_error(body, "no folder is allowed: TUNEBOT_MODEL_DIRS is not set")
    assert "(none is set here)" in body["text"]
    assert bot.store.runs(limit=None) == []


@pytest.mark.parametrize("setting", ["~/models/m", "/etc", "../m", "r1", "a/b/c"])
def test_the_default_model_setting_is_checked_too(models_bot, setting):
    bot = models_bot(local_base_model=setting)
    upload(bot)
    body = request(bot, "train provider=local")
    assert_usage_error(body, "which a local run cannot use")  # its paths shown cut short
    assert "TUNEBOT_LOCAL_BASE_MODEL is `" in body["text"]
    assert "Ask whoever runs tunebot to fix the setting" in body["text"]
    assert bot.store.runs(limit=None) == []


def test_names_hub_ids_and_folders_inside_the_dirs_are_accepted(models_bot, tiny, tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    (links / "tiny").symlink_to(tiny.model)  # a link that stays inside the allowed folders
    bot = models_bot(model_dirs=(str(tiny.root), str(links)))
    upload(bot)
    accepted = ["smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tiny.model), f"{links}/tiny"]
    for n, model in enumerate(accepted, 1):
        body = request(bot, f"train provider=local model={model}")
        assert f"r{n} needs approval" in body["text"], body["text"]
        assert bot.store.get_run(f"r{n}").plan_json["model"] == model
    # The setting may name a folder inside the dirs too.
    bot = models_bot(
        model_dirs=(str(tiny.root),), local_base_model=str(tiny.model), home=tmp_path / "home2"
    )
    upload(bot)
    assert "needs approval" in request(bot, "train provider=local")["text"]


def test_a_folder_moved_out_of_the_dirs_is_refused_at_launch(models_bot, tiny, tmp_path):
    bot = models_bot()
    dirs = tmp_path / "models"
    shutil.copytree(tiny.model, dirs / "m")
    upload(bot)
    assert "r1 needs approval" in request(bot, f"train provider=local model={dirs}/m")["text"]
    shutil.rmtree(dirs / "m")
    (dirs / "m").symlink_to(tiny.model)  # the same name now leads out of the allowed folder
    assert click(bot, "UA", "approve_run") == 200
    bot.wait_idle()
    run = bot.store.get_run("r1")
    assert run.status == "failed", run.status
    assert run.error.startswith("cannot get model") and "outside TUNEBOT_MODEL_DIRS" in run.error
    assert run.external_id is None  # no worker was started
    assert any("r1 ❌" in t for t in texts(bot))


def _add_run(bot, run_id_channel: str, status: str, provider: str = "local", **result):
    run = bot.store.add_run(
        dataset_id="d1",
        provider=provider,
        model="smollm2",
        status=status,
        channel=run_id_channel,
        plan_json={"estimate": {"params_billions": 0.135}},
        result_json=result or None,
    )
    return run, bot.workflow.runs.run_dir(run.id)


def test_runs_are_models_only_in_their_channel_and_once_succeeded(models_bot):
    bot = models_bot()
    upload(bot)
    home_runs = bot.settings.home / "runs"
    other, _ = _add_run(bot, "C2", "succeeded", merged_dir=str(home_runs / "r1" / "merged"))
    failed, _ = _add_run(bot, "C1", "failed")
    hosted, _ = _add_run(bot, "C1", "succeeded", provider="openai")
    merged, merged_dir = _add_run(
        bot, "C1", "succeeded", merged_dir=str(home_runs / "r4" / "merged")
    )
    (home_runs / "r1" / "merged").mkdir(parents=True)
    (merged_dir / "merged").mkdir(parents=True)
    _, unmerged_dir = _add_run(
        bot, "C1", "succeeded", adapter_dir=str(home_runs / "r5" / "adapter"), merged_dir=None
    )
    (unmerged_dir / "adapter").mkdir(parents=True)
    (unmerged_dir / "adapter" / "adapter_config.json").write_text("{}")
    (unmerged_dir / local.SPEC).write_text(
        json.dumps({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    )
    gone, _ = _add_run(bot, "C1", "succeeded", adapter_dir=str(home_runs / "r6" / "adapter"))

    for ref, why in [
        (other.id, "there is no run r1 in this channel"),  # another channel's run
        (failed.id, "r2 is not a succeeded local run"),
        (hosted.id, "r3 is not a succeeded local run"),
        (gone.id, "r6's adapter is gone"),
        ("r99", "there is no run r99 in this channel"),
    ]:
        assert_usage_error(request(bot, f"train provider=local model={ref}"), why)
    assert len(bot.store.runs(limit=None)) == 6

    assert "r7 needs approval" in request(bot, f"train provider=local model={merged.id}")["text"]
    assert "r8 needs approval" in request(bot, "train provider=local model=R5")["text"]
    assert bot.store.get_run("r7").plan_json["model"] == "r4"
    assert bot.store.get_run("r8").plan_json["model"] == "r5"
    assert bot.store.get_run("r8").plan_json["estimate"]["params_billions"] == 0.135
    # The same run from the other channel is refused there too.
    other_file = bot.slack.add_file(training_file(40), name="other.jsonl", channel="C2")
    bot.event(file_share_message_event(other_file), event_id="EvOther")
    bot.wait_idle()
    _, body = bot.command("train provider=local model=r4", user_id="UR", channel_id="C2")
    assert "there is no run r4 in this channel" in body["text"]


def test_an_unmerged_run_is_merged_at_launch_and_trained_on(paid_bot, tiny):
    """`model=r1` where r1 kept only its adapter: base + adapter merged into r2's base/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.bot.test_local_runs import FAST, tick_until

    bot = paid_bot(default_provider="local", model_dirs=(str(tiny.root),), judge_model="")
    bot.workflow.runs.local_overrides.update(FAST, max_steps=1)
    upload(bot)
    first, first_dir = _add_run(bot, "C1", "succeeded", adapter_dir=None)
    adapter_dir = first_dir / "adapter"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny.model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # LoRA's B starts at zero: make the merge change something
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(adapter_dir)
    (first_dir / local.SPEC).write_text(json.dumps({"model": str(tiny.model)}))
    bot.store.update_run(first.id, result_json={"adapter_dir": str(adapter_dir)})
    try:
        body = request(bot, "train provider=local model=r1")
        assert "r2 accepted" in body["text"], body["text"]
        run = tick_until(bot, "r2", ("succeeded", "failed"))
        assert run.status == "succeeded", run.error
        run_dir = bot.workflow.runs.run_dir("r2")
        spec = json.loads((run_dir / local.SPEC).read_text())
        assert spec["model"] == str(run_dir / "base")
        assert (run_dir / "base" / "config.json").is_file()
        assert (run_dir / "base" / ".tunebot-merged.json").is_file()
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "base")
        plain = AutoModelForCausalLM.from_pretrained(tiny.model)
        assert not torch.equal(
            merged.model.layers[0].self_attn.q_proj.weight,
            plain.model.layers[0].self_attn.q_proj.weight,
        )
        bot.wait_idle()  # the evaluation loads the base r2 trained on, not "r1"
        assert any(t.startswith("r2 evaluation:") for t in texts(bot)), texts(bot)
    finally:
        worker = local.worker_of(bot.workflow.runs.run_dir("r2"))
        if local.alive(worker):
            os.killpg(worker.pid, signal.SIGKILL)
            time.sleep(0.1)
