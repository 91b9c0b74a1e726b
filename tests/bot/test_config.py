"""bot.config: the one reader of the environment, and the README's table of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings
from tests.conftest import ROOT

README = ROOT / "README.md"


def test_defaults_from_an_empty_mapping():
    s = Settings.from_env({})
    assert s.max_file_mb == 512 and s.channels == () and s.slack_api_url == "https://slack.com/api/"
    assert s.serves("C123")


def test_values_are_parsed():
    s = Settings.from_env(
        {
            "TUNEBOT_CHANNELS": " C1, C2 ,,",
            "TUNEBOT_MAX_FILE_MB": "64",
            "TUNEBOT_HOME": "/srv/tunebot",
            "SLACK_API_URL": "http://127.0.0.1:9/api",
        }
    )
    assert s.channels == ("C1", "C2") and s.serves("C2") and not s.serves("C3")
    assert s.max_file_bytes == 64 * 2**20
    assert s.home == Path("/srv/tunebot")
    assert s.slack_api_url == "http://127.0.0.1:9/api/"


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().max_file_mb = 1  # type: ignore[misc]


@pytest.mark.parametrize("value", ["ten", "0", "-1"])
def test_bad_numbers_name_the_variable(value):
    with pytest.raises(ConfigError, match="TUNEBOT_MAX_FILE_MB"):
        Settings.from_env({"TUNEBOT_MAX_FILE_MB": value})


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("artifacts", "must be an absolute folder"),
        ("~/artifacts", "must be an absolute folder"),
        ("gs://bucket/runs", "gs:// is not supported; give a folder or file:/// URI"),
        ("file://otherhost/runs", "names another host"),
    ],
)
def test_an_artifacts_root_other_nodes_cannot_see_is_refused_at_start(value, says):
    with pytest.raises(ConfigError, match="TUNEBOT_ARTIFACTS") as info:
        Settings.from_env({"TUNEBOT_ARTIFACTS": value})
    assert says in str(info.value)


def test_an_artifacts_root_with_a_space_is_kept_as_given():
    for value in ("/srv/shared tunebot", "file:///srv/shared%20tunebot"):
        assert Settings.from_env({"TUNEBOT_ARTIFACTS": value}).artifacts == value


def test_an_s3_artifacts_root_is_taken_with_s3fs_and_refused_with_credentials_in_it():
    pytest.importorskip("s3fs", reason="s3:// artifacts need the [s3] extra")
    value = "s3://team-bucket/tunebot/runs"
    assert Settings.from_env({"TUNEBOT_ARTIFACTS": value}).artifacts == value
    for value in ("s3://AKIAXYZ:hunter2@team-bucket/runs", "s3://team-bucket/runs?sig=hunter2"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({"TUNEBOT_ARTIFACTS": value})
        said = str(info.value)
        assert said.startswith("TUNEBOT_ARTIFACTS: an s3:// root is s3://bucket/prefix alone")
        assert "AWS_ACCESS_KEY_ID" in said
        assert "hunter2" not in said and "AKIAXYZ" not in said


def test_an_s3_artifacts_root_without_s3fs_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the [s3] extra were not installed
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TUNEBOT_ARTIFACTS": "s3://team-bucket/runs"})
    assert str(info.value) == (
        "TUNEBOT_ARTIFACTS: s3:// roots need the [s3] extra: pip install -e '.[s3]' in tunebot's folder"
    )


def test_a_ray_address_with_credentials_is_refused_and_not_repeated():
    for value in ("http://admin:hunter2@10.0.0.5:8265", "http://10.0.0.5:8265/?token=hunter2"):
        with pytest.raises(ConfigError, match="TUNEBOT_RAY_ADDRESS") as info:
            Settings.from_env({"TUNEBOT_RAY_ADDRESS": value})
        assert "hunter2" not in str(info.value)
    for value in ("http://10.0.0.5:8265", "127.0.0.1:8265", "https://ray.internal"):
        assert Settings.from_env({"TUNEBOT_RAY_ADDRESS": value}).ray_address == value


def test_readme_documents_every_setting():
    readme = README.read_text()
    for env, _, _ in Settings.documented():
        assert f"| `{env}` |" in readme, env
