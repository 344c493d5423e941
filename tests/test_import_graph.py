"""The import graph of ``src/``, read statically with the stdlib ``ast``: no circle, and each layer imports only
what lies below it.

What counts as an import (decided here, for every rule below):

* every ``import`` / ``from … import`` statement of a module, wherever it stands: at module level, inside a
  function (a deferred import), or under ``if TYPE_CHECKING:``. Deferring an import hides a circle from the
  interpreter's import order but keeps the two modules depending on each other, and a type-only import still
  couples them; so the graph has no circle even counting those;
* ``from package import name`` is an import of ``package.name`` when that is a module of ``src/``, else of
  ``package``; importing a submodule is not counted as importing its parent packages;
* a module named by a string and imported with ``importlib`` is no edge: that is how a family descriptor names
  its runner (``FamilyDescriptor.runner``), so that the model layer never depends on the engine.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS: dict[str, tuple[str, ...]] = {
    # a layer: the packages and modules it must not import
    "fluxserve.engine": ("fluxserve.api", "fluxserve.runtime", "fluxserve.catalog", "fluxserve.distributed",
                         "fluxserve.server", "fluxserve.cli"),
    "fluxserve.models": ("fluxserve.engine", "fluxserve.api", "fluxserve.scheduler", "fluxserve.runtime",
                         "fluxserve.catalog", "fluxserve.distributed", "fluxserve.storage",
                         "fluxserve.observability", "fluxserve.server", "fluxserve.cli"),
    "fluxserve.scheduler": ("fluxserve.engine", "fluxserve.api", "fluxserve.runtime", "fluxserve.catalog",
                            "fluxserve.distributed", "fluxserve.server", "fluxserve.cli"),
    "fluxserve.api": ("fluxserve.engine", "fluxserve.distributed", "fluxserve.server", "fluxserve.cli"),
}
"""The engine runs pipelines and knows nothing of HTTP, the runtime that composes it, the catalogs or Ray; the
model layer is what everyone reads and depends on nothing above it; the scheduler drives engines through
protocols; the HTTP layer reaches the engine only through the runtime's protocols."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    known = modules()
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:  # relative: from the module's package upwards
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        yield candidate if candidate in known else base


def _owner(name: str) -> str | None:
    """The module of ``src/`` that ``name`` (a module or something in it) belongs to."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """Module → the modules of ``src/`` it imports (every import statement, see the module docstring)."""
    graph: dict[str, frozenset[str]] = {}
    for module, path in modules().items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(module, path, node):
                    owner = _owner(target)
                    if owner is not None and owner != module:
                        found.add(owner)
        graph[module] = frozenset(found)
    return graph


def circles(graph: Mapping[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
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
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    """The reading itself: known edges of each kind are there (module level, deferred, type-only)."""
    graph = import_graph()
    assert "fluxserve.models.registry" in graph["fluxserve.loras"]  # module level
    assert "fluxserve.runtime" in graph["fluxserve.api.app"]  # deferred and under TYPE_CHECKING
    assert "fluxserve.loras" in graph["fluxserve.models.handle"]  # under TYPE_CHECKING only
    assert "fluxserve.engine.families.flux" not in graph["fluxserve.models.families.flux"]  # named by string


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_no_import_circle_in_src() -> None:
    assert circles(import_graph()) == []


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_nothing_above_it(layer: str) -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items() if _within(module, layer)
                   for target in targets if any(_within(target, above) for above in LAYERS[layer]))
    assert wrong == []
