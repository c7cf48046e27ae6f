"""The structure the project keeps: the library never imports the orchestrator, modules do not
import each other in a circle, and no module or function grows past what a reader takes in at once.
(Lint and formatting are `make lint`; these are the rules ruff cannot check.)"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("monolm", "tasks", "flows", "deployments", "infra")
SIZE_CHECKED = ("monolm", "tasks", "flows")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_DUPLICATE_PAIRS = 20  # `duplicates` (the team's tool library) over the whole checkout


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at top level or inside a function: `from a.b import c`
    counts as `a.b.c` when that is a module, else as `a.b`."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = python_files(*LAYERS)
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) - {module_name(p)} for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_imports_no_orchestrator_module():
    graph = import_graph()
    edges = sorted(
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        if src.split(".")[0] == "monolm"
        for dst in dsts
        if dst.split(".")[0] != "monolm"
    )
    assert edges == []


def test_every_library_module_imports_with_prefect_unimportable():
    """A notebook without Prefect can use all of `monolm`: each module imports with `prefect`,
    `flows`, `tasks` and `deployments` made unimportable."""
    modules = [module_name(p) for p in python_files("monolm")]
    probe = f"""
import importlib, importlib.abc, sys
BLOCKED = ("prefect", "prefect_dask", "flows", "tasks", "deployments")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
print("imported", len({modules!r}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"imported {len(modules)}"


def test_no_module_or_function_is_too_long():
    too_long = []
    for path in python_files(*SIZE_CHECKED):
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []


def test_repeated_code_stays_rare():
    """The same logic is written once: `duplicates` (pairs of places sharing six or more lines of
    the same shape) finds at most MAX_DUPLICATE_PAIRS in the checkout. The tool ships with the
    team's development machines, not with the package registries, so CI skips this check."""
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the `duplicates` tool is not installed on this machine")
    out = subprocess.run(
        [tool, "--most", "200", "--seconds", "120"], cwd=REPO, capture_output=True, text=True, timeout=300
    ).stdout
    assert "incomplete:" not in out, out[-2000:]
    first = out.splitlines()[0] if out.strip() else ""
    found = re.match(r"(\d+) pairs? of places", first)
    pairs = int(found.group(1)) if found else 0
    assert first.startswith("no duplicates") or found, first
    assert pairs <= MAX_DUPLICATE_PAIRS, out
