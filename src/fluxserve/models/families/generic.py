"""Any other diffusers text-to-image pipeline: one ordinary pipeline call, no stage split, no partial images."""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor, Tokenizer
from fluxserve.models.families.flux import DEV_PRESETS
from fluxserve.models.spec import FamilyDefaults

GENERIC = FamilyDescriptor(
    name="generic",
    title="any diffusers pipeline",
    runner="fluxserve.engine.families.generic:GenericRunner",
    pipeline_classes={"generate": "DiffusionPipeline"},
    defaults=FamilyDefaults(steps=28, guidance=3.5, presets=DEV_PRESETS,
                            sources={"steps": "FLUX.1 [dev]'s defaults (an assumption)",
                                     "presets": "FLUX.1 [dev]'s (an assumption)"}),
    uses_negative_prompt=True,
    supports_previews=False,
    tokenizers=(Tokenizer("tokenizer"), Tokenizer("tokenizer_2")),
    serves_any_pipeline=True,
)
