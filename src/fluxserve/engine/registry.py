"""The model registry: built-in keys, their family defaults and presets, and how a name resolves.

A name is a registry key (``schnell``, ``dev``, ``qwen``, ``tiny-flux``, ``tiny-qwen``), a hub repo id
(``owner/name``) or a local diffusers directory. Families (``flux``, ``qwen``) carry the parameter
adapter; the pipeline class itself always comes from the model's ``model_index.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Family = Literal["flux", "qwen", "generic"]

_PIPELINE_FAMILIES: dict[str, Family] = {
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class UnknownModelError(LookupError):
    """The name is neither a registry key, a local diffusers directory nor an allowed repo id."""


class ModelNotAllowedError(UnknownModelError):
    """The model exists but requests may not name it here (FLUX_MODELS): the HTTP layer answers 403."""


@dataclass(frozen=True)
class Preset:
    """A named size/steps combination offered to clients (the web page's preset buttons)."""

    width: int
    height: int
    steps: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything fluxserve knows about a model before loading it."""

    key: str
    """Registry key, or the repo id / path itself for models outside the registry."""
    source: str
    """Hub repo id or local directory passed to ``from_pretrained``."""
    family: Family
    description: str = ""
    tiny: Literal["flux", "qwen"] | None = None
    """Set for the tiny offline models: built on first use into the cache directory."""
    steps: int = 28
    guidance: float = 3.5
    """Default guidance (FLUX: ``guidance_scale``; Qwen: ``true_cfg_scale``)."""
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    width: int = 1024
    height: int = 1024
    size_multiple: int = 16
    negative_prompt: str | None = None
    """Default negative prompt (Qwen-Image needs one, even " ", to enable CFG)."""
    gated: bool = False
    alpha: bool = False
    """Can produce transparent images (``background: "transparent"``); no family here can yet."""
    presets: dict[str, Preset] = field(default_factory=dict)

    @property
    def quality_steps(self) -> dict[str, int]:
        """OpenAI's ``quality`` mapped to step counts from the presets."""
        return {q: self.presets[q].steps for q in ("low", "medium", "high") if q in self.presets}

    def with_family(self, family: Family) -> ModelSpec:
        return replace(self, family=family)


BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="schnell", source="black-forest-labs/FLUX.1-schnell", family="flux",
            description="FLUX.1 [schnell]: 4-step distilled, Apache-2.0",
            steps=4, guidance=0.0, max_sequence_length=256, max_sequence_length_limit=256,
            width=512, height=512,
            presets={"low": Preset(512, 512, 2), "medium": Preset(768, 768, 4), "high": Preset(1024, 1024, 4),
                     "wide": Preset(1024, 576, 4)},
        ),
        ModelSpec(
            key="dev", source="black-forest-labs/FLUX.1-dev", family="flux", gated=True,
            description="FLUX.1 [dev]: guidance-distilled, non-commercial licence, gated (needs HF_TOKEN)",
            steps=28, guidance=3.5, max_sequence_length=512, width=1024, height=1024,
            presets={"low": Preset(768, 768, 24), "medium": Preset(1024, 1024, 28),
                     "high": Preset(1344, 1344, 40), "wide": Preset(1344, 768, 28)},
        ),
        ModelSpec(
            key="qwen", source="Qwen/Qwen-Image", family="qwen",
            description="Qwen-Image: strong text rendering; true CFG with a negative prompt",
            steps=30, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024,
            width=1024, height=1024, negative_prompt=" ",
            presets={"low": Preset(768, 768, 20), "medium": Preset(1024, 1024, 30),
                     "high": Preset(1328, 1328, 50), "wide": Preset(1664, 928, 30)},
        ),
        ModelSpec(
            key="tiny-flux", source="tiny-flux", family="flux", tiny="flux",
            description="Tiny random-weight FLUX pipeline built offline (demo and tests; images are noise)",
            steps=4, guidance=0.0, max_sequence_length=256, max_sequence_length_limit=512,
            width=128, height=128,
            presets={"low": Preset(64, 64, 2), "medium": Preset(128, 128, 4), "high": Preset(256, 256, 8),
                     "wide": Preset(256, 144, 4)},
        ),
        ModelSpec(
            key="tiny-qwen", source="tiny-qwen", family="qwen", tiny="qwen",
            description="Tiny random-weight Qwen-Image pipeline built offline (demo and tests)",
            steps=4, guidance=4.0, max_sequence_length=128, max_sequence_length_limit=1024,
            width=128, height=128, negative_prompt=" ",
            presets={"low": Preset(64, 64, 2), "medium": Preset(128, 128, 4), "high": Preset(256, 256, 8),
                     "wide": Preset(256, 144, 4)},
        ),
    )
}


def family_of_directory(path: Path) -> Family:
    """Read the pipeline class from ``model_index.json`` and map it to a family."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    return _PIPELINE_FAMILIES.get(str(index.get("_class_name", "")), "generic")


def family_of_class(class_name: str) -> Family:
    return _PIPELINE_FAMILIES.get(class_name, "generic")


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
        defaults = BUILTIN_MODELS["dev" if family == "flux" else "qwen" if family == "qwen" else "dev"]
        return replace(defaults, key=name, source=str(path.resolve()), family=family, tiny=None, gated=False,
                       description=f"local pipeline at {path}")
    if _REPO_ID.match(name):
        # Family is read from model_index.json once downloaded; FLUX defaults until then.
        return replace(BUILTIN_MODELS["dev"], key=name, source=name, family="generic", gated=False,
                       description=f"hub repo {name}")
    raise UnknownModelError(
        f"model {name!r} is not a registry key ({', '.join(BUILTIN_MODELS)}), a local diffusers directory "
        "or a hub repo id (owner/name)"
    )
