"""FLUX.1 [schnell] and [dev] (``FluxPipeline``): CLIP-L + T5-XXL text encoders, 12B MMDiT, 16-channel VAE."""

from __future__ import annotations

from fluxserve.models.descriptor import DemoAdapter, FamilyDescriptor, Optimizations, Tokenizer
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec, Preset

DEV_PRESETS = {"low": Preset(768, 768, 24), "medium": Preset(1024, 1024, 28), "high": Preset(1344, 1344, 40),
               "wide": Preset(1344, 768, 28)}
FLUX_OPTIMIZATIONS = Optimizations(
    compile_blocks=("FluxTransformerBlock", "FluxSingleTransformerBlock"), fused_qkv=True, fp8_linears=True)
CLIP_AND_T5 = (Tokenizer("tokenizer", limit=77), Tokenizer("tokenizer_2"))
"""CLIP reads 77 tokens; T5 reads ``max_sequence_length``."""

FLUX = FamilyDescriptor(
    name="flux",
    title="FLUX.1",
    runner="fluxserve.engine.families.flux:FluxRunner",
    pipeline_classes={"generate": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
    defaults=FamilyDefaults(
        steps=28, guidance=3.5, max_sequence_length=512, presets=DEV_PRESETS,
        sources={"steps": "FLUX.1-dev model card / FluxPipeline docstring example (28 steps, guidance 3.5)",
                 "max_sequence_length": "T5 limit of FluxPipeline (512)"},
    ),
    models=(
        ModelSpec(
            key="schnell", source="black-forest-labs/FLUX.1-schnell", family="flux",
            description="FLUX.1 [schnell]: 4-step distilled, Apache-2.0", licence="Apache-2.0",
            steps=4, guidance=0.0, max_sequence_length=256, max_sequence_length_limit=256,
            width=512, height=512,
            presets={"low": Preset(512, 512, 2), "medium": Preset(768, 768, 4), "high": Preset(1024, 1024, 4),
                     "wide": Preset(1024, 576, 4)},
        ),
        ModelSpec(
            key="dev", source="black-forest-labs/FLUX.1-dev", family="flux", gated=True,
            description="FLUX.1 [dev]: guidance-distilled, non-commercial licence, gated (needs HF_TOKEN)",
            licence="FLUX.1 [dev] Non-Commercial License", commercial_use=False,
            steps=28, guidance=3.5, max_sequence_length=512, width=1024, height=1024,
            presets=DEV_PRESETS,
        ),
        ModelSpec(
            key="tiny-flux", source="tiny-flux", family="flux", tiny="flux",
            description="Tiny random-weight FLUX pipeline built offline (demo and tests; images are noise)",
            licence="Apache-2.0", steps=4, guidance=0.0, max_sequence_length=256, max_sequence_length_limit=512,
            width=128, height=128, presets=TINY_PRESETS,
        ),
    ),
    tokenizers=CLIP_AND_T5,
    lora_signatures=("double_blocks", "single_blocks", "single_transformer_blocks"),
    demo_adapters=(DemoAdapter(model="tiny-flux", name="tiny-flux-demo", seed=7),),
    optimizations=FLUX_OPTIMIZATIONS,
    full_size_variants={"schnell": None, "dev": "dev"},
)
