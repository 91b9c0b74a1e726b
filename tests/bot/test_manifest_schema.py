"""manifest.yml against Slack's app manifest JSON schema (draft-07)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.conftest import ROOT
from tests.fakes.slack_api import METHOD_SCOPES

MANIFEST = ROOT / "manifest.yml"
SCHEMA = ROOT.parent / "shared" / "slack-app-manifest.schema.json"


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    if not SCHEMA.is_file():
        pytest.skip(f"Slack manifest schema not found at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def _errors(validator: Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def test_manifest_validates(validator: Draft7Validator, manifest: dict[str, Any]) -> None:
    assert _errors(validator, manifest) == []


def _unknown_top_level(m: dict[str, Any]) -> None:
    m["setting"] = {"socket_mode_enabled": True}  # typo for "settings"


def _bad_colour(m: dict[str, Any]) -> None:
    m["display_information"]["background_color"] = "2c3e50"


def _spaced_bot_name(m: dict[str, Any]) -> None:
    m["features"]["bot_user"]["display_name"] = "tune bot"


def _command_without_description(m: dict[str, Any]) -> None:
    del m["features"]["slash_commands"][0]["description"]


def _string_for_bool(m: dict[str, Any]) -> None:
    m["settings"]["socket_mode_enabled"] = "yes"


@pytest.mark.parametrize(
    "break_it",
    [
        _unknown_top_level,
        _bad_colour,
        _spaced_bot_name,
        _command_without_description,
        _string_for_bool,
    ],
)
def test_broken_manifest_is_rejected(
    validator: Draft7Validator, manifest: dict[str, Any], break_it: Any
) -> None:
    broken = copy.deepcopy(manifest)
    break_it(broken)
    assert _errors(validator, broken), f"{break_it.__name__} should fail validation"


def test_manifest_is_set_up_for_socket_mode(manifest: dict[str, Any]) -> None:
    settings = manifest["settings"]
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True
    # In Socket Mode Slack ignores request URLs; leaving them out avoids stale hosts.
    assert "request_url" not in settings["event_subscriptions"]
    assert "request_url" not in settings["interactivity"]
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == "/finetune"
    assert "url" not in command
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "message.channels",
        "message.groups",
        "file_shared",
        "app_home_opened",
    }


def test_bot_scopes_are_exactly_what_the_bot_calls(manifest: dict[str, Any]) -> None:
    """Every scope a Web API method in bot/ needs is requested, and nothing more (a
    token that can do less leaks less)."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "bot").glob("*.py"))
    called = {
        method
        for method in METHOD_SCOPES
        if "." in method and f".{method.replace('.', '_')}(" in source
    }
    assert {"chat.postMessage", "files.info", "usergroups.users.list"} <= called
    needed = {METHOD_SCOPES[m] for m in called} | {"commands", "channels:read", "groups:read"}
    # files_upload_v2 calls getUploadURLExternal + completeUploadExternal.
    if ".files_upload_v2(" in source:
        needed.add("files:write")
    # Downloading url_private and the file_shared event need files:read;
    # message.channels / message.groups events need the matching history scopes.
    needed |= {"files:read", "channels:history", "groups:history"}
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes == needed, (
        f"missing: {sorted(needed - scopes)}, unused: {sorted(scopes - needed)}"
    )
