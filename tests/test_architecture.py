"""The house's shape, checked from the source: imports go one way, no module imports itself back, no module grows
past 400 lines.

Imports go producer → fluxfleet (the contract) ← workers: fluxfleet imports neither, nor torch; the producer
never imports workers (it sends tasks by name) nor torch. Every import counts, inside functions too: the
project's lazy imports exist to defer a cost (torch, an optional backend), never to hide a loop, and a loop
closed inside a function still means two modules that each need the other (a step calling back into the step
that called it). Only ``if TYPE_CHECKING:`` blocks are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fluxfleet", "producer", "workers", "benchmarks")
MAX_LINES = 400
FORBIDDEN = {
    "fluxfleet": {"producer", "workers", "torch", "diffusers", "transformers"},
    "producer": {"workers", "torch", "diffusers", "transformers"},
    "workers": {"producer"},
}


def project_files() -> dict[str, Path]:
    """Dotted module name -> file, for the project's packages and the tests' helper modules."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "tests").glob("*.py")):
        if not path.name.startswith("test_"):
            files[f"tests.{path.stem}"] = path
    return files


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement in ``path`` names (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is not a module counts as its package)."""
    files = project_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(path):
            if name in files:
                targets.add(name)
            elif name.rpartition(".")[0] in files and name.rpartition(".")[0] != module.rpartition(".")[0]:
                targets.add(name.rpartition(".")[0])  # `from pkg.mod import name`: the module pkg.mod
        graph[module] = targets - {module}  # `python -m x` re-importing x is no loop
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted({name.split(".")[0] for name in imported_names(path)} & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_loop_through_a_function_level_import() -> None:
    # Given three modules where the last imports the first back inside a function (as metrics once did app),
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # then the loop is found, and a module that only imports into it is not part of it.
    assert cycles(graph) == [["a", "b", "c"]]


def test_modules_stay_small() -> None:
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in project_files().values()}
    assert {path: lines for path, lines in sizes.items() if lines > MAX_LINES} == {}
