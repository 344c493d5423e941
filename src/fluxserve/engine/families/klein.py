"""FLUX.2 [klein] 4B and 9B (``Flux2KleinPipeline``): a Qwen3 text encoder, the FLUX.2 transformer, the
FLUX.2 VAE (32 latent channels, batch-norm statistics). Step-distilled: 4 steps, guidance ignored.

Multi-reference editing is the same pipeline with ``image=[...]``; inpainting is
``Flux2KleinInpaintPipeline``. Prompts are padded to ``max_sequence_length``, so any prompts batch.
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
    stack,
)
from fluxserve.models.families.klein import KLEIN

if TYPE_CHECKING:
    import torch


class Flux2Staged(FamilyRunner):
    """The stage API shared by the FLUX.2 pipelines (klein and dev): packed latents with position ids, the
    VAE's batch-norm statistics applied by the pipeline before it returns ``output_type="latent"``."""

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        embeds, _text_ids = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device,
                                               num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        return PromptEmbedding({"prompt_embeds": embeds})

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Packed [B, (H/16)·(W/16), C] → [B, C, H/16, W/16] (the grid the pipeline packs row by row)."""
        h = height // (pipe.vae_scale_factor * 2)
        w = width // (pipe.vae_scale_factor * 2)
        if latents.ndim == 4:  # already spatial (denoise output: unpatchified [B, C, H/8, W/8])
            return latents
        return latents.reshape(latents.shape[0], h, w, latents.shape[-1]).permute(0, 3, 1, 2)

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        import torch

        vae = pipe.vae
        if latents.ndim == 3:  # Flux2Pipeline returns packed latents; the klein pipelines finish them first
            latents = self.spatial_latents(pipe, latents, width, height)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
                latents.device, latents.dtype)
            latents = pipe._unpatchify_latents(latents * std + mean)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


class KleinRunner(Flux2Staged):
    descriptor = KLEIN

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(args.call_kwargs)
        if negatives is not None and args.guidance > 1 and not pipe.config.is_distilled:
            kwargs["negative_prompt_embeds"] = stack(negatives, "prompt_embeds")
        out = pipe(
            prompt_embeds=stack(positives, "prompt_embeds"), width=args.width, height=args.height,
            num_inference_steps=args.steps, guidance_scale=args.guidance, generator=args.generators,
            output_type="latent", return_dict=False, callback_on_step_end=args.callback,
            callback_on_step_end_tensor_inputs=["latents"],
            max_sequence_length=args.max_sequence_length or 512, **kwargs,
        )
        return out[0]

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from fluxserve.engine.families.tokenizers import qwen3_tokenizer

        tok = qwen3_tokenizer()
        torch.manual_seed(0)
        # 28 layers: the pipeline reads hidden states 9, 18 and 27 (text_encoder_out_layers), as for Qwen3-4B.
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )).eval()
        torch.manual_seed(1)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        )
        torch.manual_seed(2)
        vae = AutoencoderKLFlux2(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            sample_size=128,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                  transformer=transformer, is_distilled=True)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """FLUX.2 [klein] 4B (default) or 9B (``variant="9b"``) as published.

        4B: transformer 5 double + 20 single blocks, 24 heads × 128, joint dim 7680 (3 × Qwen3-4B's 2560);
        text encoder Qwen3-4B (36 layers, hidden 2560, MLP 9728, 32 heads / 8 KV heads, tied embeddings).
        9B: 8 double + 24 single blocks, 32 heads × 128, joint dim 12288 (3 × 4096); text encoder Qwen3-8B
        (36 layers, hidden 4096, MLP 12288, 32 / 8 heads). VAE: ``AutoencoderKLFlux2()`` defaults.
        These configs are from diffusers' conversion notes as remembered here, not read from the hub: the
        parameter counts in docs/families.md are the check.
        """
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from fluxserve.engine.families.tokenizers import qwen3_tokenizer

        big = variant == "9b"
        hidden = 4096 if big else 2560
        tok = qwen3_tokenizer()
        text_config = Qwen3Config(
            vocab_size=151936, hidden_size=hidden, intermediate_size=12288 if big else 9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
            tie_word_embeddings=not big,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )

        def make() -> dict[str, Any]:
            return {
                "transformer": Flux2Transformer2DModel(
                    num_layers=8 if big else 5, num_single_layers=24 if big else 20,
                    num_attention_heads=32 if big else 24, attention_head_dim=128, joint_attention_dim=3 * hidden,
                    guidance_embeds=False),
                "text_encoder": Qwen3ForCausalLM(text_config),
                "vae": AutoencoderKLFlux2(),
            }

        components: dict[str, Any] = build_on(device, dtype, make)
        for seed, name in enumerate(("transformer", "text_encoder", "vae")):
            init_like_checkpoint(components[name], seed)
            components[name].eval()
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        components["tokenizer"] = tok
        components["is_distilled"] = True
        return components
