"""The family contract: everything fluxserve needs to know to serve one kind of diffusers pipeline.

A *family* is one module in this package with one subclass of :class:`Family`. It declares

- ``name`` and the diffusers pipeline classes per task (``pipeline_classes``; ``"generate"`` is
  required, ``"img2img"``, ``"inpaint"`` and ``"edit"`` optional — edit pipelines are made from the loaded
  one by :func:`sharing_modules`, so they share its weights and keep their dtypes);
- its defaults (:class:`FamilyDefaults`, with the source of each value) and the registry entries it
  serves (``models``: one :class:`ModelSpec` per key, licence and gated state included);
- how to encode prompts and what keys the prompt cache, how prompts batch, and the stage API the engine
  drives (:meth:`Family.encode`, :meth:`Family.denoise`, :meth:`Family.decode`,
  :meth:`Family.spatial_latents`, :meth:`Family.token_count`);
- the keyword arguments of its edit pipelines (:meth:`Family.edit_call_kwargs`);
- its tiny offline version built from config classes (:meth:`Family.tiny_pipeline`, saved by
  :meth:`Family.build_tiny`) and its full-size random-weight architecture for GPU benches
  (:meth:`Family.full_size_components`);
- which optimizations apply (:class:`Optimizations`).

Family modules import neither torch nor diffusers at import time (the registry, which the HTTP layer
reads, is built from them; a test proves it): both are imported inside the methods that need them.

Splitting the pipeline call into stages lets the engine time each stage, cache prompt embeddings, batch
jobs with different prompts into one call, decode partial images mid-way, and cancel between steps, all through
the pipelines' public arguments (``prompt_embeds``, ``output_type="latent"``, ``callback_on_step_end``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fluxserve.generation import Task

if TYPE_CHECKING:
    import numpy as np
    import torch

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


# --- registry entries (torch-free: the HTTP layer reads them) ---------------------------------------
@dataclass(frozen=True)
class Preset:
    """A named size/steps combination offered to clients (the web page's preset buttons)."""

    width: int
    height: int
    steps: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything fluxserve knows about a model before loading it."""

    key: str
    """Registry key, or the repo id / path itself for models outside the registry."""
    source: str
    """Hub repo id or local directory passed to ``from_pretrained``."""
    family: str
    """Name of the :class:`Family` that serves it (``flux``, ``qwen``, ``klein``, ``generic``, ...)."""
    description: str = ""
    tiny: str | None = None
    """Set for the tiny offline models: the family whose :meth:`Family.tiny_pipeline` builds it on first use
    into the cache directory."""
    steps: int = 28
    guidance: float = 3.5
    """Default guidance (the family's ``guidance_parameter``: ``guidance_scale`` or ``true_cfg_scale``)."""
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    width: int = 1024
    height: int = 1024
    size_multiple: int = 16
    negative_prompt: str | None = None
    """Default negative prompt (Qwen-Image needs one, even " ", to enable CFG)."""
    gated: bool = False
    """The hub repo needs an accepted licence and a token (HF_TOKEN)."""
    licence: str = ""
    """The weights' licence as the model card names it (``Apache-2.0``, ``FLUX.1 [dev] Non-Commercial``)."""
    commercial_use: bool = True
    """False where the licence forbids commercial use of the weights or outputs."""
    alpha: bool = False
    """Can produce transparent images (``background: "transparent"``); no family here can yet."""
    presets: dict[str, Preset] = field(default_factory=dict)

    @property
    def quality_steps(self) -> dict[str, int]:
        """OpenAI's ``quality`` mapped to step counts from the presets."""
        return {q: self.presets[q].steps for q in ("low", "medium", "high") if q in self.presets}

    def with_family(self, family: str) -> ModelSpec:
        return replace(self, family=family)


TINY_PRESETS = {"low": Preset(64, 64, 2), "medium": Preset(128, 128, 4), "high": Preset(256, 256, 8),
                "wide": Preset(256, 144, 4)}
"""Presets of every tiny offline model (small sizes: the tiny models exist for tests and demos)."""


@dataclass(frozen=True)
class FamilyDefaults:
    """A family's defaults for models outside the registry (a local directory or hub repo of that family),
    with where each value comes from (``sources``: field name → model card / pipeline docstring)."""

    steps: int
    guidance: float
    width: int = 1024
    height: int = 1024
    size_multiple: int = 16
    max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    negative_prompt: str | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def spec(self, key: str, source: str, family: str, **overrides: Any) -> ModelSpec:
        """A :class:`ModelSpec` with these defaults (``overrides`` win)."""
        values: dict[str, Any] = {
            "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
            "size_multiple": self.size_multiple, "max_sequence_length": self.max_sequence_length,
            "max_sequence_length_limit": self.max_sequence_length_limit,
            "negative_prompt": self.negative_prompt, "presets": self.presets,
        }
        values.update(overrides)
        return ModelSpec(key=key, source=source, family=family, **values)


@dataclass(frozen=True)
class Optimizations:
    """Which of fluxserve's optimizations a family's transformer can take (see ``engine/optimize.py``)."""

    compile_blocks: tuple[str, ...] = ()
    """Class names of the repeated transformer blocks that regional compilation compiles once each
    (diffusers' ``_repeated_blocks``)."""
    fused_qkv: bool = False
    """The attention processors support ``fuse_qkv_projections`` (one matmul for Q, K and V)."""
    fp8_linears: bool = True
    """The transformer's large linear layers may become float8 row-wise (FLUX_QUANTIZE=fp8)."""
    fp8_keep: tuple[str, ...] = ()
    """Module-name prefixes whose linears stay in the model's dtype under fp8 (code that reads their
    ``.weight``, e.g. to pick a dtype; small layers where fp8 gains nothing)."""
    notes: str = ""
    """Why an optimization does not apply, for the docs and the bench table."""


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
    """Extra keyword arguments for the pipeline call: an edit mode's :meth:`Family.edit_call_kwargs`."""


class Family:
    """Base of every family: one stage-split interface over a kind of diffusers pipeline."""

    name: ClassVar[str] = "base"
    title: ClassVar[str] = ""
    """Human name (docs, ``/v1/models`` descriptions)."""
    pipeline_classes: ClassVar[dict[Task, str]] = {}
    """diffusers class names per task; ``"generate"`` is required. Edit tasks are built with
    :func:`sharing_modules`."""
    max_input_images: ClassVar[int] = 0
    """How many reference images the ``"edit"`` task takes (0: no edit task)."""
    defaults: ClassVar[FamilyDefaults]
    models: ClassVar[tuple[ModelSpec, ...]] = ()
    """The registry entries this family serves (real checkpoints and their ``tiny-<key>`` versions)."""
    full_size_variants: ClassVar[dict[str, str | None]] = {}
    """Registry key → the ``variant`` argument of :meth:`full_size_components` that builds its architecture."""
    optimizations: ClassVar[Optimizations] = Optimizations()
    guidance_parameter: ClassVar[str] = "guidance_scale"
    """The pipeline argument the request's ``guidance_scale`` becomes."""
    uses_negative_prompt: ClassVar[bool] = False
    """The engine encodes a negative prompt (true CFG) when guidance > 1."""
    supports_previews: ClassVar[bool] = True
    """Streams partial images: the step callback's latents decode with :meth:`decode` (the engine decodes
    the clean latents the model predicts at that step)."""
    batches_prompts: ClassVar[bool] = True
    """Requests with different prompts (same size/steps/guidance) can share one pipeline call: the
    embeddings are stacked (and padded where lengths differ) by :meth:`denoise`."""
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    """Pipeline attributes of the tokenizers :meth:`token_count` reports."""

    def __init__(self) -> None:
        self._edit_pipes: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    # prompts ------------------------------------------------------------------------------------------
    def wants_negative(self, guidance: float) -> bool:
        """Whether a call at this guidance runs true CFG, so the engine encodes a negative prompt."""
        return self.uses_negative_prompt and guidance > 1

    def cache_key(self, prompt: str, max_sequence_length: int) -> tuple[str, str, int]:
        """Key of the prompt cache: embeddings depend on the family, the text and the padded length."""
        return (self.name, prompt, max_sequence_length)

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        raise NotImplementedError

    def token_count(self, pipe: Any, prompt: str) -> dict[str, int]:
        """Tokens the prompt takes in each tokenizer (for the web page's counter)."""
        counts = {}
        for name in self.tokenizers:
            tok = getattr(pipe, name, None)
            if tok is not None:
                counts[name] = len(tok(prompt, add_special_tokens=True)["input_ids"])
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
    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(self.pipeline_classes)

    def edit_pipeline(self, pipe: Any, task: Task) -> Any:
        """The pipeline for ``task``, made from ``pipe`` by :func:`sharing_modules` (same modules, no second copy
        of the weights, dtypes untouched) and cached per pipeline object, so each engine view gets its own."""
        class_name = self.pipeline_classes.get(task)
        if class_name is None:
            raise ValueError(f"{self.name} models cannot {task}; they can: {', '.join(self.tasks)}")
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

        if task not in self.pipeline_classes or task == "generate":
            raise ValueError(f"{self.name} models cannot {task}; they can: {', '.join(self.tasks)}")
        if not images:
            raise ValueError(f"{task} needs an input image")
        pictures = [Image.fromarray(image) for image in images]
        kwargs: dict[str, Any] = {}
        if task == "edit":
            if len(pictures) > self.max_input_images:
                raise ValueError(f"{self.name} takes at most {self.max_input_images} reference images")
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
        raise NotImplementedError(f"{self.name} has no tiny offline version")

    @property
    def has_tiny(self) -> bool:
        """The family builds a tiny offline version (it overrides :meth:`tiny_pipeline`)."""
        return type(self).tiny_pipeline is not Family.tiny_pipeline

    def build_tiny(self, directory: Path) -> Path:
        """Build the tiny pipeline and save it to ``directory`` with ``save_pretrained`` (atomically), so it
        loads back through ``from_pretrained`` exactly like a real model."""
        from fluxserve.engine.tiny import write_tiny_model

        return write_tiny_model(Path(directory), self.name)

    def full_size_components(self, device: str, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
        """The published full-size architecture with random weights, built directly on ``device`` in
        ``dtype``: pipeline components by name, ready for ``getattr(diffusers, pipeline_classes["generate"])
        (**components)``. Use ``device="meta"`` to count parameters without allocating them."""
        raise NotImplementedError(f"{self.name} has no full-size builder")


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
