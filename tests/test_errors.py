"""One exception tree per package, and `REFUSED` catches every one of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bot.errors import REFUSED, BotError
from storage.errors import StorageError
from trainers.errors import TrainerError

ROOT = Path(__file__).resolve().parents[1]
BASES = {"bot": BotError, "trainers": TrainerError, "storage": StorageError}


def _public_exceptions() -> list[tuple[str, str]]:
    """(module, class) for every public class in bot/, trainers/, storage/ whose name
    ends in Error, or that subclasses an exception by name."""
    found = []
    for package in BASES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                    continue
                bases = {ast.unparse(b) for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Busy")) for b in bases) or any(
                    b in {"NotFound", "UserError", "ChatError", "LookupError"} for b in bases
                ):
                    found.append((module, node.name))
    return found


@pytest.mark.parametrize(("module", "name"), _public_exceptions())
def test_every_public_exception_is_under_its_package_base(module, name):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BASES[module.split(".")[0]]), f"{module}.{name}"
    assert issubclass(cls, REFUSED)


def test_the_walk_finds_the_trees():
    names = {name for _, name in _public_exceptions()}
    assert {"UserError", "OpenAIError", "NotFound", "HomeLocked", "ChatBusy"} <= names
