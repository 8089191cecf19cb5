"""The project's import graph, read from the source (no module is imported): which modules each
module imports at import time (module level, ``if TYPE_CHECKING`` blocks excluded) and which
ones it imports inside functions. Used by ``tests/test_layering.py``."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("pipeline", "plugins", "flows")
"""The project's top-level packages."""
SLOW_SUBMODULES = ("torch._dynamo",)
"""Parts of a library whose import alone costs seconds (``torch._dynamo``: about 1.3 s on top of
torch): imported by the function that compiles or exports, never at import time."""
THIRD_PARTY_PULLS = {"timm": {"torch", "torchvision"}, "torchvision": {"torch"},
                     "prefect_dask": {"prefect"}, "segmentation_models_pytorch": {"torch"}}
"""Libraries that import another heavy library when imported."""


@dataclass(frozen=True)
class Import:
    """One import statement of ``module`` at ``line``: the modules it names (``from a import b``
    names ``a`` and, when it is a project module, ``a.b``)."""

    module: str
    line: int
    targets: tuple[str, ...]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.cache
def project_files() -> dict[str, Path]:
    """Every project module by dotted name."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))}


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(a.name for a in node.names)
    base = node.module or ""
    if node.level:
        path = project_files()[module]
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    files = project_files()
    return (base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files))


@functools.cache
def imports(module: str) -> tuple[tuple[Import, ...], tuple[Import, ...]]:
    """``(at import time, inside functions)`` of a project module."""
    tree = ast.parse(project_files()[module].read_text())
    top: list[Import] = []
    lazy: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit_one(other, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (lazy if in_function else top).append(Import(module, node.lineno, _targets(module, node)))
        visit(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda)))

    visit(tree, False)
    return tuple(top), tuple(lazy)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def closure(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """What importing ``name`` imports, at import time: ``(project modules, third-party names)``
    (a third-party name is its top-level package, or a ``SLOW_SUBMODULES`` entry)."""
    files = project_files()
    seen: set[str] = set()
    third: set[str] = set()
    stack = [name]
    while stack:
        item = stack.pop()
        if item in seen:
            continue
        seen.add(item)
        if is_project(item):
            stack.extend(p for p in _parents(item) if p in files)
            if item in files:
                stack.extend(t for imp in imports(item)[0] for t in imp.targets)
            continue
        top = item.split(".")[0]
        third |= {top, *THIRD_PARTY_PULLS.get(top, ())}
        third |= {s for s in SLOW_SUBMODULES if item == s or item.startswith(s + ".")}
    return frozenset(s for s in seen if s in files), frozenset(third)


@functools.cache
def default_install() -> frozenset[str]:
    """Distribution names (normalised) that densepipe's default install brings: its
    dependencies and theirs (extras left out)."""
    seen: set[str] = set()
    todo = ["densepipe"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_normalise(re.split(r"[<>=!~;\[ (]", r)[0]) for r in reqs if "extra ==" not in r]
    return frozenset(seen)


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(md.packages_distributions())


def is_optional(name: str) -> bool:
    """A third-party package the default install does not bring (an extra's, or not installed)."""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or is_project(top):
        return False
    dists = {_normalise(d) for d in _distributions().get(top, [])}
    return not (dists & default_install())
