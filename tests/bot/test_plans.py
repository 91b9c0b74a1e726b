"""Plans as data (bot/plans.py): the stored dict round-trips, old dicts still read,
and a bad field is named in the error."""

from __future__ import annotations

import dataclasses

import pytest

from bot import approvals
from bot.plans import VERSION, Estimate, LocalPlan, OpenAIPlan, TrainingPlan

OPENAI_OLD = {
    "dataset_id": "d1",
    "dataset_sha256": "ab" * 32,
    "provider": "openai",
    "model": "gpt-4o-mini-2024-07-18",
    "epochs": 3,
    "epochs_auto": True,
    "lr_mult": None,
    "batch": 8,
    "suffix": "support",
    "eval_dataset_id": None,
    "split": 0.1,
    "secret_hold": False,
    "estimate": {"billed_tokens": 30_000, "cost_usd": 0.09, "price_per_1m": 3.0},
}

LOCAL_OLD = {
    "dataset_id": "d2",
    "dataset_sha256": "cd" * 32,
    "provider": "local",
    "model": "smollm2",
    "epochs": 2,
    "epochs_auto": False,
    "lr": 2e-4,
    "batch": 4,
    "r": 8,
    "alpha": 32,
    "targets": "q,k,v,o",
    "max_length": 512,
    "qlora": None,
    "merge": True,
    "eval_dataset_id": "d3",
    "split": None,
    "secret_hold": False,
    "estimate": {
        "billed_tokens": 0,
        "cost_usd": 0.0,
        "price_per_1m": 0.0,
        "tokens": 12_000,
        "gpu_hours": 0.0123,
        "params_billions": 0.135,
    },
}


@pytest.mark.parametrize("old", [OPENAI_OLD, LOCAL_OLD], ids=["openai", "local"])
def test_an_old_dict_reads_and_writes_back_the_same_dict_plus_the_version(old):
    plan = TrainingPlan.from_json(old)
    assert type(plan) is (OpenAIPlan if old["provider"] == "openai" else LocalPlan)
    stored = plan.to_json()
    assert stored == {"version": VERSION, **old}
    assert list(stored)[1:] == list(old)  # the same order as before the dataclasses
    assert TrainingPlan.from_json(stored) == plan  # versioned dicts round-trip too
    assert approvals.plan_hash(stored) == approvals.plan_hash(plan.to_json())


def test_hyperparameters_are_what_the_runners_got_from_the_dicts():
    openai = TrainingPlan.from_json(OPENAI_OLD)
    assert openai.hyperparameters() == {"epochs": None, "batch": 8, "lr_mult": None}
    local = TrainingPlan.from_json(LOCAL_OLD)
    assert local.hyperparameters() == {
        "epochs": 2, "lr": 2e-4, "batch": 4, "r": 8, "alpha": 32, "targets": "q,k,v,o",
        "max_length": 512, "qlora": False, "merge": True,
    }  # fmt: skip


def test_keys_missing_from_older_plans_take_their_defaults():
    old = {k: v for k, v in LOCAL_OLD.items() if k not in ("merge", "qlora", "secret_hold")}
    plan = TrainingPlan.from_json(old)
    assert plan.merge is False and plan.qlora is None and plan.secret_hold is False


def test_an_unknown_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        TrainingPlan.from_json({**OPENAI_OLD, "version": 2})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": "3"}, "epochs"),
        ({"dataset_id": ""}, "dataset_id"),
        ({"split": 0.7}, "split"),
        ({"split": 0.1, "eval_dataset_id": "d3"}, "split"),
        ({"lr_mult": float("nan")}, "lr_mult"),
        ({"batch": -1}, "batch"),
        ({"suffix": "no spaces"}, "suffix"),
        ({"secret_hold": "yes"}, "secret_hold"),
    ],
)
def test_a_bad_field_is_named(change, field):
    with pytest.raises(ValueError, match=rf"OpenAIPlan\.{field} "):
        TrainingPlan.from_json({**OPENAI_OLD, **change})


@pytest.mark.parametrize(
    "change, field",
    [({"r": 0}, "r"), ({"lr": float("inf")}, "lr"), ({"targets": ","}, "targets"),
     ({"merge": None}, "merge"), ({"provider": "openai"}, "provider")],
)  # fmt: skip
def test_a_bad_local_field_is_named(change, field):
    plan = TrainingPlan.from_json(LOCAL_OLD)
    with pytest.raises(ValueError, match=rf"LocalPlan\.{field} "):
        dataclasses.replace(plan, **change)


def test_a_bad_estimate_is_named():
    with pytest.raises(ValueError, match=r"Estimate\.cost_usd "):
        Estimate(cost_usd=-1.0)


def test_every_field_has_help():
    for kind in (Estimate, TrainingPlan, OpenAIPlan, LocalPlan):
        for f in dataclasses.fields(kind):
            assert f.metadata.get("help"), f"{kind.__name__}.{f.name}"


def test_plans_are_frozen():
    plan = TrainingPlan.from_json(OPENAI_OLD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs = 5  # type: ignore[misc]


# --- hosted providers beside OpenAI ------------------------------------------------


def _together(**changes):
    from bot.plans import TogetherPlan

    fields = {
        "dataset_id": "d1",
        "dataset_sha256": "ab" * 32,
        "model": "Qwen/Qwen3-8B",
        "epochs": 3,
        "r": 16,
        "alpha": 32.0,
        "dropout": 0.05,
        "suffix": "support",
        "prices_read": "2026-11-30",
        "prices_source": "https://www.together.ai/pricing",
        "split": 0.1,
        "estimate": Estimate(billed_tokens=3_000, cost_usd=0.0014, price_per_1m=0.48),
    }
    return TogetherPlan(**{**fields, **changes})


def test_a_together_plan_round_trips_and_gives_the_runners_names():
    from bot.plans import TogetherPlan

    plan = _together()
    stored = plan.to_json()
    assert (stored["provider"], stored["kind"], stored["lora"]) == ("together", "together", True)
    assert TrainingPlan.from_json(stored) == plan
    assert plan.hyperparameters() == {
        "epochs": 3, "lora": True, "lr": None, "batch": None, "r": 16, "alpha": 32.0,
        "dropout": 0.05,
    }  # fmt: skip
    # A providers-file provider of kind together reads back as a TogetherPlan too.
    named = _together(provider="tog").to_json()
    assert isinstance(TrainingPlan.from_json(named), TogetherPlan)


def test_a_compatible_plan_is_read_back_by_its_kind():
    from bot.plans import CompatiblePlan

    plan = CompatiblePlan(
        dataset_id="d1", dataset_sha256="ab" * 32, provider="acme", model="acme-8b",
        epochs=3, prices_read="2026-11-30", prices_source="https://acme.example/pricing",
    )  # fmt: skip
    stored = plan.to_json()
    assert stored["kind"] == "openai-compatible"
    assert TrainingPlan.from_json(stored) == plan
    with pytest.raises(ValueError, match=r"CompatiblePlan.kind must be openai or openai-compat"):
        dataclasses.replace(plan, kind="together")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"lora": False}, "TogetherPlan.r applies to LoRA only"),
        ({"dropout": 1.0}, "TogetherPlan.dropout must be a number in [0, 1)"),
        ({"batch": 0}, "TogetherPlan.batch must be"),
        ({"lr": float("nan")}, "TogetherPlan.lr must be"),
        ({"suffix": "no spaces allowed"}, "TogetherPlan.suffix must be"),
        ({"kind": "openai"}, "TogetherPlan.kind must be together"),
        ({"lora": "yes"}, "TogetherPlan.lora must be true or false"),
    ],
)
def test_a_bad_together_field_is_named(changes, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(")", r"\)")):
        _together(**changes)


def test_a_providers_file_host_of_openais_api_is_refused_after_the_cutoff(tmp_path):
    """A providers-file host of kind openai (OpenAI under another key) gets the same
    refusal as provider=openai after the cutoff, naming the alternatives."""
    import datetime as dt

    from bot.config import Settings
    from bot.errors import UserError
    from bot.plans import Planner
    from trainers.providers import load

    path = tmp_path / "providers.toml"
    path.write_text(
        '[providers.team2]\nkind = "openai"\nbase_url = "https://api.openai.com/v1"\n'
        'api_key_env = "TEAM2_OPENAI_KEY"\nprices_read = 2026-11-30\n'
        'prices_source = "https://openai.com/api/pricing"\n'
        '[providers.team2.models."gpt-4.1-mini-2025-04-14"]\n'
        "training_per_1m = 5.0\ninput_per_1m = 0.8\noutput_per_1m = 3.2\ncontext = 65536\n"
    )
    providers = load(path)

    def on(day: dt.date) -> Planner:
        noon = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
        return Planner(Settings(), None, None, None, lambda: noon, providers=providers)

    opts = {"model": "gpt-4.1-mini-2025-04-14"}
    with pytest.raises(UserError) as refused:
        on(dt.date(2027, 1, 6)).compatible(providers["team2"], None, None, opts, "C1")
    text = refused.value.summary
    assert text.startswith("OpenAI creates no new fine-tuning jobs since 2027-01-06;"), text
    assert "together (Together AI, TOGETHER_API_KEY not set)" in text
    assert "`/finetune migrate <run> provider=<name>`" in text
