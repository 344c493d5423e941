"""Registry entries: a model's source, licence, defaults and presets, known before it is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


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
    family: str
    """Name of the family (:class:`~fluxserve.models.descriptor.FamilyDescriptor`) that serves it."""
    description: str = ""
    tiny: str | None = None
    """Set for the tiny offline models: the family whose runner builds it on first use into the cache
    directory."""
    steps: int = 28
    guidance: float = 3.5
    """Default guidance (the family's ``guidance_parameter``: ``guidance_scale`` or ``true_cfg_scale``)."""
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    width: int = 1024
    height: int = 1024
    size_multiple: int = 16
    negative_prompt: str | None = None
    """Default negative prompt (Qwen-Image needs one, even " ", to enable CFG)."""
    gated: bool = False
    """The hub repo needs an accepted licence and a token (HF_TOKEN)."""
    licence: str = ""
    """The weights' licence as the model card names it (``Apache-2.0``, ``FLUX.1 [dev] Non-Commercial``)."""
    commercial_use: bool = True
    """False where the licence forbids commercial use of the weights or outputs."""
    alpha: bool = False
    """Can produce transparent images (``background: "transparent"``); no family here can yet."""
    presets: dict[str, Preset] = field(default_factory=dict)

    @property
    def quality_steps(self) -> dict[str, int]:
        """OpenAI's ``quality`` mapped to step counts from the presets."""
        return {q: self.presets[q].steps for q in ("low", "medium", "high") if q in self.presets}

    def with_family(self, family: str) -> ModelSpec:
        return replace(self, family=family)


TINY_PRESETS = {"low": Preset(64, 64, 2), "medium": Preset(128, 128, 4), "high": Preset(256, 256, 8),
                "wide": Preset(256, 144, 4)}
"""Presets of every tiny offline model (small sizes: the tiny models exist for tests and demos)."""


@dataclass(frozen=True)
class FamilyDefaults:
    """A family's defaults for models outside the registry (a local directory or hub repo of that family),
    with where each value comes from (``sources``: field name → model card / pipeline docstring)."""

    steps: int
    guidance: float
    width: int = 1024
    height: int = 1024
    size_multiple: int = 16
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    negative_prompt: str | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def spec(self, key: str, source: str, family: str, **overrides: Any) -> ModelSpec:
        """A :class:`ModelSpec` with these defaults (``overrides`` win)."""
        values: dict[str, Any] = {
            "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
            "size_multiple": self.size_multiple, "max_sequence_length": self.max_sequence_length,
            "max_sequence_length_limit": self.max_sequence_length_limit,
            "negative_prompt": self.negative_prompt, "presets": self.presets,
        }
        values.update(overrides)
        return ModelSpec(key=key, source=source, family=family, **values)
