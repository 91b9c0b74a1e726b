"""trainers.providers: the providers file (TOML) read strictly, the key never in it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from trainers.providers import ProvidersFileError, load

GOOD = """
[providers.acme]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "ACME_API_KEY"
prices_read = 2026-11-30
prices_source = "https://acme.example/pricing"

[providers.acme.models."acme-8b"]
training_per_1m = 0.5
input_per_1m = 0.2
output_per_1m = 0.4
context = 32768
aliases = ["Acme8"]

[providers.tog]
kind = "together"
api_key_env = "TOGETHER_API_KEY"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return path


def test_a_good_file_reads_into_providers_with_priced_models(tmp_path):
    providers = load(write(tmp_path, GOOD))
    acme, tog = providers["acme"], providers["tog"]
    assert (acme.kind, acme.base_url, acme.api_key_env) == (
        "openai-compatible", "http://127.0.0.1:9/v1", "ACME_API_KEY",
    )  # fmt: skip
    assert acme.prices_read == dt.date(2026, 11, 30)
    model = acme.model("acme8")
    assert model.name == "acme-8b" and model.training_per_1m == 0.5 and model.context == 32768
    assert model.input_per_1m == 0.2 and model.ft_output_per_1m == 0.4
    assert acme.api_key({"ACME_API_KEY": "k"}) == "k" and acme.api_key({}) == ""
    assert tog.kind == "together" and tog.base_url is None and tog.models == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "at least one [providers.<name>]"),
        ("[providers", "not valid TOML"),
        ('[providers.local]\nkind = "openai"\napi_key_env = "K"', "not one of local"),
        ('[providers.a]\nkind = "azure"\napi_key_env = "K"', "providers.a.kind must be one of"),
        ('[providers.a]\nkind = "openai-compatible"\napi_key_env = "K"', "base_url is needed"),
        ('[providers.a]\nkind = "openai"\nbase_url = "ftp://x"\napi_key_env = "K"', "http(s) URL"),
        ('[providers.a]\nkind = "openai"\napi_key_env = "sk-live-123"', "never hold the key"),
        (
            '[providers.a]\nkind = "openai"\nbase_url = "https://u:sk-1@h.example/v1"\n'
            'api_key_env = "K"',
            "must not carry a user, password, query or fragment",
        ),
        (
            '[providers.a]\nkind = "openai"\nbase_url = "https://h.example/v1?key=sk-1"\n'
            'api_key_env = "K"',
            "must not carry a user, password, query or fragment",
        ),
        (
            '[providers.a]\nkind = "openai"\napi_key_env = "SLACK_BOT_TOKEN"',
            "names one of tunebot's own Slack secrets (SLACK_BOT_TOKEN)",
        ),
        ('[providers.a]\nkind = "openai"\napi_key_env = "K"\nkey = "x"', "unknown field 'key'"),
        (
            '[providers.a]\nkind = "openai"\napi_key_env = "K"\n[providers.a.models.m]\ncontext = 8',
            "training_per_1m must be a price",
        ),
        (
            '[providers.a]\nkind = "openai"\napi_key_env = "K"\n'
            "[providers.a.models.m]\ntraining_per_1m = 1\ncontext = 0",
            "context must be a whole number",
        ),
    ],
)
def test_each_mistake_is_named_with_its_place(tmp_path, text, says):
    with pytest.raises(ProvidersFileError, match=None) as caught:
        load(write(tmp_path, text))
    assert says in str(caught.value) and "providers.toml" in str(caught.value)
    assert "sk-1" not in str(caught.value)  # a secret in the URL is not repeated


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ProvidersFileError, match="cannot read providers file"):
        load(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["openai", "together", "local"])
def test_the_built_in_names_are_not_taken_by_the_file(tmp_path, name):
    path = tmp_path / "providers.toml"
    path.write_text(
        f'[providers.{name}]\nkind = "openai-compatible"\nbase_url = "https://x.example/v1"\napi_key_env = "X_KEY"\n'
    )
    with pytest.raises(ProvidersFileError, match=f"providers.{name}: a provider name is"):
        load(path)
