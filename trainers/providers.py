"""Hosted fine-tuning providers a team configures: the providers file (TOML).

`TUNEBOT_PROVIDERS` names a TOML file; each table is one provider:

    [providers.acme]
    kind = "openai-compatible"            # openai | openai-compatible | together
    base_url = "https://ft.acme.example/v1"
    api_key_env = "ACME_API_KEY"          # the environment variable holding its key
    prices_read = "2026-11-30"            # when the prices below were read
    prices_source = "https://acme.example/pricing"

    [providers.acme.models."acme-8b"]
    training_per_1m = 0.5                 # USD per 1M training tokens
    input_per_1m = 0.2                    # USD per 1M tokens in and out, for evaluation
    output_per_1m = 0.2
    context = 32768                       # training context, tokens

An ``openai-compatible`` provider serves OpenAI's files and fine_tuning.jobs
API at its own URL, so tunebot's OpenAI runner drives it unchanged; a
``together`` one uses trainers.together_ft. The key itself never goes in the
file: only the name of the variable that holds it. `load` raises
`ProvidersFileError` naming the file, the provider and the field.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.errors import TrainerError
from trainers.pricing import ModelPrice

KINDS = ("openai", "openai-compatible", "together")
# Provider names tunebot uses itself (openai and together are configured by
# OPENAI_API_KEY / OPENAI_BASE_URL and TOGETHER_API_KEY / TUNEBOT_TOGETHER_BASE_URL).
RESERVED = ("local", "distill", "eval", "openai", "together")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_ENV = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
_NOT_A_PROVIDER_KEY = ("SLACK_",)  # tunebot's own Slack token and signing secret


def _secret_in_url(url: str) -> bool:
    """True when a URL carries a user or password, a query or a fragment."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return bool(
        parts.username or parts.password or "@" in parts.netloc or parts.query or parts.fragment
    )


class ProvidersFileError(TrainerError, ValueError):
    """The providers file cannot be read, or says something tunebot cannot use."""


@dataclass(frozen=True)
class Provider:
    """One configured provider. `models` are priced like trainers.pricing's table."""

    name: str
    kind: str
    base_url: str | None
    api_key_env: str
    models: tuple[ModelPrice, ...] = ()
    prices_read: dt.date | None = None
    prices_source: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key from its variable ('' when unset)."""
        return (os.environ if environ is None else environ).get(self.api_key_env, "")

    def model(self, name: str) -> ModelPrice | None:
        key = name.strip().lower()
        return next((m for m in self.models if key == m.name.lower() or key in m.aliases), None)


def load_optional(path: str | Path | None) -> dict[str, Provider]:
    """`load(path)`, or {} when no providers file is configured (None)."""
    return {} if path is None else load(path)


def load(path: str | Path) -> dict[str, Provider]:
    """The providers in the file at `path`, by name."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvidersFileError(f"cannot read providers file {where}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvidersFileError(f"providers file {where} is not valid TOML: {exc}") from None
    table = data.get("providers")
    if not isinstance(table, dict) or not table:
        raise ProvidersFileError(f"providers file {where} needs at least one [providers.<name>]")
    return {name: _provider(where, name, entry) for name, entry in table.items()}


def _provider(where: str, name: str, entry: Any) -> Provider:
    at = f"{where}: providers.{name}"
    if not _NAME.fullmatch(name) or name in RESERVED:
        raise ProvidersFileError(
            f"{at}: a provider name is lower-case letters, digits, - and _ (up to 32), "
            f"and not one of {', '.join(RESERVED)}"
        )
    if not isinstance(entry, dict):
        raise ProvidersFileError(f"{at} must be a table")
    unknown = sorted(
        set(entry) - {"kind", "base_url", "api_key_env", "models", "prices_read", "prices_source"}
    )
    if unknown:
        raise ProvidersFileError(f"{at}: unknown field {unknown[0]!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ProvidersFileError(f"{at}.kind must be one of {', '.join(KINDS)}, not {kind!r}")
    base_url = entry.get("base_url")
    if kind == "openai-compatible" and not base_url:
        raise ProvidersFileError(f"{at}.base_url is needed for an openai-compatible provider")
    if base_url is not None and not (
        isinstance(base_url, str) and re.match(r"https?://[^\s/]+", base_url)
    ):
        raise ProvidersFileError(f"{at}.base_url must be an http(s) URL")
    if base_url is not None and _secret_in_url(base_url):
        # `/finetune providers` shows the URL in Slack: a secret in it would be posted
        raise ProvidersFileError(
            f"{at}.base_url must not carry a user, password, query or fragment: the key "
            "goes in the variable api_key_env names"
        )
    env = entry.get("api_key_env")
    if not isinstance(env, str) or not _ENV.fullmatch(env):
        raise ProvidersFileError(
            f"{at}.api_key_env must name an environment variable (e.g. ACME_API_KEY), "
            "never hold the key itself"
        )
    if env.startswith(_NOT_A_PROVIDER_KEY):
        raise ProvidersFileError(
            f"{at}.api_key_env names one of tunebot's own Slack secrets ({env}); the provider "
            "would be sent it as its key"
        )
    read = entry.get("prices_read")
    if read is not None and not isinstance(read, dt.date):
        raise ProvidersFileError(f"{at}.prices_read must be a date (2026-11-30)")
    source = entry.get("prices_source")
    if source is not None and not isinstance(source, str):
        raise ProvidersFileError(f"{at}.prices_source must be text")
    models = entry.get("models", {})
    if not isinstance(models, dict):
        raise ProvidersFileError(f"{at}.models must be a table of models")
    return Provider(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key_env=env,
        models=tuple(_model(f"{at}.models.{m!r}", m, v) for m, v in models.items()),
        prices_read=read,
        prices_source=source,
    )


def _model(at: str, name: str, entry: Any) -> ModelPrice:
    if not isinstance(entry, dict):
        raise ProvidersFileError(f"{at} must be a table")
    allowed = {"training_per_1m", "input_per_1m", "output_per_1m", "context", "aliases"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ProvidersFileError(f"{at}: unknown field {unknown[0]!r}")
    prices = {}
    for key in ("training_per_1m", "input_per_1m", "output_per_1m"):
        value = entry.get(key)
        if value is None and key != "training_per_1m":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
            raise ProvidersFileError(f"{at}.{key} must be a price in USD per 1M tokens (>= 0)")
        prices[key] = float(value)
    context = entry.get("context")
    if isinstance(context, bool) or not isinstance(context, int) or not 0 < context <= 10**7:
        raise ProvidersFileError(f"{at}.context must be a whole number of tokens")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ProvidersFileError(f"{at}.aliases must be a list of names")
    return ModelPrice(
        name=name,
        training_per_1m=prices["training_per_1m"],
        context=context,
        aliases=tuple(a.lower() for a in aliases),
        input_per_1m=prices.get("input_per_1m"),
        output_per_1m=prices.get("output_per_1m"),
        ft_input_per_1m=prices.get("input_per_1m"),
        ft_output_per_1m=prices.get("output_per_1m"),
    )
