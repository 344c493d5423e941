"""The family runner contract: how fluxserve drives one kind of diffusers pipeline.

A family is declared in the model layer (:class:`fluxserve.models.descriptor.FamilyDescriptor`: its tasks,
defaults, registry entries, tokenizers, guidance parameter, optimizations, ...) and run here: one module in this
package with one subclass of :class:`FamilyRunner` whose ``descriptor`` is that declaration. A runner implements

- how to encode prompts and what keys the prompt cache, and the stage API the engine drives
  (:meth:`FamilyRunner.encode`, :meth:`FamilyRunner.denoise`, :meth:`FamilyRunner.decode`,
  :meth:`FamilyRunner.spatial_latents`, :meth:`FamilyRunner.token_count`);
- the pipelines and keyword arguments of its edit tasks (:meth:`FamilyRunner.edit_pipeline`, made by
  :func:`sharing_modules` so they share the loaded weights and keep their dtypes;
  :meth:`FamilyRunner.edit_call_kwargs`);
- its tiny offline version built from config classes (:meth:`FamilyRunner.tiny_pipeline`) and its full-size
  random-weight architecture for GPU benches (:meth:`FamilyRunner.full_size_components`).

Runner modules import torch and diffusers only inside the methods that need them.

Splitting the pipeline call into stages lets the engine time each stage, cache prompt embeddings, batch
jobs with different prompts into one call, decode partial images mid-way, and cancel between steps, all through
the pipelines' public arguments (``prompt_embeds``, ``output_type="latent"``, ``callback_on_step_end``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fluxserve.generation import Task
from fluxserve.models.descriptor import FamilyDescriptor

if TYPE_CHECKING:
    import numpy as np
    import torch

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


# --- the stage API ----------------------------------------------------------------------------------
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
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the pipeline call: an edit mode's :meth:`FamilyRunner.edit_call_kwargs`."""


class FamilyRunner:
    """Base of every runner: one stage-split interface over a kind of diffusers pipeline."""

    descriptor: ClassVar[FamilyDescriptor]
    """The family this runner runs (its ``runner`` names this class)."""

    def __init__(self) -> None:
        self._edit_pipes: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    # prompts ------------------------------------------------------------------------------------------
    def cache_key(self, prompt: str, max_sequence_length: int) -> tuple[str, str, int]:
        """Key of the prompt cache: embeddings depend on the family, the text and the padded length."""
        return (self.descriptor.name, prompt, max_sequence_length)

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        raise NotImplementedError

    def token_count(self, pipe: Any, prompt: str) -> dict[str, int]:
        """Tokens the prompt takes in each tokenizer (for the web page's counter)."""
        counts = {}
        for tokenizer in self.descriptor.tokenizers:
            tok = getattr(pipe, tokenizer.attribute, None)
            if tok is not None:
                counts[tokenizer.attribute] = len(tok(prompt, add_special_tokens=True)["input_ids"])
        return counts

    # stages -------------------------------------------------------------------------------------------
    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        """Run the pipeline to latents (``output_type="latent"``) with the stacked embeddings."""
        raise NotImplementedError

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Latents from :meth:`denoise` → images [B, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The step callback's latents as [B, C, h, w] (the latent image grid)."""
        raise NotImplementedError

    def text_to_image(self, pipe: Any) -> Any:
        """The pipeline that draws from text alone, for plain calls (bench baselines, tests): the loaded one,
        unless the family's checkpoint is an edit pipeline that needs images (Qwen-Image-Edit)."""
        return pipe

    def plain_call_kwargs(self, width: int, height: int) -> dict[str, Any]:
        """Arguments a plain call of :meth:`text_to_image` needs to draw at width × height besides prompt, size,
        steps and generator (FLUX.1 Kontext: ``max_area``, or it rescales to a megapixel)."""
        return {}

    # edits --------------------------------------------------------------------------------------------
    def edit_pipeline(self, pipe: Any, task: Task) -> Any:
        """The pipeline for ``task``, made from ``pipe`` by :func:`sharing_modules` (same modules, no second copy
        of the weights, dtypes untouched) and cached per pipeline object, so each engine view gets its own."""
        family = self.descriptor
        class_name = family.pipeline_classes.get(task)
        if class_name is None:
            raise ValueError(f"{family.name} models cannot {task}; they can: {', '.join(family.tasks)}")
        if type(pipe).__name__ == class_name:
            return pipe
        made = self._edit_pipes.setdefault(pipe, {})
        if task not in made:
            import diffusers

            edit = sharing_modules(getattr(diffusers, class_name), pipe)
            edit.set_progress_bar_config(disable=True)
            made[task] = edit
        return made[task]

    def edit_call_kwargs(self, task: Task, images: Sequence[np.ndarray], mask: np.ndarray | None,
                         strength: float | None, width: int, height: int) -> dict[str, Any]:
        """Keyword arguments that turn the ``task`` pipeline's call into that edit.

        ``images`` are ``uint8`` H×W×3 arrays (for img2img/inpaint already at the output size), ``mask`` is
        ``uint8`` H×W with 255 where the image may change. The default covers diffusers' common arguments:
        ``image`` (one image, or a list for ``edit``), ``mask_image`` and ``strength``. Raises ``ValueError``
        (a client error) for a task the family lacks, a missing mask or too many references.

        The arguments belong to one call: requests with different input images cannot share a pipeline call,
        so the engine batches edit requests only when their inputs are the same (or runs them one by one).
        """
        from PIL import Image

        family = self.descriptor
        if task not in family.pipeline_classes or task == "generate":
            raise ValueError(f"{family.name} models cannot {task}; they can: {', '.join(family.tasks)}")
        if not images:
            raise ValueError(f"{task} needs an input image")
        pictures = [Image.fromarray(image) for image in images]
        kwargs: dict[str, Any] = {}
        if task == "edit":
            if len(pictures) > family.max_input_images:
                raise ValueError(f"{family.name} takes at most {family.max_input_images} reference images")
            kwargs["image"] = pictures
            return kwargs
        if len(pictures) != 1:
            raise ValueError(f"{task} takes exactly one input image")
        kwargs["image"] = pictures[0]
        if task == "inpaint":
            if mask is None:
                raise ValueError("inpaint needs a mask")
            kwargs["mask_image"] = Image.fromarray(mask, mode="L") if mask.ndim == 2 else Image.fromarray(mask)
        if strength is not None:
            kwargs["strength"] = strength
        return kwargs

    # models -------------------------------------------------------------------------------------------
    def tiny_pipeline(self) -> Any:
        """Build (in memory) this family's tiny pipeline from config classes with fixed-seed float32 weights."""
        raise NotImplementedError(f"{self.descriptor.name} has no tiny offline version")

    @property
    def has_tiny(self) -> bool:
        """The family builds a tiny offline version (it overrides :meth:`tiny_pipeline`); ``engine/tiny.py``
        saves it with ``save_pretrained`` so it loads back through ``from_pretrained`` like a real model."""
        return type(self).tiny_pipeline is not FamilyRunner.tiny_pipeline

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """The published full-size architecture with random weights, built directly on ``device`` in
        ``dtype``: pipeline components by name, ready for ``getattr(diffusers, pipeline_classes["generate"])
        (**components)``. Use ``device="meta"`` to count parameters without allocating them."""
        raise NotImplementedError(f"{self.descriptor.name} has no full-size builder")


# --- helpers shared by families ---------------------------------------------------------------------
def sharing_modules(pipeline_class: Any, pipe: Any) -> Any:
    """A ``pipeline_class`` over ``pipe``'s own modules and config: diffusers' ``from_pipe`` without its last
    step.

    ``from_pipe`` ends with ``new_pipeline.to(dtype=torch_dtype)``, float32 when no dtype is given. The
    modules are shared, so that casts the *loaded* model too: a bf16 model turns float32 (twice the memory,
    several times slower), fp8 linears are up-cast (then crash in ``_scaled_mm``), a float32 VAE (MPS)
    would take the pipeline's dtype. Here every module keeps the dtype and device the engine gave it.
    Arguments the class takes are filled from ``pipe.components`` (modules, tokenizers, scheduler, processor)
    or, for plain options, from ``pipe.config``; a module the class needs but ``pipe`` lacks raises TypeError.
    """
    import inspect

    components = pipe.components
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(pipeline_class.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in components:
            kwargs[name] = components[name]
        elif name in pipe.config and not name.startswith("_"):
            kwargs[name] = pipe.config[name]
    made = pipeline_class(**kwargs)
    source = pipe.config.get("_name_or_path")
    if source is not None:
        made.register_to_config(_name_or_path=source)
    return made


def stack(embeds: Sequence[PromptEmbedding], key: str) -> torch.Tensor:
    import torch

    return torch.cat([e.tensors[key] for e in embeds], dim=0)


def padded(embeds: Sequence[PromptEmbedding], key: str, mask_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different token lengths, zero-padding embeddings and masks on the right."""
    import torch

    length = max(e.tensors[key].shape[1] for e in embeds)
    values, masks = [], []
    for e in embeds:
        x, m = e.tensors[key], e.tensors[mask_key]
        pad = length - x.shape[1]
        values.append(torch.nn.functional.pad(x, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(values), torch.cat(masks)


def build_on(device: str, dtype: torch.dtype, make: Callable[[], Any]) -> Any:
    """Construct modules directly on ``device`` in ``dtype`` (random init; ``meta`` allocates nothing)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(previous)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [B, 3, H, W] → uint8 [B, H, W, 3] on the CPU (the only device→host copy)."""
    import torch

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def init_like_checkpoint(module: Any, seed: int) -> None:
    """Re-draw every floating parameter on its device: N(0, 0.02) matrices, unit norm weights, zero biases
    (PyTorch's default inits of huge layers make activations overflow in bf16; trained weights do not)."""
    import torch

    params = list(module.parameters())
    if not params or params[0].device.type == "meta":
        return
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.is_floating_point():
                continue
            if param.ndim == 1:
                if "norm" in name or name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
