"""FLUX.2 [dev] (``Flux2Pipeline``): Mistral Small 3.1 (24B) as text encoder, the 32B FLUX.2 transformer with a
guidance embedding, the FLUX.2 VAE. Guidance-distilled (no CFG); multi-reference edits with ``image=[...]``."""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.families.klein import FLUX2_OPTIMIZATIONS
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 28), "medium": Preset(1024, 1024, 50), "high": Preset(1440, 1440, 50),
           "wide": Preset(1344, 768, 50)}

FLUX2_DEV = FamilyDescriptor(
    name="flux2",
    title="FLUX.2 [dev]",
    runner="fluxserve.engine.families.flux2:Flux2DevRunner",
    pipeline_classes={"generate": "Flux2Pipeline", "edit": "Flux2Pipeline"},
    defaults=FamilyDefaults(
        steps=50, guidance=4.0, max_sequence_length=512, presets=PRESETS,
        sources={"steps": "Flux2Pipeline docstring example (num_inference_steps=50)",
                 "guidance": "Flux2Pipeline's default guidance_scale (4.0); its docstring example uses 2.5",
                 "max_sequence_length": "Flux2Pipeline default (512)",
                 "max_input_images": "Flux2Pipeline sets no limit; 6 is fluxserve's memory budget (BFL advertise "
                                     "up to 10 references for the API — unverified here)"},
    ),
    models=(
        ModelSpec(
            key="flux2-dev", source="black-forest-labs/FLUX.2-dev", family="flux2", gated=True,
            licence="FLUX.2 [dev] Non-Commercial License", commercial_use=False,
            description="FLUX.2 [dev]: 32B, multi-reference edits; non-commercial licence, gated (needs HF_TOKEN; "
                        "its processor needs torchvision)",
            steps=50, guidance=4.0, presets=PRESETS,  # Flux2Pipeline docstring / call defaults
        ),
        ModelSpec(
            key="tiny-flux2-dev", source="tiny-flux2-dev", family="flux2", tiny="flux2", licence="Apache-2.0",
            description="Tiny random-weight FLUX.2 [dev] pipeline built offline (a tokenizer stands in for the "
                        "Pixtral processor)",
            steps=4, guidance=4.0, max_sequence_length=256, width=128, height=128, presets=TINY_PRESETS,
        ),
    ),
    max_input_images=6,
    optimizations=FLUX2_OPTIMIZATIONS,
)
