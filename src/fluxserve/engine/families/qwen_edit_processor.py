"""Qwen2-VL's processor without its video half, for the tiny offline Qwen-Image-Edit model only.

transformers 5 builds ``Qwen2VLProcessor`` with a video processor that needs torchvision, which the CPU
test machines do not have; Qwen-Image-Edit never sends video. This subclass has the same tokenizer and
image processor (``Qwen2VLImageProcessorPil``) and the same ``__call__``, minus the video processor. The
tiny model's ``model_index.json`` names this class; the real Qwen-Image-Edit checkpoints keep
transformers' own ``Qwen2VLProcessor`` (and so need torchvision installed).

This module imports transformers: the family module (torch-free) imports it only inside methods, and the
loader imports it before ``from_pretrained`` when a model index names it.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["ImageOnlyQwen2VLProcessor", "ProcessorMixin"]  # diffusers finds the load method via ProcessorMixin


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
