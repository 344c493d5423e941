"""Qwen-Image-Edit, the Edit-Plus line (``QwenImageEditPlusPipeline``; Qwen/Qwen-Image-Edit-2509).

Instruction edits with up to three reference images. Its Qwen2.5-VL text encoder reads the images together
with the prompt, so prompts are not encoded (nor cached) apart from the images: the pipeline encodes them
in its call. The pipeline has no inpainting mode; with a mask the engine keeps the area outside it by
copying the input's pixels back after decoding. Text-to-image (no image) runs through
``QwenImagePipeline`` made from the loaded pipeline by ``sharing_modules`` (the same weights).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fluxserve.engine.families.base import DenoiseArgs, PromptEmbedding, sharing_modules
from fluxserve.engine.families.qwen_image import QwenImageRunner
from fluxserve.generation import Task
from fluxserve.models.families.qwen_edit import QWEN_IMAGE_EDIT

if TYPE_CHECKING:
    import numpy as np
    import torch

_PROCESSOR = ("fluxserve.engine.families.qwen_edit_processor", "ImageOnlyQwen2VLProcessor")


class QwenImageEditRunner(QwenImageRunner):
    descriptor = QWEN_IMAGE_EDIT

    def __init__(self) -> None:
        super().__init__()
        self._text_to_image: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        return PromptEmbedding({}, text=prompt)  # encoded in the call, together with the images

    def cache_key(self, prompt: str, max_sequence_length: int) -> tuple[str, str, int]:
        return ("qwen_edit:text", prompt, max_sequence_length)

    def text_to_image(self, pipe: Any) -> Any:
        """``QwenImagePipeline`` made from the loaded edit pipeline (same modules), cached per pipeline object."""
        made = self._text_to_image.get(pipe)
        if made is None:
            from diffusers import QwenImagePipeline

            made = sharing_modules(QwenImagePipeline, pipe)
            made.set_progress_bar_config(disable=True)
            self._text_to_image[pipe] = made
        return made

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        import torch

        texts = [e.text or "" for e in positives]
        negative = [e.text or " " for e in negatives] if negatives is not None and args.guidance > 1 else None
        common: dict[str, Any] = dict(
            true_cfg_scale=args.guidance, width=args.width, height=args.height, num_inference_steps=args.steps,
            output_type="latent", return_dict=False, callback_on_step_end_tensor_inputs=["latents"],
            max_sequence_length=args.max_sequence_length or 512)
        if "image" not in args.call_kwargs:  # text to image, every prompt of the batch in one call
            return self.text_to_image(pipe)(prompt=texts, negative_prompt=negative, generator=args.generators,
                                   callback_on_step_end=args.callback, **common)[0]
        # The edit pipeline takes one prompt per call: one call per run of equal prompts, each with its own
        # generators; the step callback sees the whole batch's latents (the other rows at zero).
        outputs = []
        start = 0
        total = len(texts)
        while start < total:
            end = start
            while end < total and texts[end] == texts[start] and (negative is None or negative[end] == negative[start]):
                end += 1
            callback = args.callback if (start, end) == (0, total) else _offset_callback(args.callback, start, total)
            outputs.append(pipe(
                prompt=texts[start], negative_prompt=negative[start] if negative is not None else None,
                num_images_per_prompt=end - start, generator=args.generators[start:end], callback_on_step_end=callback,
                **common, **args.call_kwargs)[0])
            start = end
        return torch.cat(outputs)

    def edit_call_kwargs(self, task: Task, images: Sequence[np.ndarray], mask: np.ndarray | None,
                         strength: float | None, width: int, height: int) -> dict[str, Any]:
        return super().edit_call_kwargs(task, images, None, None, width, height)  # the mask is kept by the engine

    def tiny_pipeline(self) -> Any:
        import importlib

        import torch
        from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline
        from transformers import Qwen2VLImageProcessorPil

        qwen = QwenImageRunner().tiny_pipeline()  # tiny-qwen's transformer, Qwen2.5-VL encoder, tokenizer, scheduler
        torch.manual_seed(11)
        # Downsampling by 8 like the real VAE (tiny-qwen's downsamples by 4): the pipeline encodes each reference
        # at ~1 megapixel, and at 4 the tiny transformer would attend over 16k tokens per reference.
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )
        processor_class = getattr(importlib.import_module(_PROCESSOR[0]), _PROCESSOR[1])
        processor = processor_class(image_processor=Qwen2VLImageProcessorPil(), tokenizer=qwen.tokenizer)
        return QwenImageEditPlusPipeline(transformer=qwen.transformer, vae=vae, scheduler=qwen.scheduler,
                                         text_encoder=qwen.text_encoder, tokenizer=qwen.tokenizer, processor=processor)

    def full_size_components(self, device: str, dtype: Any, variant: str | None = None) -> dict[str, Any]:
        raise NotImplementedError("qwen_edit has no full-size builder yet (its processor needs torchvision)")


def _offset_callback(callback: Any, start: int, total: int) -> Any:
    """A step callback for rows ``start:`` of a batch of ``total``: pads the latents to the whole batch."""
    def wrapped(pipe: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        import torch

        latents = kwargs.get("latents")
        if latents is not None:
            full = torch.zeros((total, *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
            full[start:start + latents.shape[0]] = latents
            kwargs = {**kwargs, "latents": full}
        callback(pipe, step, t, kwargs)
        return {}
    return wrapped
