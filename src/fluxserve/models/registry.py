"""The families and the model registry: built-in keys, their defaults and presets, and how a name resolves.

A name is a registry key (``schnell``, ``dev``, ``qwen``, ``klein``, ``tiny-flux``, ...), a hub repo id
(``owner/name``) or a local diffusers directory. The built-in keys are the ``models`` the registered family
descriptors declare; the pipeline class itself always comes from the model's ``model_index.json``.

Adding a family is one descriptor module (:mod:`fluxserve.models.families`), one runner module
(``fluxserve.engine.families``) and one line in :data:`BUILTIN_FAMILIES` below (``docs/families.md``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.families.flux import FLUX
from fluxserve.models.families.flux2 import FLUX2_DEV
from fluxserve.models.families.generic import GENERIC
from fluxserve.models.families.klein import KLEIN
from fluxserve.models.families.kontext import KONTEXT
from fluxserve.models.families.qwen_edit import QWEN_IMAGE_EDIT
from fluxserve.models.families.qwen_image import QWEN_IMAGE
from fluxserve.models.families.zimage import ZIMAGE
from fluxserve.models.spec import ModelSpec

BUILTIN_FAMILIES: tuple[FamilyDescriptor, ...] = (
    FLUX,
    QWEN_IMAGE,
    KLEIN,
    ZIMAGE,
    FLUX2_DEV,
    KONTEXT,
    QWEN_IMAGE_EDIT,
    GENERIC,
)
"""The families this server knows, in the order the LoRA library tries their key signatures."""

UNKNOWN_LICENCE = "unknown: see the model card"
"""The licence shown for models outside the registry (fluxserve cannot know it)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

FAMILIES: dict[str, FamilyDescriptor] = {}
"""Every registered family by name (filled by :func:`register_family`)."""
BUILTIN_MODELS: dict[str, ModelSpec] = {}
"""Every registry key: real checkpoints first, then the tiny offline ones (the order /v1/models shows)."""


class UnknownModelError(LookupError):
    """The name is neither a registry key, a local diffusers directory nor an allowed repo id."""


class ModelNotAllowedError(UnknownModelError):
    """The model exists but requests may not name it here (FLUX_MODELS): the HTTP layer answers 403."""


class UnknownFamilyError(ValueError):
    """No family of that name is registered."""


def register_family(descriptor: FamilyDescriptor) -> None:
    """Add a family and its registry keys. Raises ValueError for a name or key that is taken, a model that names
    another family, or a second family that serves any pipeline."""
    if descriptor.name in FAMILIES:
        raise ValueError(f"family {descriptor.name!r} is registered twice")
    if "generate" not in descriptor.pipeline_classes:
        raise ValueError(f"family {descriptor.name!r} declares no 'generate' pipeline class")
    if descriptor.serves_any_pipeline and any(f.serves_any_pipeline for f in FAMILIES.values()):
        raise ValueError(f"family {descriptor.name!r}: only one family may serve any pipeline")
    for spec in descriptor.models:
        if spec.key in BUILTIN_MODELS:
            raise ValueError(f"registry key {spec.key!r} is declared twice ({BUILTIN_MODELS[spec.key].family}, "
                             f"{descriptor.name})")
        if spec.family != descriptor.name:
            raise ValueError(f"{descriptor.name} declares {spec.key!r} with family {spec.family!r}")
    FAMILIES[descriptor.name] = descriptor
    _rebuild_models()


def unregister_family(name: str) -> None:
    """Remove a family and its keys (tests that register one of their own)."""
    FAMILIES.pop(name, None)
    _rebuild_models()


@contextmanager
def registered(descriptor: FamilyDescriptor) -> Iterator[FamilyDescriptor]:
    """The family registered for the duration of the block."""
    register_family(descriptor)
    try:
        yield descriptor
    finally:
        unregister_family(descriptor.name)


def _rebuild_models() -> None:
    """Refill :data:`BUILTIN_MODELS` in place (modules hold a reference to it): real checkpoints first."""
    models = [spec for family in FAMILIES.values() for spec in family.models]
    BUILTIN_MODELS.clear()
    BUILTIN_MODELS.update((spec.key, spec) for spec in sorted(models, key=lambda spec: spec.tiny is not None))


for _family in BUILTIN_FAMILIES:
    register_family(_family)


# --- families ---------------------------------------------------------------------------------------------
def family_descriptor(name: str) -> FamilyDescriptor:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def fallback_family() -> FamilyDescriptor:
    """The family serving pipelines no other family claims."""
    return next(family for family in FAMILIES.values() if family.serves_any_pipeline)


def family_of_class(class_name: str, preferred: str | None = None) -> str:
    """The family whose pipeline ``class_name`` is: ``preferred`` if it claims it (two families may share a
    pipeline class), else the first that does, else the fallback family."""
    if preferred is not None and preferred in FAMILIES and FAMILIES[preferred].claims(class_name):
        return preferred
    for family in FAMILIES.values():
        if family.pipeline_classes.get("generate") == class_name and family.claims(class_name):
            return family.name
    return fallback_family().name


def family_of_directory(path: Path) -> str:
    """Read the pipeline class from ``model_index.json`` and map it to a family."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    return family_of_class(str(index.get("_class_name", "")))


def family_of_lora_keys(keys: Iterable[str]) -> str | None:
    """The family whose LoRA key signatures the tensor names carry (the first in registry order), or None."""
    text = " ".join(keys)
    for family in FAMILIES.values():
        if any(signature in text for signature in family.lora_signatures):
            return family.name
    return None


def tiny_families() -> list[str]:
    """Families that build tiny offline models (some registry key is their ``tiny-<key>``)."""
    return sorted({spec.tiny for spec in BUILTIN_MODELS.values() if spec.tiny is not None})


# --- names ------------------------------------------------------------------------------------------------
def resolve_model(name: str, *, allow_unregistered: bool = True) -> ModelSpec:
    """Turn a model name into a spec.

    ``allow_unregistered`` is False for names that come from requests while ``FLUX_ALLOW_ANY_MODEL``
    is off: then only registry keys resolve.
    """
    name = name.strip()
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    for spec in BUILTIN_MODELS.values():  # the hub id of a built-in model means that model
        if name == spec.source and spec.tiny is None:
            return spec
    if not allow_unregistered:
        raise UnknownModelError(
            f"model {name!r} is not served here; available: {', '.join(BUILTIN_MODELS)} "
            "(set FLUX_ALLOW_ANY_MODEL=1 to allow any hub repo or local directory)"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UnknownModelError(f"{name!r} is a directory but not a diffusers pipeline (no model_index.json)")
        family = family_of_directory(path)
        return FAMILIES[family].defaults.spec(name, str(path.resolve()), family, licence=UNKNOWN_LICENCE,
                                              description=f"local pipeline at {path}")
    if _REPO_ID.match(name):
        # The family is read from model_index.json once downloaded; the fallback family's defaults until then.
        fallback = fallback_family()
        return fallback.defaults.spec(name, name, fallback.name, licence=UNKNOWN_LICENCE,
                                      description=f"hub repo {name}")
    raise UnknownModelError(
        f"model {name!r} is not a registry key ({', '.join(BUILTIN_MODELS)}), a local diffusers directory "
        "or a hub repo id (owner/name)"
    )
