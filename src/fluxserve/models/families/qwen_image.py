"""Qwen-Image and Qwen-Image-2512 (``QwenImagePipeline``): Qwen2.5-VL-7B text encoder, 20B MMDiT, Wan-style VAE.

True classifier-free guidance (``true_cfg_scale``) with a negative prompt; prompts of different lengths
batch by zero-padding embeddings and masks.
"""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor, Optimizations
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 20), "medium": Preset(1024, 1024, 30), "high": Preset(1328, 1328, 50),
           "wide": Preset(1664, 928, 30)}
QWEN_OPTIMIZATIONS = Optimizations(
    compile_blocks=("QwenImageTransformerBlock",), fused_qkv=False, fp8_linears=True,
    notes="QwenDoubleStreamAttnProcessor2_0 has no fused-QKV path (Q, K, V stay separate)")

QWEN_IMAGE = FamilyDescriptor(
    name="qwen",
    title="Qwen-Image",
    runner="fluxserve.engine.families.qwen_image:QwenImageRunner",
    pipeline_classes={"generate": "QwenImagePipeline", "img2img": "QwenImageImg2ImgPipeline",
                      "inpaint": "QwenImageInpaintPipeline"},
    defaults=FamilyDefaults(
        steps=30, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024, negative_prompt=" ",
        presets=PRESETS,
        sources={"steps": "fluxserve's Qwen-Image default since the first release; QwenImagePipeline's docstring "
                          "example uses 50 — unverified against the model card (no hub access here)",
                 "guidance": "QwenImagePipeline.__call__ default true_cfg_scale=4.0",
                 "negative_prompt": "QwenImagePipeline: CFG needs a negative prompt (\" \" if none)",
                 "max_sequence_length_limit": "QwenImagePipeline.check_inputs (1024)"},
    ),
    models=(
        ModelSpec(
            key="qwen", source="Qwen/Qwen-Image", family="qwen", licence="Apache-2.0",
            description="Qwen-Image: strong text rendering; true CFG with a negative prompt",
            steps=30, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024,
            width=1024, height=1024, negative_prompt=" ", presets=PRESETS,
        ),
        ModelSpec(
            key="qwen-2512", source="Qwen/Qwen-Image-2512", family="qwen", licence="Apache-2.0",
            description="Qwen-Image-2512: newer Qwen-Image weights (same pipeline and defaults)",
            # Same architecture and defaults as Qwen-Image; unverified here.
            steps=30, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024,
            width=1024, height=1024, negative_prompt=" ", presets=PRESETS,
        ),
        ModelSpec(
            key="tiny-qwen", source="tiny-qwen", family="qwen", tiny="qwen", licence="Apache-2.0",
            description="Tiny random-weight Qwen-Image pipeline built offline (demo and tests)",
            steps=4, guidance=4.0, max_sequence_length=128, max_sequence_length_limit=1024,
            width=128, height=128, negative_prompt=" ", presets=TINY_PRESETS,
        ),
        ModelSpec(
            key="tiny-qwen-2512", source="tiny-qwen-2512", family="qwen", tiny="qwen", licence="Apache-2.0",
            description="Tiny random-weight Qwen-Image-2512 stand-in (the same architecture as tiny-qwen)",
            steps=4, guidance=4.0, max_sequence_length=128, max_sequence_length_limit=1024,
            width=128, height=128, negative_prompt=" ", presets=TINY_PRESETS,
        ),
    ),
    guidance_parameter="true_cfg_scale",
    uses_negative_prompt=True,
    lora_signatures=("img_mlp", "txt_mlp", "img_mod"),
    optimizations=QWEN_OPTIMIZATIONS,
)
