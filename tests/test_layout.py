"""The package's layering: lower layers never import upward.

The loss library (``beseg.losses``) is a leaf: a user can take it into any training loop without
beseg's engine, reports or CLI. The check reads the import statements of the source, so it also
catches imports inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import beseg

PACKAGE = Path(beseg.__file__).parent


def _beseg_imports(path: Path, package: Path | None = None, names: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every ``beseg...`` import in a source file, relative imports resolved.

    Args:
        path: the source file.
        package: the ``beseg`` folder it belongs to (default the installed package).
        names: name what ``from X import name`` takes as ``X.name`` (it may be a submodule), not ``X``.
    """
    package = PACKAGE if package is None else package
    tree = ast.parse(path.read_text(), filename=str(path))
    base_parts = ("beseg", *path.relative_to(package).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = ".".join([*base_parts[: len(base_parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names] if names else [(node.lineno, module)]
    return [(line, m) for line, m in found if m == "beseg" or m.startswith("beseg.")]


def _violations(package: str, allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for line, module in _beseg_imports(path):
            if not any(module == a or module.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return bad


def test_the_loss_library_imports_nothing_of_beseg_but_itself_and_its_errors():
    assert _violations("losses", ("beseg.losses", "beseg.errors")) == []


def test_the_layout_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The check must be able to fail: a module importing the engine is reported with its line.
    fake = tmp_path / "beseg"
    (fake / "losses").mkdir(parents=True)
    (fake / "losses" / "bad.py").write_text("import torch\n\ndef f():\n    from beseg.engine.trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _violations("losses", ("beseg.losses", "beseg.errors")) == ["beseg/losses/bad.py:4 imports beseg.engine.trainer"]


@pytest.mark.parametrize("package,allowed", [
    ("data", ("beseg.data", "beseg.errors", "beseg.fileio", "beseg.protocols")),
    # the report reads results (through the results folder's layout, and the primary comparison plan.json
    # declares) and renders: no training, no orchestration (plans, launchers), no CLI
    ("report", ("beseg.report", "beseg.errors", "beseg.fileio", "beseg.protocols", "beseg.data", "beseg.losses",
                "beseg.metrics", "beseg.score", "beseg.experiment.layout", "beseg.experiment.primary")),
])
def test_lower_layers_do_not_import_upward(package, allowed):
    assert _violations(package, allowed) == []


@pytest.mark.parametrize("package", ["losses", "data", "engine", "experiment", "report", "bench", "nnunet"])
def test_no_library_package_imports_the_cli(package):
    assert [v for v in _violations(package, ("beseg.",)) if ("beseg.cli" in v or "beseg.commands" in v)] == []


def _module_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of beseg it imports}`` from the import statements of every source file (inside
    functions and under ``TYPE_CHECKING`` too); a package is its ``__init__``."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:  # the module a dotted name lives in (beseg.data.Case -> beseg.data)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in _beseg_imports(path, package, names=True):
            target = owner(imported)
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_beseg_has_no_cycle():
    graph = _module_graph(PACKAGE)
    assert len(graph) > 50 and graph["beseg.engine.losses"] >= {"beseg.engine.config"}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    fake = tmp_path / "beseg"
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "config.py").write_text("def f():\n    from beseg.engine.losses import LOSSES\n")
    (fake / "engine" / "losses.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from beseg.engine.config import LossConfig\n")
    (fake / "engine" / "other.py").write_text("from beseg.engine import config\n")
    assert _cycles(_module_graph(fake)) == [["beseg.engine.config", "beseg.engine.losses"]]
