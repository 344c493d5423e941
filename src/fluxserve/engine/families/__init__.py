"""Model families: one module each, behind the contract in :mod:`fluxserve.engine.families.base`.

``FAMILIES`` is the registry of families; the model registry (:mod:`fluxserve.engine.registry`) is built
from the ``models`` each family declares. Adding a family is one module plus one line here (see
``docs/families.md``). Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

from fluxserve.engine.families.base import (
    DenoiseArgs,
    Family,
    FamilyDefaults,
    ModelSpec,
    Optimizations,
    Preset,
    PromptEmbedding,
    to_uint8,
)
from fluxserve.engine.families.flux import FluxFamily
from fluxserve.engine.families.flux2 import Flux2DevFamily
from fluxserve.engine.families.generic import GenericFamily
from fluxserve.engine.families.klein import KleinFamily
from fluxserve.engine.families.kontext import KontextFamily
from fluxserve.engine.families.qwen_edit import QwenImageEditFamily
from fluxserve.engine.families.qwen_image import QwenImageFamily
from fluxserve.engine.families.zimage import ZImageFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (
    FluxFamily(),
    QwenImageFamily(),
    KleinFamily(),
    ZImageFamily(),
    Flux2DevFamily(),
    KontextFamily(),
    QwenImageEditFamily(),
    GenericFamily(),
)}
"""Every family by name. ``generic`` serves pipelines no other family claims."""

ADAPTERS = FAMILIES
"""The name the engine's first versions used for :data:`FAMILIES` (kept for callers and tests)."""
FamilyAdapter = Family


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_class(class_name: str) -> str:
    """The family whose text-to-image pipeline class is ``class_name`` (``generic`` if none)."""
    for family in FAMILIES.values():
        if family.name != "generic" and family.pipeline_classes.get("generate") == class_name:
            return family.name
    return "generic"


__all__ = [
    "ADAPTERS", "FAMILIES", "DenoiseArgs", "Family", "FamilyAdapter", "FamilyDefaults", "ModelSpec",
    "Optimizations", "Preset", "PromptEmbedding", "family_of_class", "get_family", "to_uint8",
]
