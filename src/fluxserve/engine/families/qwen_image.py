"""Qwen-Image and Qwen-Image-2512 (``QwenImagePipeline``): Qwen2.5-VL-7B text encoder, 20B MMDiT, Wan-style VAE.

True classifier-free guidance (``true_cfg_scale``) with a negative prompt; prompts of different lengths
batch by zero-padding embeddings and masks.
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
    padded,
)
from fluxserve.models.families.qwen_image import QWEN_IMAGE

if TYPE_CHECKING:
    import torch


class QwenImageRunner(FamilyRunner):
    descriptor = QWEN_IMAGE

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        import torch

        embeds, mask = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device, num_images_per_prompt=1,
                                          max_sequence_length=max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return PromptEmbedding({"prompt_embeds": embeds, "prompt_embeds_mask": mask})

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        embeds, mask = padded(positives, "prompt_embeds", "prompt_embeds_mask")
        kwargs: dict[str, Any] = dict(args.call_kwargs)
        if negatives is not None and args.guidance > 1:
            neg, neg_mask = padded(negatives, "prompt_embeds", "prompt_embeds_mask")
            kwargs.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        out = pipe(
            prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=args.guidance,
            width=args.width, height=args.height, num_inference_steps=args.steps,
            generator=args.generators, output_type="latent", return_dict=False,
            callback_on_step_end=args.callback, callback_on_step_end_tensor_inputs=["latents"], **kwargs,
        )
        return out[0]

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        import torch

        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        return vae.decode(latents, return_dict=False)[0][:, :, 0]

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLForConditionalGeneration

        from fluxserve.engine.families.tokenizers import qwen_tokenizer, tiny_qwen25vl_config

        tok = qwen_tokenizer()
        torch.manual_seed(0)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        torch.manual_seed(1)
        vae = AutoencoderKLQwenImage(
            base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )
        torch.manual_seed(2)
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config(tok)).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192)
        return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                                 tokenizer=tok)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """Qwen-Image (and -2512, the same architecture): the published configs.

        Transformer: ``QwenImageTransformer2DModel()`` defaults (60 layers, 24 heads × 128, joint dim 3584).
        Text encoder: Qwen2.5-VL-7B-Instruct (hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944,
        vocab 152064; vision tower 32 layers × 1280). VAE: ``AutoencoderKLQwenImage()`` defaults.
        """
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from fluxserve.engine.families.tokenizers import qwen_tokenizer

        tok = qwen_tokenizer()
        ids = tok.convert_tokens_to_ids
        config = Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                "pad_token_id": ids("<|endoftext|>"),
            },
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                           "temporal_patch_size": 2, "window_size": 112,
                           "fullatt_block_indexes": [7, 15, 23, 31]},
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            image_token_id=ids("<|image_pad|>"),
        )

        def make() -> dict[str, Any]:
            return {"transformer": QwenImageTransformer2DModel(),
                    "text_encoder": Qwen2_5_VLForConditionalGeneration(config),
                    "vae": AutoencoderKLQwenImage()}

        components: dict[str, Any] = build_on(device, dtype, make)
        for seed, name in enumerate(("transformer", "text_encoder", "vae")):
            init_like_checkpoint(components[name], seed)
            components[name].eval()
        # Qwen-Image's scheduler_config.json: exponential time shift, dynamic shifting 0.5..0.9.
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, time_shift_type="exponential")
        components["tokenizer"] = tok
        return components
