"""FLUX.2 [dev] (``Flux2Pipeline``): Mistral Small 3.1 (24B) as text encoder, the 32B FLUX.2 transformer with a
guidance embedding, the FLUX.2 VAE. Guidance-distilled (no CFG); multi-reference editing with ``image=[...]``.

Its tiny offline version differs from the real checkpoint in one component: ``tokenizer`` is a byte-level
``PreTrainedTokenizerFast`` with Mistral 3's special tokens and chat-template shape instead of a
``PixtralProcessor`` — transformers 5.24 refuses to build a ``PixtralProcessor`` without torchvision, which
is not installed here. ``Flux2Pipeline`` only calls ``tokenizer.apply_chat_template`` on text (images reach the
transformer through the VAE; the processor's image half is used only by caption upsampling, which fluxserve
does not call), so the tiny model runs the same encode/denoise/decode code. Serving the real FLUX.2 [dev]
needs ``pip install torchvision`` for its processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import DenoiseArgs, PromptEmbedding, build_on, init_like_checkpoint, stack
from fluxserve.engine.families.klein import Flux2Staged
from fluxserve.models.families.flux2 import FLUX2_DEV

if TYPE_CHECKING:
    import torch


class Flux2DevRunner(Flux2Staged):
    descriptor = FLUX2_DEV

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        out = pipe(
            prompt_embeds=stack(positives, "prompt_embeds"), width=args.width, height=args.height,
            num_inference_steps=args.steps, guidance_scale=args.guidance, generator=args.generators,
            output_type="latent", return_dict=False, callback_on_step_end=args.callback,
            callback_on_step_end_tensor_inputs=["latents"], max_sequence_length=args.max_sequence_length or 512,
            **args.call_kwargs,
        )
        return out[0]

    @staticmethod
    def _mistral3_config(tok: Any, *, full: bool) -> Any:
        from transformers import Mistral3Config

        ids = tok.convert_tokens_to_ids
        if full:  # Mistral-Small-3.1-24B-Instruct-2503
            text = {"hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0}}
            vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "head_dim": 64, "patch_size": 14, "image_size": 1540}
        else:  # 31 layers: the pipeline reads hidden states 10, 20 and 30 (text_encoder_out_layers)
            text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 31, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tok), "max_position_embeddings": 1024}
            vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "head_dim": 8, "patch_size": 4, "image_size": 64}
        text.update({"model_type": "mistral", "pad_token_id": ids("<pad>"), "bos_token_id": ids("<s>"),
                     "eos_token_id": ids("</s>")})
        return Mistral3Config(text_config=text, vision_config={"model_type": "pixtral", **vision},
                              image_token_index=ids("[IMG]"), spatial_merge_size=2, projector_hidden_act="gelu",
                              multimodal_projector_bias=False, tie_word_embeddings=not full)

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2Pipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Mistral3ForConditionalGeneration

        from fluxserve.engine.families.tokenizers import mistral_tokenizer

        tok = mistral_tokenizer()
        torch.manual_seed(0)
        text_encoder = Mistral3ForConditionalGeneration(self._mistral3_config(tok, full=False)).eval()
        torch.manual_seed(1)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
        )
        torch.manual_seed(2)
        vae = AutoencoderKLFlux2(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                 norm_num_groups=4, sample_size=128)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """FLUX.2 [dev] as published: ``Flux2Transformer2DModel()`` defaults (8 double + 48 single blocks,
        48 heads × 128, joint dim 15360 = 3 × 5120, guidance embedding) and Mistral Small 3.1 24B (40 layers,
        hidden 5120, with its Pixtral vision tower), ``AutoencoderKLFlux2()`` defaults. The tokenizer is the
        offline stand-in described in the module docstring."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Mistral3ForConditionalGeneration

        from fluxserve.engine.families.tokenizers import mistral_tokenizer

        tok = mistral_tokenizer()
        config = self._mistral3_config(tok, full=True)

        def make() -> dict[str, Any]:
            return {"transformer": Flux2Transformer2DModel(),
                    "text_encoder": Mistral3ForConditionalGeneration(config), "vae": AutoencoderKLFlux2()}

        components: dict[str, Any] = build_on(device, dtype, make)
        for seed, name in enumerate(("transformer", "text_encoder", "vae")):
            init_like_checkpoint(components[name], seed)
            components[name].eval()
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        components["tokenizer"] = tok
        return components
