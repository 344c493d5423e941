"""Loading a pipeline with ``from_pretrained`` and preparing it for the engine.

Real models and the tiny offline ones take the same path: a diffusers directory (local, or the hub
cache) → ``DiffusionPipeline.from_pretrained`` → placement, memory modes, optimizations, progress
bars off.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxserve.config import EngineConfig
from fluxserve.engine.adapters import AdapterState, ensure_demo_lora
from fluxserve.engine.construction import MODEL_BUILD_LOCK
from fluxserve.engine.device import torch_device, torch_dtype, validate_generator_device
from fluxserve.engine.families import FamilyRunner, PromptEmbedding, runner_for
from fluxserve.engine.memory import apply_attention_slicing, apply_offload, apply_vae_modes
from fluxserve.engine.tiny import ensure_tiny_model
from fluxserve.generation import ModelLoadError
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.devices import DevicePlan
from fluxserve.models.handle import PromptCacheStats, WarmupRuns
from fluxserve.models.registry import family_of_class
from fluxserve.models.spec import ModelSpec

log = logging.getLogger(__name__)


def tiny_model_dir(settings: EngineConfig, spec: ModelSpec) -> Path:
    return settings.cache_dir / "models" / spec.key


def _explain_load_failure(spec: ModelSpec, exc: Exception) -> str:
    name = type(exc).__name__
    text = str(exc)
    if name == "GatedRepoError" or "gated" in text.lower() or "401" in text:
        return (f"{spec.source} is a gated repository: accept its licence on the hub and set HF_TOKEN "
                "(or HUGGINGFACE_HUB_TOKEN) to a token that has access")
    if name in {"RepositoryNotFoundError", "RevisionNotFoundError"}:
        return f"{spec.source} was not found on the hub (check the repo id and FLUX_REVISION)"
    lowered = text.lower()
    if name in {"LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled",
                "MaxRetryError", "ReadTimeout"} or any(
            marker in lowered for marker in ("connect", "offline", "not fully cached", "outgoing traffic")):
        return (f"could not download {spec.source}; this machine cannot reach the hub and the model is not in "
                "the cache — use a tiny-… model (tiny-flux, tiny-klein, ...) or a local diffusers directory")
    if isinstance(exc, OSError | ValueError):
        first = text.strip().splitlines()[0] if text.strip() else name
        return f"could not load {spec.source}: {first[:300]}"
    return f"could not load {spec.source}: {name}"


@dataclass
class PipelineView:
    """One pipeline object that at most one thread uses at a time, with its own cached generators.

    Several views of one model share the weights (same modules) but not the scheduler state, so up to
    ``FLUX_MAX_CONCURRENT`` generations can run on one device without sharing a pipeline object.
    """

    pipeline: Any
    generator_device: str
    generators: list[torch.Generator] = field(default_factory=list)

    def seeded_generators(self, seeds: list[int]) -> list[torch.Generator]:
        """Re-seed the cached generators (growing the cache as needed) — never recreated per request."""
        while len(self.generators) < len(seeds):
            self.generators.append(torch.Generator(device=self.generator_device))
        for gen, seed in zip(self.generators, seeds, strict=False):
            gen.manual_seed(seed)
        return self.generators[: len(seeds)]


class PromptCache:
    """LRU of prompt embeddings keyed by the runner's :meth:`~FamilyRunner.cache_key`; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[Any, ...], PromptEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> PromptEmbedding | None:
        if self.capacity == 0:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[Any, ...], value: PromptEmbedding) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(hits=self.hits, misses=self.misses, capacity=self.capacity)


@dataclass
class LoadedModel:
    """A model resident on one device, ready for the engine: the in-process
    :class:`~fluxserve.models.handle.ModelHandle`."""

    spec: ModelSpec
    plan: DevicePlan
    runner: FamilyRunner
    """The model's family runner (the engine drives its stage API)."""
    pipeline_class: str
    load_seconds: float
    modes: list[str]
    prompt_cache: PromptCache
    _views: queue.Queue[PipelineView] = field(default_factory=queue.Queue)
    primary: Any = None
    warmup: WarmupRuns = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.monotonic)
    """Monotonic time the load finished (tells whether a request waited for it)."""
    loras: AdapterState | None = None
    """Its LoRA adapters (loaded, active, the gate that serializes switching); None where adapters cannot
    apply (FLUX_QUANTIZE=fp8, pipelines without ``load_lora_weights``): see :attr:`loras_unavailable`."""
    loras_unavailable: str | None = None
    shared_lock: threading.Lock = field(default_factory=threading.Lock)
    """Serializes what touches modules every view shares outside denoising: the VAE decode, and the OOM
    ladder's temporary VAE modes and float32 re-decode, so one view never changes the VAE under another."""

    @property
    def descriptor(self) -> FamilyDescriptor:
        return self.runner.descriptor

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.plan.device,)

    def prompt_cache_stats(self) -> PromptCacheStats:
        return self.prompt_cache.stats()

    def token_count(self, prompt: str) -> dict[str, int]:
        return self.runner.token_count(self.primary, prompt)

    @contextmanager
    def view(self) -> Iterator[PipelineView]:
        """Borrow a pipeline view exclusively for one generation."""
        v = self._views.get()
        try:
            yield v
        finally:
            self._views.put(v)

    def add_view(self, view: PipelineView) -> None:
        self._views.put(view)


def _make_view(pipe: Any, generator_device: str) -> PipelineView:
    components = dict(pipe.components)
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    clone = type(pipe)(**components)
    clone.set_progress_bar_config(disable=True)
    return PipelineView(clone, generator_device)


def _import_own_components(directory: Path) -> None:
    """Import fluxserve modules that a tiny model's ``model_index.json`` names as component libraries (e.g.
    tiny-qwen-edit's processor): diffusers loads such classes only from modules already imported."""
    import importlib
    import json

    index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    for value in index.values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("fluxserve."):
            importlib.import_module(value[0])


def _adapter_state(pipe: Any, settings: EngineConfig) -> tuple[AdapterState | None, str | None]:
    """The model's adapter state, or why adapters cannot apply to it."""
    if settings.quantize == "fp8":
        # Float8RowwiseLinear is no nn.Linear: PEFT cannot wrap it, and merging into fp8 weights would lose the
        # adapter's precision. Refused per request (400) rather than applied to a dequantized copy.
        return None, "LoRA adapters are not available with FLUX_QUANTIZE=fp8 (the fp8 linears take no adapters)"
    if not hasattr(pipe, "load_lora_weights"):
        return None, f"{type(pipe).__name__} does not take LoRA adapters"
    return AdapterState(pipe, capacity=settings.lora_cache, hotswap=settings.compile != "off",
                        slots=settings.max_loras_per_request, max_rank=settings.lora_max_rank), None


def direct_placement(plan: DevicePlan, settings: EngineConfig) -> str | None:
    """The ``device_map`` that makes ``from_pretrained`` put the weights straight onto the GPU, or None to
    load on the CPU and move them (:func:`apply_offload`).

    Straight onto the GPU whenever the whole pipeline lives there (CUDA, no CPU offload): no full copy of the
    model in host memory on the way (FLUX.2 dev is 113 GB in bf16, more than many hosts have) and no second
    copy pass. diffusers takes only ``"cuda"`` (the current device), so :func:`_current_cuda_device` makes
    ``cuda:N`` current while loading. MPS and CPU load as before.
    """
    if settings.offload != "none" or plan.backend != "cuda":
        return None
    return "cuda"


@contextmanager
def _current_cuda_device(plan: DevicePlan) -> Iterator[None]:
    """``plan``'s CUDA device is the current one inside (``device_map="cuda"`` means the current device)."""
    if plan.backend != "cuda":
        yield
        return
    with torch.cuda.device(torch_device(plan)):
        yield


def load_model(spec: ModelSpec, plan: DevicePlan, settings: EngineConfig, *, views: int = 1) -> LoadedModel:
    """Load ``spec`` onto ``plan.device`` and prepare it (memory modes, optimizations, views)."""
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    source: str | Path = spec.source
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(plan.dtype), "trust_remote_code": settings.trust_remote_code}
    if spec.tiny is None:
        kwargs.update(cache_dir=str(settings.cache_dir / "hub"), revision=settings.revision,
                      variant=settings.variant, token=settings.hf_token_value())
        if settings.hub_downloads == "off":
            kwargs["local_files_only"] = True
    placement = direct_placement(plan, settings)
    if placement is not None:
        kwargs["device_map"] = placement
    try:
        with MODEL_BUILD_LOCK, _current_cuda_device(plan):  # see fluxserve.engine.construction
            if spec.tiny is not None:
                source = ensure_tiny_model(tiny_model_dir(settings, spec), spec.tiny)
                _import_own_components(Path(source))
            with warnings.catch_warnings():  # newer diffusers rename torch_dtype; older ones need it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:  # every loader failure becomes one clear message
        log.warning("loading %s failed: %s: %s", spec.key, type(exc).__name__, exc)
        reason = _explain_load_failure(spec, exc)
        if settings.hub_downloads == "off" and reason.startswith("could not download"):
            reason = f"{spec.source} is not in the cache and FLUX_HUB_DOWNLOADS=off: it is not downloaded"
        raise ModelLoadError(reason) from exc

    pipeline_class = type(pipe).__name__
    family = family_of_class(pipeline_class, preferred=spec.family)
    if spec.family != family:
        spec = spec.with_family(family)
    runner = runner_for(family)
    pipe.set_progress_bar_config(disable=True)

    modes: list[str] = []
    vae = getattr(pipe, "vae", None)
    if vae is not None and plan.vae_dtype != plan.dtype:
        vae.to(torch_dtype(plan.vae_dtype))
        modes.append(f"vae_{plan.vae_dtype}")
    apply_offload(pipe, settings.offload, plan.device)
    if settings.offload != "none":
        modes.append(f"offload_{settings.offload}")
    if apply_attention_slicing(pipe, settings.attention_slicing):
        modes.append(f"attention_slicing_{settings.attention_slicing}")
    modes += apply_vae_modes(pipe, slicing=settings.vae_slicing, tiling=settings.vae_tiling,
                             tile_size=settings.vae_tile_size)

    # LoRA: hotswap must be enabled before the transformer is compiled (slots padded to FLUX_LORA_MAX_RANK).
    loras, loras_unavailable = _adapter_state(pipe, settings)
    if loras is not None and loras.hotswap:
        pipe.enable_lora_hotswap(target_rank=settings.lora_max_rank)
        modes.append(f"lora_hotswap_rank{settings.lora_max_rank}")
    if spec.tiny is not None:
        try:
            ensure_demo_lora(settings.lora_library_dir, spec, runner.descriptor, Path(source))
        except Exception as exc:  # the demo adapter is a convenience: the model still serves without it
            log.warning("could not write the demo LoRA for %s: %s: %s", spec.key, type(exc).__name__, exc)

    from fluxserve.engine.optimize import apply_optimizations

    modes += apply_optimizations(pipe, settings, plan, runner.descriptor)
    validate_generator_device(plan, pipe._execution_device if settings.offload == "none" else torch_device(plan))

    model = LoadedModel(
        spec=spec, plan=plan, runner=runner, pipeline_class=pipeline_class,
        load_seconds=0.0, modes=modes, prompt_cache=PromptCache(settings.prompt_cache_size), primary=pipe,
        loras=loras, loras_unavailable=loras_unavailable,
    )
    model.add_view(PipelineView(pipe, plan.generator_device))
    for _ in range(views - 1):
        model.add_view(_make_view(pipe, plan.generator_device))
    model.load_seconds = time.perf_counter() - started
    model.loaded_at = time.monotonic()
    return model
