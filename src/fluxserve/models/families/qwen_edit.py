"""Qwen-Image-Edit, the Edit-Plus line (``QwenImageEditPlusPipeline``; Qwen/Qwen-Image-Edit-2509).

Instruction edits with up to three reference images; the Qwen2.5-VL text encoder reads the images together with
the prompt (so prompts neither cache nor batch apart from them). No inpainting pipeline: with a mask the engine
keeps the area outside it by compositing. Qwen-Image's transformer, so Qwen-Image's guidance and optimizations.
"""

from __future__ import annotations

from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.families.qwen_image import QWEN_OPTIMIZATIONS
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

PRESETS = {"low": Preset(768, 768, 20), "medium": Preset(1024, 1024, 40), "high": Preset(1328, 1328, 50),
           "wide": Preset(1664, 928, 40)}

QWEN_IMAGE_EDIT = FamilyDescriptor(
    name="qwen_edit",
    title="Qwen-Image-Edit",
    runner="fluxserve.engine.families.qwen_edit:QwenImageEditRunner",
    pipeline_classes={"generate": "QwenImageEditPlusPipeline", "edit": "QwenImageEditPlusPipeline"},
    defaults=FamilyDefaults(
        steps=40, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024, negative_prompt=" ",
        presets=PRESETS,
        sources={"steps": "Qwen-Image-Edit-2509 model card example, 40 (from memory: unverified here; "
                          "QwenImageEditPlusPipeline's docstring example uses 50)",
                 "guidance": "QwenImageEditPlusPipeline.__call__ default true_cfg_scale=4.0; negative ' '",
                 "max_input_images": "up to 3 references (the 2509 card says 1 to 3 work best)",
                 "licence": "Apache-2.0 (from memory: unverified here)"},
    ),
    models=(
        ModelSpec(
            key="qwen-edit", source="Qwen/Qwen-Image-Edit-2509", family="qwen_edit", licence="Apache-2.0",
            description="Qwen-Image-Edit-2509: instruction edits with up to 3 reference images (needs torchvision)",
            steps=40, guidance=4.0, max_sequence_length=512, max_sequence_length_limit=1024,
            width=1024, height=1024, negative_prompt=" ", presets=PRESETS,
        ),
        ModelSpec(
            key="tiny-qwen-edit", source="tiny-qwen-edit", family="qwen_edit", tiny="qwen_edit",
            licence="Apache-2.0", description="Tiny random-weight Qwen-Image-Edit-2509 pipeline built offline "
                                              "(demo and tests)",
            steps=2, guidance=1.0, max_sequence_length=128, max_sequence_length_limit=1024,
            width=128, height=128, negative_prompt=" ", presets=TINY_PRESETS,
        ),
    ),
    max_input_images=3,
    guidance_parameter="true_cfg_scale",
    uses_negative_prompt=True,
    batches_prompts=False,
    optimizations=QWEN_OPTIMIZATIONS,
)
