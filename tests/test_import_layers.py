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
    package = module.rsplit(".", 1)[0]
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
