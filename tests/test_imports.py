"""The house's import rules, walked from the source (no module is imported).

- No import circle anywhere in bot/, trainers/ or storage/, counting imports
  made inside functions and in `if TYPE_CHECKING:` blocks too.
- storage/ and trainers/ know nothing of Slack or of bot/; storage/ nothing
  of trainers/.
- torch, transformers, peft, trl, datasets, bitsandbytes and accelerate are
  imported inside the functions that use them, never at a module's top level.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "trainers", "storage")
HEAVY = {"torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate"}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imports(path: Path, modules: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(project modules imported anywhere, TYPE_CHECKING blocks included; top-level
    packages imported anywhere, and at module level, TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours: set[str] = set()
    anywhere: set[str] = set()
    top: set[str] = set()

    def visit(node: ast.AST, at_top: bool, typing: bool = False) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:  # only for the circle: a type is an import too
                visit(child, at_top, typing=True)
            for child in node.orelse:
                visit(child, at_top, typing)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in modules:
                ours.add(name)
            if typing:
                continue
            anywhere.add(name.split(".")[0])
            if at_top:
                top.add(name.split(".")[0])
        inner = at_top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, typing)

    visit(tree, True)
    return ours, anywhere, top


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {name: _imports(path, names)[0] - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_storage_and_trainers_know_nothing_of_slack_or_the_bot():
    modules = _modules()
    names = set(modules)
    for name, path in modules.items():
        _, anywhere, _ = _imports(path, names)
        if name.startswith(("storage", "trainers")):
            assert not anywhere & {"bot", "slack_bolt", "slack_sdk"}, name
        if name.startswith("storage"):
            assert "trainers" not in anywhere, name


def test_heavy_libraries_are_imported_where_they_are_used():
    modules = _modules()
    names = set(modules)
    for name, path in modules.items():
        _, _, top = _imports(path, names)
        assert not top & HEAVY, f"{name} imports {sorted(top & HEAVY)} at module level"


def test_the_architecture_map_names_modules_that_exist_and_every_runner():
    """docs/architecture.md stays true: each module it names exists, and each
    registered Runner is in its table."""
    import re

    from trainers.runners import RUNNERS

    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:bot|trainers|storage)/[\w/]+\.py)`", doc))
    assert named, "the map names no module"
    for path in sorted(named):
        assert (ROOT / path).is_file(), f"docs/architecture.md names {path}, which does not exist"
    for name, target in RUNNERS.items():
        module = target.split(":")[0].replace(".", "/") + ".py"
        assert f"| `{name}` |" in doc and module in doc, f"runner {name} is not in the map"


USE_CASES = {
    "bot.datasets",
    "bot.runs",
    "bot.plans",
    "bot.decisions",
    "bot.admin",
    "bot.evaluation",
    "bot.distillation",
    "bot.home",
}


def test_the_context_knows_no_use_case_and_no_use_case_knows_the_workflow():
    """bot/context.py is the services alone; the use-cases get it (and each other)
    through their constructors, and only the entry layer and the listeners reach
    the composition root, bot/workflow.py."""
    graph = _graph()
    assert not graph["bot.context"] & (USE_CASES | {"bot.workflow"}), graph["bot.context"]
    entry = {"bot.app", "bot.serve", "bot.cli", "bot.workflow"}
    for name, imported in graph.items():
        if name in entry or name.startswith("bot.listeners"):
            continue
        assert "bot.workflow" not in imported, f"{name} imports bot.workflow"
    assert set(graph) >= USE_CASES, "a use-case module this test names is gone"
