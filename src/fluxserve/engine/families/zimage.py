"""Z-Image-Turbo (``ZImagePipeline``): a Qwen3-4B text encoder, the 6B single-stream Z-Image DiT, FLUX.1's
VAE. Distilled to 8 steps without guidance; img2img and inpainting are their own pipelines.

Prompt embeddings are variable-length (the padding is masked out by the pipeline), passed as a list, so
prompts of any length batch. CFG is on whenever ``guidance_scale > 0`` (not > 1 as elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import (
    DenoiseArgs,
    FamilyRunner,
    PromptEmbedding,
    build_on,
    init_like_checkpoint,
)
from fluxserve.models.families.zimage import ZIMAGE

if TYPE_CHECKING:
    import torch


class ZImageRunner(FamilyRunner):
    descriptor = ZIMAGE

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        embeds = pipe._encode_prompt(prompt=[prompt], device=pipe._execution_device,
                                     max_sequence_length=max_sequence_length)[0]
        return PromptEmbedding({"prompt_embeds": embeds.unsqueeze(0)})  # [1, tokens, dim], padding dropped

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(args.call_kwargs)
        if args.guidance > 0:
            kwargs["negative_prompt_embeds"] = [e.tensors["prompt_embeds"][0] for e in negatives or ()]
        out = pipe(
            prompt_embeds=[e.tensors["prompt_embeds"][0] for e in positives], width=args.width, height=args.height,
            num_inference_steps=args.steps, guidance_scale=args.guidance, generator=args.generators,
            output_type="latent", return_dict=False, callback_on_step_end=args.callback,
            callback_on_step_end_tensor_inputs=["latents"], **kwargs,
        )
        return out[0]

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return latents  # [B, C, H/8, W/8] throughout

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        vae = pipe.vae
        latents = (latents.to(vae.dtype) / vae.config.scaling_factor) + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from fluxserve.engine.families.tokenizers import qwen3_tokenizer

        tok = qwen3_tokenizer()
        torch.manual_seed(0)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )).eval()
        torch.manual_seed(1)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
        )
        torch.manual_seed(2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """Z-Image-Turbo as published: ``ZImageTransformer2DModel()`` defaults (30 layers + 2+2 refiners, dim
        3840, 30 heads, caption dim 2560), Qwen3-4B as text encoder (36 layers, hidden 2560, MLP 9728, 32 / 8
        heads), FLUX.1's VAE (16 latent channels)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from fluxserve.engine.families.tokenizers import qwen3_tokenizer

        tok = qwen3_tokenizer()
        text_config = Qwen3Config(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
            tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        )

        def make() -> dict[str, Any]:
            return {
                "transformer": ZImageTransformer2DModel(),
                "text_encoder": Qwen3Model(text_config),
                "vae": AutoencoderKL(
                    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
            }

        components: dict[str, Any] = build_on(device, dtype, make)
        for seed, name in enumerate(("transformer", "text_encoder", "vae")):
            init_like_checkpoint(components[name], seed)
            components[name].eval()
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                                  use_dynamic_shifting=False)
        components["tokenizer"] = tok
        return components
