"""The model registry: built-in keys, their defaults and presets, and how a name resolves.

A name is a registry key (``schnell``, ``dev``, ``qwen``, ``klein``, ``tiny-flux``, ...), a hub repo id
(``owner/name``) or a local diffusers directory. The built-in keys are the ``models`` the families in
:mod:`fluxserve.engine.families` declare; the pipeline class itself always comes from the model's
``model_index.json``. Torch-free: the HTTP layer reads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from fluxserve.engine.families import FAMILIES, family_of_class
from fluxserve.engine.families.base import ModelSpec, Preset

__all__ = ["BUILTIN_MODELS", "ModelSpec", "Preset", "UnknownModelError", "family_of_class",
           "family_of_directory", "resolve_model"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


UNKNOWN_LICENCE = "unknown: see the model card"
"""The licence shown for models outside the registry (fluxserve cannot know it)."""


class UnknownModelError(LookupError):
    """The name is neither a registry key, a local diffusers directory nor an allowed repo id."""


def _builtin_models() -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for family in FAMILIES.values():
        for spec in family.models:
            if spec.key in models:
                raise ValueError(f"registry key {spec.key!r} is declared twice ({models[spec.key].family}, "
                                 f"{family.name})")
            if spec.family != family.name:
                raise ValueError(f"{family.name} declares {spec.key!r} with family {spec.family!r}")
            models[spec.key] = spec
    # Real checkpoints first, then the tiny offline ones (the order /v1/models and the web picker show).
    return {key: models[key] for key in sorted(models, key=lambda k: models[k].tiny is not None)}


BUILTIN_MODELS: dict[str, ModelSpec] = _builtin_models()


def family_of_directory(path: Path) -> str:
    """Read the pipeline class from ``model_index.json`` and map it to a family."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    return family_of_class(str(index.get("_class_name", "")))


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
        # Family is read from model_index.json once downloaded; FLUX defaults until then.
        return replace(BUILTIN_MODELS["dev"], key=name, source=name, family="generic", gated=False,
                       licence=UNKNOWN_LICENCE, commercial_use=True, description=f"hub repo {name}")
    raise UnknownModelError(
        f"model {name!r} is not a registry key ({', '.join(BUILTIN_MODELS)}), a local diffusers directory "
        "or a hub repo id (owner/name)"
    )
