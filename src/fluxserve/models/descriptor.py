"""A family descriptor: everything about one kind of diffusers pipeline that can be said without running it.

The HTTP layer, the catalog, the LoRA library and the Ray ingress read descriptors and never name a family:
what a model's guidance argument is called, which tokenizers it has and what they read, what it does with
input images, which adapter files fit it, which demo adapter its tiny model ships with, which optimizations
apply. The engine reads the same descriptor and drives the family's *runner* (``fluxserve.engine.families``),
which the descriptor names by import path (``runner``), so this module never imports the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fluxserve.generation import Task
from fluxserve.models.spec import FamilyDefaults, ModelSpec


@dataclass(frozen=True)
class Tokenizer:
    """One tokenizer of a family's pipelines and how many tokens its text encoder reads."""

    attribute: str
    """The pipeline attribute that holds it (``tokenizer``, ``tokenizer_2``)."""
    limit: int | None = None
    """Tokens its encoder reads; None: the model's ``max_sequence_length`` (a request may change it)."""


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


@dataclass(frozen=True)
class EditModes:
    """What a model does with input images."""

    without_mask: Task | None
    with_mask: Task | None
    max_images: int
    masked_by_compositing: bool = False
    """True where the family has no inpainting pipeline and edits by instruction: the area outside the mask
    is then kept by copying the input's pixels back after decoding (Qwen-Image-Edit)."""


@dataclass(frozen=True)
class DemoAdapter:
    """A random-weight LoRA that serving a tiny model writes into the library once (demo and tests)."""

    model: str
    """The registry key of the tiny model it fits (its shapes fit only that model)."""
    name: str
    seed: int


@dataclass(frozen=True, eq=False)
class FamilyDescriptor:
    """One family of pipelines, declared. See ``docs/families.md`` for adding one."""

    name: str
    """The family's key (``ModelSpec.family``)."""
    title: str
    """Human name (docs, descriptions)."""
    runner: str
    """``module:Class`` of its runner in the engine (the stage API, pipeline building, tiny and full-size
    builders); imported only by the engine, when a model of the family loads."""
    pipeline_classes: Mapping[Task, str]
    """diffusers class names per task; ``"generate"`` is required, ``"img2img"``, ``"inpaint"`` and ``"edit"``
    are optional (the runner makes them from the loaded pipeline, sharing its modules)."""
    defaults: FamilyDefaults
    """Defaults for models of this family outside the registry, with the source of each value."""
    models: tuple[ModelSpec, ...] = ()
    """Its registry entries (real checkpoints and their ``tiny-<key>`` versions)."""
    max_input_images: int = 0
    """How many reference images the ``"edit"`` task takes (0: no edit task)."""
    guidance_parameter: str = "guidance_scale"
    """The pipeline argument a request's ``guidance_scale`` becomes (``true_cfg_scale`` for true CFG)."""
    uses_negative_prompt: bool = False
    """The engine encodes a negative prompt (true CFG) when guidance is above ``cfg_above``."""
    cfg_above: float = 1.0
    """Guidance above which the pipeline runs classifier-free guidance (Z-Image: above 0)."""
    supports_previews: bool = True
    """Streams partial images: the step callback's latents decode with the runner's ``decode`` (the engine decodes
    the clean latents the model predicts at that step)."""
    batches_prompts: bool = True
    """Requests with different prompts (same size/steps/guidance) can share one pipeline call."""
    tokenizers: tuple[Tokenizer, ...] = (Tokenizer("tokenizer"),)
    """The tokenizers ``/v1/tokenize`` counts, and what each one's encoder reads."""
    default_strength: float | None = None
    """img2img/inpaint strength when a request gives none; None: the server's default."""
    lora_signatures: tuple[str, ...] = ()
    """Substrings of LoRA tensor names that only this family's transformer has: the LoRA library reads an
    adapter's family from them when neither its folder nor its metadata says."""
    demo_adapters: tuple[DemoAdapter, ...] = ()
    optimizations: Optimizations = Optimizations()
    full_size_variants: Mapping[str, str | None] = field(default_factory=dict)
    """Registry key → the ``variant`` the runner's full-size builder takes for its architecture (benches)."""
    serves_any_pipeline: bool = False
    """This family serves pipelines that no other family claims (one per registry)."""
    pixels_per_token: int = 256
    """Output pixels one image token of the transformer covers: (VAE downsampling × patch size)², 8 × 2 for
    every built-in family. The compute budget counts tokens with it."""

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(self.pipeline_classes)

    def claims(self, class_name: str) -> bool:
        """Whether ``class_name`` is one of this family's pipelines."""
        return not self.serves_any_pipeline and class_name in self.pipeline_classes.values()

    def wants_negative(self, guidance: float) -> bool:
        """Whether a call at this guidance runs true CFG, so the engine encodes a negative prompt."""
        return self.uses_negative_prompt and guidance > self.cfg_above

    def transformer_tokens(self, width: int, height: int, max_sequence_length: int) -> int:
        """Tokens one transformer pass reads for one image: image tokens plus (at most) the text tokens."""
        return width * height // self.pixels_per_token + max_sequence_length

    def transformer_passes(self, guidance: float) -> int:
        """Transformer passes per step: 2 where true CFG runs (conditional and unconditional), else 1."""
        return 2 if self.wants_negative(guidance) else 1

    @property
    def edit_modes(self) -> EditModes | None:
        """img2img and inpaint take one image; an instruction edit up to ``max_input_images``. None: no edits."""
        tasks = self.pipeline_classes
        without: Task | None = "edit" if "edit" in tasks else "img2img" if "img2img" in tasks else None
        with_mask: Task | None = "inpaint" if "inpaint" in tasks else "edit" if "edit" in tasks else None
        if without is None and with_mask is None:
            return None
        max_images = max(1, self.max_input_images) if without == "edit" else 1
        return EditModes(without, with_mask, max_images, masked_by_compositing=with_mask == "edit")

    def token_limits(self, spec: ModelSpec) -> dict[str, int]:
        """Tokenizer attribute → tokens its encoder reads for ``spec``."""
        return {t.attribute: t.limit if t.limit is not None else spec.max_sequence_length for t in self.tokenizers}

    def demo_adapter(self, model_key: str) -> DemoAdapter | None:
        return next((demo for demo in self.demo_adapters if demo.model == model_key), None)
