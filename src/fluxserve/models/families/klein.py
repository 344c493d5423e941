"""FLUX.2 [klein] 4B and 9B (``Flux2KleinPipeline``): a Qwen3 text encoder, the FLUX.2 transformer, the FLUX.2 VAE.
Step-distilled: 4 steps, guidance ignored. Multi-reference edits and inpainting."""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor, Optimizations
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 4), "medium": Preset(1024, 1024, 4), "high": Preset(1024, 1024, 8),
           "wide": Preset(1344, 768, 4)}
SOURCES = {
    "steps": "4: the distilled klein checkpoints' step count as fluxserve's issue states it; diffusers' docstring "
             "example is for the undistilled base-9B (50 steps, guidance 4) — unverified against the model card",
    "guidance": "Flux2KleinPipeline ignores guidance when is_distilled (do_classifier_free_guidance); 1.0 is "
                "the neutral value — unverified against the model card",
    "max_sequence_length": "Flux2KleinPipeline default (512)",
    "size_multiple": "vae_scale_factor 8 × 2×2 patches (Flux2KleinPipeline.check_inputs)",
    "max_input_images": "Flux2KleinPipeline sets no limit (each reference adds its tokens to every step); 4 is "
                        "fluxserve's budget, unverified against the model card",
}
FLUX2_OPTIMIZATIONS = Optimizations(
    compile_blocks=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"), fused_qkv=True, fp8_linears=True,
    notes="Flux2SingleTransformerBlock already fuses QKV and the MLP input in one projection")

KLEIN = FamilyDescriptor(
    name="klein",
    title="FLUX.2 [klein]",
    runner="fluxserve.engine.families.klein:KleinRunner",
    pipeline_classes={"generate": "Flux2KleinPipeline", "edit": "Flux2KleinPipeline",
                      "inpaint": "Flux2KleinInpaintPipeline"},
    defaults=FamilyDefaults(steps=4, guidance=1.0, max_sequence_length=512, presets=PRESETS, sources=SOURCES),
    models=(
        ModelSpec(
            key="klein", source="black-forest-labs/FLUX.2-klein-4B", family="klein", licence="Apache-2.0",
            description="FLUX.2 [klein] 4B: 4-step distilled, multi-reference edits and inpainting, Apache-2.0",
            steps=4, guidance=1.0, presets=PRESETS,  # sources: SOURCES above
        ),
        ModelSpec(
            key="klein-9b", source="black-forest-labs/FLUX.2-klein-9B", family="klein",
            licence="FLUX Non-Commercial License", commercial_use=False,
            description="FLUX.2 [klein] 9B: 4-step distilled; non-commercial licence (no commercial use)",
            steps=4, guidance=1.0, presets=PRESETS,  # licence unverified here
        ),
        ModelSpec(
            key="tiny-klein", source="tiny-klein", family="klein", tiny="klein", licence="Apache-2.0",
            description="Tiny random-weight FLUX.2 [klein] pipeline built offline (demo and tests)",
            steps=4, guidance=1.0, max_sequence_length=64, width=128, height=128, presets=TINY_PRESETS,
        ),
        ModelSpec(
            key="tiny-klein-9b", source="tiny-klein-9b", family="klein", tiny="klein", licence="Apache-2.0",
            description="Tiny random-weight stand-in for FLUX.2 [klein] 9B (the same tiny architecture)",
            steps=4, guidance=1.0, max_sequence_length=64, width=128, height=128, presets=TINY_PRESETS,
        ),
    ),
    max_input_images=4,
    uses_negative_prompt=True,  # only the undistilled ("base") checkpoints use CFG; the runner checks is_distilled
    optimizations=FLUX2_OPTIMIZATIONS,
    full_size_variants={"klein": None, "klein-9b": "9b"},
)
