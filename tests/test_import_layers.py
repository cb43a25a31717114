"""The runtime uses the OpenAI batch format as an adapter; nothing imports back along the old cycle.

Every import counts, including those inside functions (a lazy import is still a dependency):
``results`` knows no format, ``openai_batch`` neither the runtime nor the actors, and the driver
neither the runtime (its types live in ``runspec``) nor the format (it gets an ``OutputFormat``).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hybrid_ray"

FORBIDDEN = {
    "hybrid_ray.results": ("hybrid_ray.openai_batch", "hybrid_ray.runtime", "hybrid_ray.runspec",
                           "hybrid_ray.actors"),
    "hybrid_ray.openai_batch": ("hybrid_ray.runtime", "hybrid_ray.runspec", "hybrid_ray.actors"),
    "hybrid_ray.runspec": ("hybrid_ray.runtime", "hybrid_ray.openai_batch", "hybrid_ray.actors"),
    "hybrid_ray.actors.driver": ("hybrid_ray.runtime", "hybrid_ray.openai_batch"),
}


def imports(module: str) -> set[str]:
    """Absolute names of every module ``module`` imports, anywhere in its source."""
    path = PKG.joinpath(*module.split(".")[1:]).with_suffix(".py")
    return _imports_of(path, module.rsplit(".", 1)[0])


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_no_import_back_along_the_cycle(module):
    importlib.import_module(module)                        # it imports on its own
    found = imports(module)
    bad = sorted(n for n in found for f in FORBIDDEN[module] if n == f or n.startswith(f + "."))
    assert not bad, f"{module} imports {bad}"


def test_the_runtime_uses_the_adapter():
    assert "hybrid_ray.openai_batch" in imports("hybrid_ray.runtime")
    assert "hybrid_ray.actors.driver" in imports("hybrid_ray.runtime")
    assert "hybrid_ray.runspec" in imports("hybrid_ray.actors.driver")


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules importing it runs: what it names anywhere
    in its source (lazy imports included) and, as Python runs a package's ``__init__`` before any
    of its submodules, the packages above each of those and above itself."""
    names = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def executed(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & names.keys()

    graph = {}
    for mod, path in names.items():
        is_pkg = path.name == "__init__.py"
        deps = set().union(*(executed(n) for n in _imports_of(path, mod if is_pkg else mod.rsplit(".", 1)[0])),
                           executed(mod))
        deps.discard(mod)
        graph[mod] = deps
    return graph


def _imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of every module the file at ``path`` (in ``package``) imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)    # `from . import openai_batch`
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_circle_anywhere():
    """No two modules of hybrid_ray import each other, directly or round a circle, lazily or not
    (issue 26: config, planner/ and policies/ once formed one circle of 19 modules)."""
    graph = _module_graph()
    assert len(graph) > 60 and "hybrid_ray.planning" in graph["hybrid_ray.cli"]
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_scheduling_layers():
    """planner/ and policies/ know neither the scheduler composition nor the planning above them;
    config reads the knob table without importing the policies."""
    graph = _module_graph()
    for mod, deps in graph.items():
        if mod.startswith(("hybrid_ray.planner", "hybrid_ray.policies")):
            assert not deps & {"hybrid_ray.schedulers", "hybrid_ray.planning", "hybrid_ray.simulator"}, mod
    assert not any(d.startswith("hybrid_ray.policies") for d in graph["hybrid_ray.config"])
    assert "hybrid_ray.planning" not in graph["hybrid_ray.schedulers"]
