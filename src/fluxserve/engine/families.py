"""Per-family adapters: how to encode prompts, denoise and decode with each kind of pipeline.

Splitting the pipeline call into three stages lets the engine time each stage, cache prompt
embeddings, batch jobs with different prompts into one call, preview latents cheaply, and cancel
between steps, all through the pipelines' public arguments (``prompt_embeds``, ``output_type="latent"``,
``callback_on_step_end``) rather than a fork of diffusers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


@dataclass
class PromptEmbedding:
    """Text-encoder output for one prompt (batch dimension 1), kept on the model's device."""

    tensors: dict[str, torch.Tensor]
    text: str | None = None
    """The prompt itself, for pipelines whose text encoding cannot be split off (generic family)."""


@dataclass
class DenoiseArgs:
    width: int
    height: int
    steps: int
    guidance: float
    generators: list[torch.Generator]
    callback: StepCallback
    max_sequence_length: int | None = None


class FamilyAdapter:
    """Base adapter: one stage-split interface over different diffusers pipelines."""

    name = "base"
    supports_previews = True
    uses_negative_prompt = False

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        raise NotImplementedError

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        raise NotImplementedError

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents as [B, C, h, w] for previews."""
        raise NotImplementedError

    def token_count(self, pipe: Any, prompt: str) -> dict[str, int]:
        """Tokens the prompt takes in each tokenizer (for the web page's counter)."""
        counts = {}
        for name in ("tokenizer", "tokenizer_2"):
            tok = getattr(pipe, name, None)
            if tok is not None:
                counts[name] = len(tok(prompt, add_special_tokens=True)["input_ids"])
        return counts


def _stack(embeds: Sequence[PromptEmbedding], key: str) -> torch.Tensor:
    return torch.cat([e.tensors[key] for e in embeds], dim=0)


class FluxAdapter(FamilyAdapter):
    name = "flux"

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbedding({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        out = pipe(
            prompt_embeds=_stack(positives, "prompt_embeds"),
            pooled_prompt_embeds=_stack(positives, "pooled_prompt_embeds"),
            width=args.width, height=args.height, num_inference_steps=args.steps, guidance_scale=args.guidance,
            generator=args.generators, output_type="latent", return_dict=False,
            callback_on_step_end=args.callback, callback_on_step_end_tensor_inputs=["latents"],
        )
        return out[0]

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        vae = pipe.vae
        latents = self.spatial_latents(pipe, latents, width, height)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


class QwenAdapter(FamilyAdapter):
    name = "qwen"
    uses_negative_prompt = True

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device, num_images_per_prompt=1,
                                          max_sequence_length=max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return PromptEmbedding({"prompt_embeds": embeds, "prompt_embeds_mask": mask})

    @staticmethod
    def _padded(embeds: Sequence[PromptEmbedding]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack prompts of different token lengths, zero-padding embeddings and masks."""
        length = max(e.tensors["prompt_embeds"].shape[1] for e in embeds)
        values, masks = [], []
        for e in embeds:
            x, m = e.tensors["prompt_embeds"], e.tensors["prompt_embeds_mask"]
            pad = length - x.shape[1]
            values.append(torch.nn.functional.pad(x, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(m, (0, pad)))
        return torch.cat(values), torch.cat(masks)

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        embeds, mask = self._padded(positives)
        kwargs: dict[str, Any] = {}
        if negatives is not None and args.guidance > 1:
            neg, neg_mask = self._padded(negatives)
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
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        return vae.decode(latents, return_dict=False)[0][:, :, 0]


class GenericAdapter(FamilyAdapter):
    """Any other diffusers text-to-image pipeline: one ordinary pipeline call, no stage split.

    Prompts go in as text (no embedding cache), the pipeline decodes itself (``output_type="pt"``), and
    there are no latent previews; seeds, batching, progress and cancellation work as for FLUX.
    """

    name = "generic"
    supports_previews = False
    uses_negative_prompt = True

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        return PromptEmbedding({}, text=prompt)

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
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


ADAPTERS: dict[str, FamilyAdapter] = {"flux": FluxAdapter(), "qwen": QwenAdapter(), "generic": GenericAdapter()}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [B, 3, H, W] → uint8 [B, H, W, 3] on the CPU (the only device→host copy)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def preview_rgb(spatial: torch.Tensor, max_side: int = 64) -> np.ndarray:
    """A cheap RGB approximation of latents [B, C, h, w] → uint8 [B, h', w', 3] (no VAE decode).

    The first three latent channels, each stretched to the 1st..99th percentile, at most ``max_side``
    pixels on the long side. It shows composition emerging, not final colours.
    """
    x = spatial[:, :3].float()
    if x.shape[1] < 3:
        x = x.repeat(1, 3, 1, 1)[:, :3]
    flat = x.flatten(2)
    lo = flat.quantile(0.01, dim=2, keepdim=True).unsqueeze(-1)
    hi = flat.quantile(0.99, dim=2, keepdim=True).unsqueeze(-1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = max(h, w) / max_side
    if scale > 1:
        x = torch.nn.functional.interpolate(x, size=(max(1, int(h / scale)), max(1, int(w / scale))), mode="area")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
