"""The code version of a stage: a digest of every `monolm` module its entry imports (the import
closure inside the project) and of the package data those modules read.

Why not a hand-kept list of modules: lists go stale. A stage whose list missed a dependency (stage
0 and the architecture catalogue, the attacks and the constraint's parametrization) kept a cached
result valid after the code that computed it had changed. The closure is read from the source
(`ast`), without importing anything, so it also covers imports inside functions, and it is
conservative: a module imported anywhere in a file counts, even on a branch a stage never takes.

Package data: a string literal in a module that names a file or folder beside it (for example
`"catalogue.yaml"`) is data the module reads, and its bytes enter the digest. The presets are the
exception: they are configuration, and a stage's config subset (its other cache-key part) already
says whether a preset change reaches the stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_ROOT.name


def module_path(module: str, root: Path | None = None) -> Path | None:
    """The source file of a project module (`monolm.x.y`) under `root` (the package folder), or
    None when it is not one."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = (root or PACKAGE_ROOT).joinpath(*module.split(".")[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imported(tree: ast.AST, root: Path) -> set[str]:
    """Every project module a file imports, with the packages that importing it executes."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if module_path(prefix, root) is not None:
                modules.add(prefix)
    return modules


def _data_files(path: Path, tree: ast.AST, root: Path) -> set[Path]:
    """Files beside a module that a string literal in it names (a folder: every file under it)."""
    files: set[Path] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        name = node.value
        if not name or "\n" in name or len(name) > 100 or name.endswith(".py") or name.startswith("."):
            continue
        candidate = path.parent / name
        try:
            if candidate == root / "config" / "presets" or candidate.name == "__pycache__":
                continue
            if candidate.is_file():
                files.add(candidate)
            elif candidate.is_dir() and candidate.parent == path.parent:
                files.update(p for p in candidate.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        except (OSError, ValueError):
            continue
    return files


def import_closure(*entries: str) -> tuple[Path, ...]:
    """The source files of `entries` (dotted project modules) and of every project module they
    import, transitively, plus the package data those modules read; sorted."""
    return _closure(PACKAGE_ROOT, entries)


@functools.cache
def _closure(root: Path, entries: tuple[str, ...]) -> tuple[Path, ...]:
    seen: set[str] = set()
    todo = list(entries)
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_path(module, root) or (_outside_entry(module) if module in entries else None)
        if path is None:
            raise ValueError(f"code digest: {module!r} is not a module of {PACKAGE}")
        tree = ast.parse(path.read_bytes(), filename=str(path))
        files.add(path)
        files.update(_data_files(path, tree, root))
        parent = module.rpartition(".")[0] if path.is_relative_to(root) else ""
        todo.extend(m for m in (_imported(tree, root) | ({parent} if parent else set())) if m not in seen)
    return tuple(sorted(files))


def _outside_entry(module: str) -> Path | None:
    """The source file of an entry module outside the package (an attack registered by a plugin or
    a test, `registry.register_attack`): its own file counts, and the project modules it imports."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else None


def code_digest(*entries: str) -> str:
    """sha256 (16 hex digits) over the import closure of `entries` (see `import_closure`)."""
    h = hashlib.sha256()
    for path in import_closure(*entries):
        h.update(str(path.relative_to(PACKAGE_ROOT) if path.is_relative_to(PACKAGE_ROOT) else path.name).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
