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


# ----------------------------------------------------------------------------------------------
# the dataset is loaded at the entry points only

#: The functions that read a task folder's dataset.json (beseg.data.msd, beseg.data.check).
LOADERS = frozenset({"load_task", "parse_task", "reload_task", "as_task", "check_task"})
#: Who may call them: the loaders themselves, every CLI command, and the library's documented entry points, which
#: take a folder or the task and hand the task down (everything they call takes the MSDTask).
LOADING_ALLOWED = {
    "beseg/data/msd.py": {"load_task", "reload_task"},
    "beseg/data/check.py": {"check_task", "as_task"},
    "beseg/engine/trainer.py": {"Trainer.__init__"},
    "beseg/engine/evaluate.py": {"evaluate"},
    "beseg/experiment/compare.py": {"run_compare"},
    # the dataset of a plan, loaded again by a worker process or by `beseg train --plan` under srun, checked
    "beseg/experiment/plan.py": {"planned_task"},
    # the benchmark's own phantom, made and loaded there
    "beseg/bench/data.py": {"run_data_benchmark"},
}


def _loader_calls(package: Path) -> list[str]:
    """``path:line function calls loader`` for every call of a loader outside :data:`LOADING_ALLOWED`."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if rel.startswith("beseg/commands/"):
            continue  # the CLI: each command loads its data once and hands it on
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
            for child in ast.iter_child_nodes(node):
                inner = scope + (child.name,) if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef)) else scope
                if isinstance(child, ast.Call):
                    func = child.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) \
                        else None
                    where = ".".join(scope) or "<module>"
                    if name in LOADERS and where not in LOADING_ALLOWED.get(rel, ()):
                        found.append(f"{rel}:{child.lineno} {where} calls {name}")
                visit(child, inner)

        visit(tree, ())
    return found


def test_only_the_entry_points_load_the_dataset():
    assert _loader_calls(PACKAGE) == []


def test_the_loading_check_sees_a_planted_load(tmp_path):
    fake = tmp_path / "beseg"
    for folder in ("report", "engine", "commands"):
        (fake / folder).mkdir(parents=True)
    (fake / "report" / "figures.py").write_text(
        "from beseg.data import load_task\n\ndef overlay(folder):\n    return load_task(folder).training\n")
    (fake / "engine" / "trainer.py").write_text(
        "import beseg.data.check as check\n\nclass Trainer:\n    def __init__(self, data):\n"
        "        self.task = check.as_task(data)\n\n    def setup_data(self):\n"
        "        self.task = check.as_task(self.task.root)\n")
    (fake / "commands" / "train.py").write_text("from beseg.data import load_task\n\ndef run(args):\n"
                                                "    return load_task(args.data)\n")
    assert _loader_calls(fake) == ["beseg/engine/trainer.py:8 Trainer.setup_data calls as_task",
                                   "beseg/report/figures.py:4 overlay calls load_task"]
