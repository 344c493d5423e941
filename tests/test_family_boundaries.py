"""Family knowledge stays in the families, and the routes read loaded models through their typed handle.

Read statically with ``ast``: outside a family's descriptor (``fluxserve/models/families/``) and runner
(``fluxserve/engine/families/``) no code compares with, or passes, a family's name as a string; and the HTTP layer
never asks a model object what it has (``hasattr``): it reads ``ModelHandle``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fluxserve.models.registry import FAMILIES

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "fluxserve"
FAMILY_MODULES = ("models/families/", "engine/families/")


def _trees(under: str = "") -> dict[str, ast.AST]:
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
            for path in sorted((PACKAGE / under).rglob("*.py"))}


def test_no_code_outside_a_family_names_one() -> None:
    named = [f"{module}:{node.lineno} {node.value!r}" for module, tree in _trees().items()
             if not module.startswith(FAMILY_MODULES) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAMILIES]
    assert named == []


def test_the_reading_finds_family_names_where_they_are() -> None:
    named = {node.value for module, tree in _trees().items() if module.startswith(FAMILY_MODULES)
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in FAMILIES}
    assert named == set(FAMILIES)  # every family names itself in its descriptor


def test_the_http_layer_does_not_duck_type_models() -> None:
    calls = [f"{module}:{node.lineno}" for module, tree in _trees("api").items() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"]
    assert calls == []
