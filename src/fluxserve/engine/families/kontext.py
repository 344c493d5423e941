"""FLUX.1 Kontext [dev] (``FluxKontextPipeline``): FLUX.1's architecture, conditioned on a reference image.

An instruction edit takes the image and a prompt that says what to change; with a mask, the masked area is
repainted through ``FluxKontextInpaintPipeline`` (made from the loaded pipeline, sharing its modules). Without
an image it draws from text like FLUX.1 [dev]. Prompts, batching, partial images and decoding are FLUX.1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import DenoiseArgs, PromptEmbedding
from fluxserve.engine.families.flux import FluxRunner
from fluxserve.generation import Task
from fluxserve.models.families.kontext import KONTEXT

if TYPE_CHECKING:
    import numpy as np
    import torch


class KontextRunner(FluxRunner):
    descriptor = KONTEXT

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        # Kontext rescales its output to ``max_area`` (default 1024²) at the requested aspect ratio: ask for
        # exactly the requested size.
        call = {**self.plain_call_kwargs(args.width, args.height), **args.call_kwargs}
        return super().denoise(pipe, positives, negatives, replace(args, call_kwargs=call))

    def plain_call_kwargs(self, width: int, height: int) -> dict[str, Any]:
        return {"max_area": width * height}

    def edit_call_kwargs(self, task: Task, images: Sequence[np.ndarray], mask: np.ndarray | None,
                         strength: float | None, width: int, height: int) -> dict[str, Any]:
        kwargs = super().edit_call_kwargs(task, images, mask, strength, width, height)
        if task == "edit":
            kwargs["image"] = kwargs["image"][0]  # one reference; a list would mean a batch of them
        # The first image arrives at the output size (on the multiple); Kontext's auto-resize would move it to
        # a ~1 megapixel preferred resolution instead.
        kwargs["_auto_resize"] = False
        return kwargs

    def tiny_pipeline(self) -> Any:
        import torch
        from diffusers import FluxKontextPipeline, FluxTransformer2DModel

        flux = FluxRunner().tiny_pipeline()  # tiny-flux's text encoders, tokenizers, VAE and scheduler
        torch.manual_seed(10)
        transformer = FluxTransformer2DModel(  # Kontext [dev] is guidance-distilled: it has the guidance embedding
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        components = {**flux.components, "transformer": transformer}
        return FluxKontextPipeline(**{k: v for k, v in components.items() if k in (
            "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})

    def full_size_components(self, device: str, dtype: Any, variant: str | None = None) -> dict[str, Any]:
        """Kontext [dev] has FLUX.1 [dev]'s architecture (guidance embedding included)."""
        return super().full_size_components(device, dtype, "dev")
