"""The layering, read from the source: no import cycle between the core's folders and modules,
and an import inside a function only where one of the tests that pin import costs needs it.

An import stays inside a function (and is then named in one comment of its module, a line
starting ``Imports inside functions``) for one of these reasons, each checked here:

- ``optional``: the library is not in the default install (an extra: ``timm``, ``onnx``...);
- ``light``: the module is imported by a command module that must stay light
  (``tests/test_import_cost.py``: ``densepipe --help`` loads no torch, the stages no MLflow or
  Prefect), and the import would pull in a library that module may not load;
- ``dvc``: a DVC stage imports the module, and the import would add a project module that the
  stage does not list as a dep (``dvc.yaml``'s deps are exactly what each stage imports,
  ``tests/test_dvc.py``): a change to that module would rerun the stage (``prepare`` when the
  trainer changes, ``train`` when the synthetic renderer does);
- ``slow``: a part of a library whose import alone costs seconds (``torch._dynamo``);
- ``cycle``: the imported module imports this one at import time.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import yaml

from tests import import_graph as graph
from tests.conftest import REPO_ROOT
from tests.test_import_cost import LIGHT


@functools.cache
def _stage_deps() -> tuple[frozenset[str], ...]:
    """Per ``dvc.yaml`` stage, the project modules it lists as deps (files, or files in a folder)."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    out = []
    for stage in spec["stages"].values():
        names = set()
        for dep in stage.get("deps", []):
            path = REPO_ROOT / dep
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            names |= {graph._module_name(f) for f in files if f.suffix == ".py"}
        out.append(frozenset(names))
    return tuple(out)


@functools.cache
def _forbidden() -> dict[str, frozenset[str]]:
    """Project module -> the libraries it may not import at import time (``LIGHT``)."""
    out: dict[str, set[str]] = defaultdict(set)
    for entry, heavy in LIGHT.items():
        for module in graph.closure(entry)[0]:
            out[module] |= set(heavy)
    return {k: frozenset(v) for k, v in out.items()}


def reasons(imp: graph.Import) -> list[str]:
    """Why ``imp`` (an import inside a function) may not move to module level; empty: it may."""
    why = []
    if any(not graph.is_project(t) and graph.is_optional(t) for t in imp.targets):
        why.append("optional")
    pulled_third: set[str] = set()
    pulled_project: set[str] = set()
    for target in imp.targets:
        project, third = graph.closure(target)
        pulled_third |= third
        pulled_project |= project
    heavy = pulled_third & _forbidden().get(imp.module, frozenset())
    if heavy:
        why.append(f"light ({', '.join(sorted(heavy))})")
    for deps in _stage_deps():
        extra = pulled_project - deps if imp.module in deps else set()
        if extra:
            why.append(f"dvc ({', '.join(sorted(extra)[:3])})")
            break
    if pulled_third & set(graph.SLOW_SUBMODULES):
        why.append("slow")
    if imp.module in pulled_project:
        why.append("cycle")
    return why


def _node(module: str) -> str:
    """Layering unit: a sub-package of ``pipeline`` (``pipeline.data``), a module directly in
    ``pipeline``, a plugin package, ``flows``."""
    parts = module.split(".")
    if parts[0] == "pipeline":
        if len(parts) > 1 and (REPO_ROOT / "pipeline" / parts[1]).is_dir():
            return ".".join(parts[:2])
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if parts[0] == "plugins" else parts[0]


def test_no_import_cycle_between_folders_and_core_modules() -> None:
    """Every import counts (inside functions too, not ``TYPE_CHECKING`` ones): the graph of
    layering units has no cycle."""
    files = graph.project_files()
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for module in files:
        top, lazy = graph.imports(module)
        for imp in (*top, *lazy):
            for target in imp.targets:
                if target in files and _node(target) != _node(module):
                    edges[_node(module)].add(_node(target))
                    where.setdefault((_node(module), _node(target)), f"{module}:{imp.line}")
    cycles = _cycles(edges)
    assert not cycles, "; ".join(
        " -> ".join(c) + " (" + ", ".join(where[(a, b)] for a, b in zip(c, c[1:] + c[:1], strict=True)
                                          if (a, b) in where) + ")" for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_inside_a_function_is_needed() -> None:
    unneeded = [f"{graph.project_files()[imp.module].relative_to(REPO_ROOT)}:{imp.line} "
                f"{', '.join(imp.targets)}"
                for module in graph.project_files() for imp in graph.imports(module)[1]
                if not reasons(imp)]
    assert not unneeded, ("imports inside functions that no import-cost test needs: move them "
                          "to module level:\n" + "\n".join(unneeded))


def test_modules_with_imports_inside_functions_say_why() -> None:
    silent = [module for module, path in graph.project_files().items()
              if graph.imports(module)[1] and "Imports inside functions" not in path.read_text()]
    assert not silent, f"name the reason in one comment starting 'Imports inside functions': {silent}"
