"""FLUX.1 [schnell] and [dev] (``FluxPipeline``): CLIP-L + T5-XXL text encoders, 12B MMDiT, 16-channel VAE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import (
    DenoiseArgs,
    FamilyRunner,
    PromptEmbedding,
    build_on,
    init_like_checkpoint,
    stack,
)
from fluxserve.models.families.flux import FLUX

if TYPE_CHECKING:
    import torch


class FluxRunner(FamilyRunner):
    descriptor = FLUX

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbedding({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        out = pipe(
            prompt_embeds=stack(positives, "prompt_embeds"),
            pooled_prompt_embeds=stack(positives, "pooled_prompt_embeds"),
            width=args.width, height=args.height, num_inference_steps=args.steps, guidance_scale=args.guidance,
            generator=args.generators, output_type="latent", return_dict=False,
            callback_on_step_end=args.callback, callback_on_step_end_tensor_inputs=["latents"], **args.call_kwargs,
        )
        return out[0]

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        vae = pipe.vae
        latents = self.spatial_latents(pipe, latents, width, height)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from fluxserve.engine.families.tokenizers import clip_tokenizer, t5_tokenizer

        clip_tok = clip_tokenizer()
        t5_tok = t5_tokenizer()
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=False,
        )
        torch.manual_seed(1)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id, hidden_act="quick_gelu",
        ))
        torch.manual_seed(2)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        ))
        torch.manual_seed(3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """FLUX.1 as published (the repos' configs): ``variant="dev"`` has the guidance embedding, schnell not."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from fluxserve.engine.families.tokenizers import clip_tokenizer, t5_tokenizer

        dev = variant == "dev"

        def make() -> dict[str, Any]:
            return {
                "transformer": FluxTransformer2DModel(guidance_embeds=dev),
                "text_encoder_2": T5EncoderModel(T5Config(
                    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(
                    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
                "vae": AutoencoderKL(
                    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
            }

        components: dict[str, Any] = build_on(device, dtype, make)
        for seed, name in enumerate(("transformer", "text_encoder_2", "text_encoder", "vae")):
            init_like_checkpoint(components[name], seed)
            components[name].eval()
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
        components["tokenizer"] = clip_tokenizer(77)
        components["tokenizer_2"] = t5_tokenizer(512)
        return components
