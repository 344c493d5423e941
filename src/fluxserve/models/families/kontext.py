"""FLUX.1 Kontext [dev] (``FluxKontextPipeline``): FLUX.1's architecture, conditioned on a reference image.

An instruction edit takes the image and a prompt that says what to change; with a mask, the masked area is
repainted through ``FluxKontextInpaintPipeline``. Without an image it draws from text like FLUX.1 [dev].
"""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.families.flux import CLIP_AND_T5, FLUX_OPTIMIZATIONS
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 20), "medium": Preset(1024, 1024, 28), "high": Preset(1024, 1024, 40),
           "wide": Preset(1392, 752, 28)}

KONTEXT = FamilyDescriptor(
    name="kontext",
    title="FLUX.1 Kontext",
    runner="fluxserve.engine.families.kontext:KontextRunner",
    pipeline_classes={"generate": "FluxKontextPipeline", "edit": "FluxKontextPipeline",
                      "inpaint": "FluxKontextInpaintPipeline"},
    defaults=FamilyDefaults(
        steps=28, guidance=2.5, max_sequence_length=512, presets=PRESETS,
        sources={"guidance": "FluxKontextPipeline's docstring example (guidance_scale=2.5)",
                 "steps": "FluxKontextPipeline.__call__ default (28)",
                 "licence": "FLUX.1 [dev] Non-Commercial, gated, as FLUX.1 dev (from memory: unverified here)",
                 "presets": "wide: one of PREFERRED_KONTEXT_RESOLUTIONS in pipeline_flux_kontext.py",
                 "default_strength": "FluxKontextInpaintPipeline.__call__ default (strength=1.0)"},
    ),
    models=(
        ModelSpec(
            key="kontext", source="black-forest-labs/FLUX.1-Kontext-dev", family="kontext", gated=True,
            description="FLUX.1 Kontext [dev]: instruction edits of one image, inpainting; non-commercial, gated",
            licence="FLUX.1 [dev] Non-Commercial License", commercial_use=False,
            steps=28, guidance=2.5, max_sequence_length=512, width=1024, height=1024, presets=PRESETS,
        ),
        ModelSpec(
            key="tiny-kontext", source="tiny-kontext", family="kontext", tiny="kontext", licence="Apache-2.0",
            description="Tiny random-weight FLUX.1 Kontext pipeline built offline (demo and tests)",
            steps=4, guidance=2.5, max_sequence_length=256, max_sequence_length_limit=512,
            width=128, height=128, presets=TINY_PRESETS,
        ),
    ),
    max_input_images=1,
    tokenizers=CLIP_AND_T5,  # FLUX.1's text encoders
    default_strength=1.0,
    optimizations=FLUX_OPTIMIZATIONS,
)
