"""Any other diffusers text-to-image pipeline: one ordinary pipeline call, no stage split.

Prompts go in as text (no embedding cache), the pipeline decodes itself (``output_type="pt"``), and
streams get no partial images; seeds, batching, progress and cancellation work as for FLUX.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import DenoiseArgs, FamilyRunner, PromptEmbedding
from fluxserve.models.families.generic import GENERIC

if TYPE_CHECKING:
    import torch


class GenericRunner(FamilyRunner):
    descriptor = GENERIC

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        return PromptEmbedding({}, text=prompt)

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(args.call_kwargs)
        accepted = inspect.signature(pipe.__call__).parameters
        if negatives is not None and "negative_prompt" in accepted:
            kwargs["negative_prompt"] = [e.text or "" for e in negatives]
        if args.max_sequence_length is not None and "max_sequence_length" in accepted:
            kwargs["max_sequence_length"] = args.max_sequence_length
        out = pipe(
            prompt=[e.text or "" for e in positives], width=args.width, height=args.height,
            num_inference_steps=args.steps, guidance_scale=args.guidance, generator=args.generators,
            output_type="pt", return_dict=False, callback_on_step_end=args.callback, **kwargs,
        )
        images = out[0]
        return images * 2 - 1  # pipelines answer [0, 1]; the engine works in [-1, 1] like a VAE's output

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return latents  # already pixels
