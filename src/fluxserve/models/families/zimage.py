"""Z-Image-Turbo (``ZImagePipeline``): a Qwen3-4B text encoder, the 6B single-stream Z-Image DiT, FLUX.1's VAE.
Distilled to 8 steps without guidance; CFG is on whenever ``guidance_scale > 0`` (not > 1 as elsewhere)."""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor, Optimizations
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 8), "medium": Preset(1024, 1024, 8), "high": Preset(1280, 1280, 8),
           "wide": Preset(1344, 768, 8)}

ZIMAGE = FamilyDescriptor(
    name="zimage",
    title="Z-Image",
    runner="fluxserve.engine.families.zimage:ZImageRunner",
    pipeline_classes={"generate": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline",
                      "inpaint": "ZImageInpaintPipeline"},
    defaults=FamilyDefaults(
        steps=8, guidance=0.0, max_sequence_length=512, presets=PRESETS,
        sources={"steps": "ZImagePipeline docstring example for Z-Image-Turbo: num_inference_steps=8",
                 "guidance": "ZImagePipeline docstring example: guidance_scale=0.0 (Turbo is guidance-distilled)",
                 "max_sequence_length": "ZImagePipeline default (512)",
                 "size_multiple": "vae_scale_factor 8 × patch 2 (ZImagePipeline raises otherwise)",
                 "cfg_above": "ZImagePipeline.do_classifier_free_guidance: guidance_scale > 0"},
    ),
    models=(
        ModelSpec(
            key="zimage", source="Tongyi-MAI/Z-Image-Turbo", family="zimage", licence="Apache-2.0",
            description="Z-Image-Turbo: 8 steps, no guidance, bilingual text rendering; img2img and inpainting",
            steps=8, guidance=0.0, presets=PRESETS,  # ZImagePipeline docstring example (see defaults)
        ),
        ModelSpec(
            key="tiny-zimage", source="tiny-zimage", family="zimage", tiny="zimage", licence="Apache-2.0",
            description="Tiny random-weight Z-Image pipeline built offline (demo and tests)",
            steps=4, guidance=0.0, max_sequence_length=64, width=128, height=128, presets=TINY_PRESETS,
        ),
    ),
    uses_negative_prompt=True,
    cfg_above=0.0,
    optimizations=Optimizations(
        compile_blocks=("ZImageTransformerBlock",), fused_qkv=False, fp8_linears=True,
        # The timestep embedder reads mlp[0].weight.dtype to cast its input (seen on the H200: AttributeError).
        fp8_keep=("t_embedder.",),
        notes="ZImage's attention processor has no fused-QKV path; its timestep embedder stays bf16 under fp8"),
)
