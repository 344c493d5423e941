"""The peer paths of ``fluxserve bench``: the best public recipes, called directly on the same checkpoint.

- **recipe-lossless** — the flux-fast recipe of the PyTorch and diffusers teams without its lossy parts: the
  checkpoint in bf16, ``fuse_qkv_projections()`` on the transformer and the VAE, the VAE in channels-last
  memory, the recipe's Inductor flags (:data:`RECIPE_INDUCTOR_FLAGS`) and
  ``torch.compile(mode="max-autotune", fullgraph=True)`` on the transformer and on ``vae.decode``
  (max-autotune mode captures CUDA graphs, the recipe's CUDA graphs in its compile path).
- **recipe-fp8** — the same + torchao's ``Float8DynamicActivationFloat8WeightConfig()`` on the transformer
  (per-tensor scales, the recipe's current default) + FlashAttention-3 on fp8 inputs where
  ``flash_attn_interface`` imports, else PyTorch's SDPA (the fastest kernel that installs).
- **cache-dit** — cache-dit's own compile settings (``cache_dit.set_compile_configs()``), its recommended
  fp8 per-row quantization of the transformer where fp8 runs, and ``torch.compile`` of the transformer, as
  its examples do; no step caching (``cache_config=None``), which changes the output and does not help
  4-step models.

The recipes are FLUX.1's; on the other families' pipelines each step is applied where it fits (fused QKV where
the family has a fused attention path, channels-last for a 2-D VAE, the whole-graph compile where Dynamo can
capture it), and the row's note names what was left out.

The recipe's published default serializes the same max-autotune + CUDA-graph compile ahead of time (export +
AOTInductor); ``--compile-cache`` plays that part here (:class:`CompileCache`). Each path starts from the
transformer and VAE loaded fresh from the checkpoint that the engine and the server load (the recipes change
them in place) and shares the baseline's text encoders, which the recipes leave alone. Inductor's and Dynamo's
global settings are restored after each path (:func:`scoped_compile_config`), so the engine path that runs
later in the same process compiles with its own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PEER_PATHS = ("recipe-lossless", "recipe-fp8", "cache-dit")
MATCHING_RECIPE: dict[str, str] = {"plain": "recipe-lossless", "lossless": "recipe-lossless", "fast": "recipe-fp8"}
"""The recipe of the same numerics as each fluxserve mode: no quantization for plain and lossless, fp8 for fast."""
RECIPE_INDUCTOR_FLAGS: dict[str, Any] = {
    "conv_1x1_as_mm": True,  # 1x1 convolutions as matrix products
    "epilogue_fusion": False,  # pointwise ops are not fused into the matrix products
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}
COMPILE_MODES = ("max-autotune", "default", "none")
"""``--recipe-compile``: the recipe's mode; Inductor's default mode (no GEMM autotuning, no CUDA graphs); none."""
COMPILE_TARGETS = ("transformer", "vae")
NOT_WHOLE_GRAPH: dict[str, str] = {
    "ZImagePipeline": "Z-Image's transformer enters a torch.device context, which Dynamo cannot capture",
}
"""Pipelines whose transformer ``fullgraph=True`` cannot capture: the recipe compiles them with graph breaks."""
AUTOTUNE_BUDGETS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "bounded": {
        # coordinate descent still runs, but stops at the first direction that does not improve
        "coordinate_descent_check_all_directions": False,
        # the GEMM templates' default search space, never the exhaustive one
        "max_autotune_gemm_search_space": "DEFAULT",
        # milliseconds each candidate kernel is benchmarked for (Inductor's defaults: 25 and 100)
        "inductor_default_autotune_warmup": 5,
        "inductor_default_autotune_rep": 20,
    },
}
AUTOTUNE_BUDGETS["aten"] = {
    **AUTOTUNE_BUDGETS["bounded"],
    # matrix products and convolutions from ATen's kernels only (cuBLAS, cuDNN), no Triton templates to tune:
    # the bf16 recipe's search picks cuBLAS for FLUX.1's large GEMMs anyway, and torchao's fp8 scaled_mm has
    # 55-106 Triton candidates per shape, which keep its published compile from finishing in 12 minutes
    "max_autotune_gemm_backends": "ATEN",
    "max_autotune_conv_backends": "ATEN",
}
"""``--autotune-budget``: Inductor settings laid over the recipe's. Inductor has no wall-clock budget for its
search; these are the settings that bound it (those missing from the installed torch are reported, not set)."""


@dataclass(frozen=True)
class PeerOptions:
    compile_mode: str = "max-autotune"
    compile_targets: tuple[str, ...] = COMPILE_TARGETS
    autotune_budget: str = "recipe"
    backend: str = "inductor"
    """torch.compile's backend; "eager" checks that the graphs are captured whole without compiling them."""


@dataclass
class PeerSetup:
    """What a peer path applied, in the words its row's note uses."""

    applied: list[str] = field(default_factory=list)
    fp8: bool = False
    """Its linears run in fp8 (its compute efficiency is read against the fp8 GEMM ceiling)."""

    @property
    def note(self) -> str:
        return "; ".join(self.applied)


class PeerUnavailable(RuntimeError):
    """This peer path cannot run here; the message is the reason its row gives."""


# --------------------------------------------------------------------------------------------------
# what can run here

def fp8_problem(device: str) -> str | None:
    """Why torchao's float8 dynamic quantization cannot run on ``device`` (None: it can)."""
    if not device.startswith("cuda"):
        return ("torchao's float8 dynamic quantization needs a CUDA GPU of compute capability 8.9 or newer; "
                f"this run is on {device}")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < (8, 9):
        return ("float8 matrix products need compute capability 8.9 or newer; "
                f"this GPU has {capability[0]}.{capability[1]}")
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (its wheel travels as bench/NOTES.md describes)"
    return None


def recipe_family(pipeline_class: str) -> Any | None:
    """The fluxserve family descriptor of a pipeline class the recipes can be applied to (None: no family
    serves it)."""
    from fluxserve.models.registry import FAMILIES

    return next((family for family in FAMILIES.values()
                 if family.pipeline_classes.get("generate") == pipeline_class), None)


def peer_problem(path: str, pipeline_class: str, device: str) -> str | None:
    """Why peer ``path`` cannot run for this pipeline on ``device`` (None: it can). The recipes are applied to
    every family fluxserve serves, as far as each step fits it (:func:`prepare_recipe`); cache-dit's row is
    FLUX.1's only."""
    if path == "cache-dit":
        if pipeline_class != "FluxPipeline":
            return f"the cache-dit row is measured on FLUX.1's FluxPipeline only, not {pipeline_class}"
        if importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (pip install cache-dit; its wheel travels as bench/NOTES.md describes)"
        return None
    if recipe_family(pipeline_class) is None:
        return f"no fluxserve family serves {pipeline_class}, so there is no recipe row for it"
    if path == "recipe-fp8":
        return fp8_problem(device)
    return None


# --------------------------------------------------------------------------------------------------
# Inductor settings, scoped

@contextlib.contextmanager
def scoped_compile_config() -> Iterator[None]:
    """Inductor's and Dynamo's process-wide settings are as they were before, afterwards (the recipe and
    cache-dit set them globally, as their scripts do)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    saved = inductor_config.get_config_copy(), dynamo_config.get_config_copy()
    try:
        yield
    finally:
        inductor_config.load_config(saved[0])
        dynamo_config.load_config(saved[1])


def set_inductor_flags(flags: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Set the Inductor settings that exist in the installed torch; returns (set, missing)."""
    import torch._inductor.config as inductor_config

    applied, missing = [], []
    for name, value in flags.items():
        if hasattr(inductor_config, name):
            setattr(inductor_config, name, value)
            applied.append(f"{name}={value}")
        else:
            missing.append(name)
    return applied, missing


# --------------------------------------------------------------------------------------------------
# building a peer pipeline

def fresh_pipeline(shared: dict[str, Any], local_dir: Path, device: str, dtype: torch.dtype,
                   pipeline_class: str = "FluxPipeline") -> Any:
    """A pipeline of ``pipeline_class`` over the baseline's text encoders and tokenizers, with its transformer and
    VAE loaded fresh from ``local_dir`` by the classes its ``model_index.json`` names (straight onto the GPU on
    CUDA) and a scheduler of the same config."""
    import json

    import diffusers

    index = json.loads((local_dir / "model_index.json").read_text())
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = device  # a model's from_pretrained takes any device name
    loaded = {name: getattr(diffusers, index[name][1]).from_pretrained(local_dir, subfolder=name, **kwargs)
              for name in ("transformer", "vae")}
    if not device.startswith("cuda"):
        loaded = {name: module.to(device) for name, module in loaded.items()}
    scheduler = shared["scheduler"]
    components = {**shared, "scheduler": type(scheduler).from_config(scheduler.config), **loaded}
    pipe: Any = getattr(diffusers, pipeline_class)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compile(pipe: Any, options: PeerOptions, setup: PeerSetup, device: str) -> None:
    """The recipe's compile of the transformer and ``vae.decode`` (``options`` may narrow it)."""
    if options.compile_mode == "none":
        setup.applied.append("not compiled (--recipe-compile none)")
        return
    whole = type(pipe).__name__ not in NOT_WHOLE_GRAPH
    kwargs: dict[str, Any] = {"fullgraph": whole}
    if options.backend != "inductor":
        kwargs["backend"] = options.backend
    elif options.compile_mode != "default":
        kwargs["mode"] = options.compile_mode
    if "transformer" in options.compile_targets:
        pipe.transformer = torch.compile(pipe.transformer, **kwargs)
    if "vae" in options.compile_targets:
        pipe.vae.decode = torch.compile(pipe.vae.decode, **{**kwargs, "fullgraph": True})
    targets = " and ".join("vae.decode" if t == "vae" else t for t in options.compile_targets)
    words = f"torch.compile(mode={options.compile_mode!r}, fullgraph=True) on {targets}"
    if not whole and "transformer" in options.compile_targets:
        words += f" (fullgraph=False on the transformer: {NOT_WHOLE_GRAPH[type(pipe).__name__]})"
    if options.backend != "inductor":
        words += f" (backend {options.backend!r})"
    if options.compile_mode == "max-autotune":
        words += " (CUDA graphs)" if device.startswith("cuda") else " (no CUDA graphs off CUDA)"
    setup.applied.append(words)


def prepare_recipe(pipe: Any, *, fp8: bool, options: PeerOptions, device: str) -> PeerSetup:
    """Apply the flux-fast recipe to ``pipe`` in its order: fused QKV, attention kernel (fp8 only), channels-last
    VAE, float8 (fp8 only), Inductor flags, compile. Call inside :func:`scoped_compile_config`."""
    setup = PeerSetup(applied=[f"{str(pipe.transformer.dtype).removeprefix('torch.')}"])
    flux1 = type(pipe).__name__ == "FluxPipeline"
    family = recipe_family(type(pipe).__name__)
    # 1. Fused QKV projections in the transformer and the VAE (the same products, fewer launches), where the
    #    family's attention has a fused path (diffusers' generic fusing would silently fuse nothing there).
    if family is not None and family.optimizations.fused_qkv and hasattr(pipe.transformer, "fuse_qkv_projections"):
        pipe.transformer.fuse_qkv_projections()
        fused = ["transformer"]
        if hasattr(pipe.vae, "fuse_qkv_projections"):
            pipe.vae.fuse_qkv_projections()
            fused.append("VAE")
        setup.applied.append("fused QKV" if flux1 else f"fused QKV ({' and '.join(fused)})")
    else:
        setup.applied.append(f"no fused QKV ({type(pipe.transformer).__name__} has no fused attention path)")
    # 2. The attention kernel: FlashAttention-3 on fp8 inputs, as the recipe's lossy path, where it installs
    #    (FLUX.1's attention processor; other families keep theirs).
    if fp8 and not flux1:
        setup.applied.append("the family's own attention (the FlashAttention-3 processor is FLUX.1's)")
    elif fp8:
        if fa3_available():
            pipe.transformer.set_attn_processor(KernelFluxAttnProcessor(fa3_fp8_attention))
            setup.applied.append("FlashAttention-3 on fp8 inputs")
        else:
            setup.applied.append("SDPA attention (flash_attn_interface, FlashAttention-3, is not importable)")
    # 3. Channels-last memory for the VAE's convolutions (2-D ones: a video VAE's 3-D convolutions have none).
    if not any(isinstance(m, torch.nn.Conv3d) for m in pipe.vae.modules()):
        pipe.vae.to(memory_format=torch.channels_last)
        setup.applied.append("channels-last VAE")
    # 4. Dynamic float8 activations and weights in the transformer's linears (torchao).
    if fp8:
        problem = fp8_problem(device)
        if problem:
            raise PeerUnavailable(problem)
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

            config: Any = Float8DynamicActivationFloat8WeightConfig()
        except ImportError:  # torchao before the config classes
            from torchao.quantization import float8_dynamic_activation_float8_weight

            config = float8_dynamic_activation_float8_weight()
        try:
            quantize_(pipe.transformer, config)
        except (AssertionError, RuntimeError, ValueError, NotImplementedError) as exc:
            raise PeerUnavailable(f"torchao float8 quantization failed: {type(exc).__name__}: {exc}") from exc
        setup.applied.append(f"torchao {type(config).__name__} (per-tensor)")
        setup.fp8 = True
    # 5. The recipe's Inductor flags, then the budget's settings over them.
    applied, missing = set_inductor_flags({**RECIPE_INDUCTOR_FLAGS, **AUTOTUNE_BUDGETS[options.autotune_budget]})
    setup.applied.append("Inductor " + ", ".join(applied))
    if missing:
        setup.applied.append("not in this torch: " + ", ".join(missing))
    # 6. Compile.
    _compile(pipe, options, setup, device)
    return setup


def prepare_cache_dit(pipe: Any, *, options: PeerOptions, device: str) -> PeerSetup:
    """cache-dit's best configuration without step caching: its compile settings, fp8 per-row quantization of
    the transformer where fp8 runs, ``torch.compile`` of the transformer. Call inside :func:`scoped_compile_config`."""
    import cache_dit

    setup = PeerSetup(applied=[f"cache-dit {getattr(cache_dit, '__version__', '?')}",
                               f"{str(pipe.transformer.dtype).removeprefix('torch.')}", "no step caching"])
    cache_dit.set_compile_configs()
    setup.applied.append("cache_dit.set_compile_configs()")
    problem = fp8_problem(device)
    if problem is None:
        # cache_config=None with a quantize_config: no DBCache (cache-dit enables its default cache only when
        # every config is None).
        cache_dit.enable_cache(pipe, cache_config=None, quantize_config=cache_dit.QuantizeConfig(
            quant_type="float8_per_row"))
        setup.applied.append("float8_per_row (torchao)")
        setup.fp8 = True
    else:
        setup.applied.append(f"no quantization ({problem})")
    if options.compile_mode == "none":
        setup.applied.append("not compiled (--recipe-compile none)")
    elif "transformer" in options.compile_targets:
        pipe.transformer = torch.compile(pipe.transformer)
        setup.applied.append("torch.compile of the transformer (its examples' default mode)")
    return setup


# --------------------------------------------------------------------------------------------------
# FlashAttention-3 on fp8 inputs, behind a kernel-agnostic FLUX attention processor

def fa3_available() -> bool:
    return importlib.util.find_spec("flash_attn_interface") is not None


@functools.cache
def _fa3_fp8_op() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlashAttention-3 with q, k, v cast to float8 e4m3 unscaled (the recipe's), as a custom op so that a
    full-graph compile traces through it."""

    @torch.library.custom_op("fluxbench::fa3_fp8_attention", mutates_args=())
    def fa3_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        import flash_attn_interface

        fp8 = torch.float8_e4m3fn
        out = flash_attn_interface.flash_attn_func(query.to(fp8), key.to(fp8), value.to(fp8))
        out = out[0] if isinstance(out, tuple) else out  # some builds also return the log-sum-exp
        return out.to(query.dtype).contiguous()

    @fa3_fp8.register_fake
    def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)

    return fa3_fp8


def fa3_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) attention by FlashAttention-3 on fp8 inputs."""
    return _fa3_fp8_op()(query, key, value)


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) attention by PyTorch's SDPA."""
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                           value.transpose(1, 2))
    return out.transpose(1, 2)


class KernelFluxAttnProcessor:
    """FLUX.1's joint attention (the math of diffusers' ``FluxAttnProcessor``: fused or separate projections,
    RMS-normed q/k, text tokens first, rotary embedding) with the attention kernel passed in, a function of
    (batch, tokens, heads, head_dim) tensors."""

    def __init__(self, kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.kernel = kernel

    @staticmethod
    def _projections(attn: Any, states: torch.Tensor, context: bool) -> tuple[torch.Tensor, ...]:
        if attn.fused_projections:
            fused = attn.to_added_qkv if context else attn.to_qkv
            return tuple(fused(states).chunk(3, dim=-1))
        if context:
            return attn.add_q_proj(states), attn.add_k_proj(states), attn.add_v_proj(states)
        return attn.to_q(states), attn.to_k(states), attn.to_v(states)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("KernelFluxAttnProcessor takes no attention mask (FLUX.1's pipelines pass none)")
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim))
                             for t in self._projections(attn, hidden_states, context=False))
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            assert encoder_hidden_states is not None
            text_q, text_k, text_v = (t.unflatten(-1, (-1, attn.head_dim))
                                      for t in self._projections(attn, encoder_hidden_states, context=True))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat([text_q, query], dim=1), torch.cat([text_k, key], dim=1),
                                 torch.cat([text_v, value], dim=1))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.kernel(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


# --------------------------------------------------------------------------------------------------
# persisted compile caches

class CompileCache:
    """``--compile-cache DIR``: Inductor's on-disk caches (compiled graphs, autotuning results, Triton kernels)
    live in ``DIR/inductor`` for every compile in the run, the server's included, so a later run on a machine
    that still has DIR skips the compile and the autotuning of the graphs it has seen. For another machine of
    the same kind, the artifacts the run compiled or used (``torch.compiler.save_cache_artifacts``) are also
    bundled in ``DIR/artifacts-<key>-<tag>.bin`` (key: torch version and device; tag: what the run benched),
    and every bundle of this key is loaded (``load_cache_artifacts``) before anything compiles. Bundles of
    another key are left alone: their entries would never match.

    The bundle is written once, when the run ends (also when it is stopped with SIGTERM, e.g. by
    ``timeout``): a second ``save_cache_artifacts`` in one process returns the artifacts of both calls in one
    stream whose loader keeps only the last call's, so writing it as the run goes would lose the first path's.
    """

    def __init__(self, directory: Path, device: str) -> None:
        self.directory = directory.resolve()
        self.device = device
        self.saved = False

    @property
    def key(self) -> str:
        if self.device.startswith("cuda"):
            where = torch.cuda.get_device_name(torch.device(self.device))
        else:
            where = f"cpu-{os.uname().machine}"
        return re.sub(r"[^A-Za-z0-9.+]+", "_", f"torch{torch.__version__}-{where}")

    def bundles(self) -> list[Path]:
        return sorted(self.directory.glob(f"artifacts-{self.key}-*.bin"))

    def activate(self) -> dict[str, Any]:
        """Point Inductor at DIR/inductor and load this key's bundles; returns what happened, for the report.
        Call before anything compiles."""
        inductor_dir = self.directory / "inductor"
        inductor_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
        os.environ.pop("TRITON_CACHE_DIR", None)  # Triton's kernels go under the Inductor cache then
        info: dict[str, Any] = {"dir": str(self.directory), "key": self.key, "inductor_dir": str(inductor_dir)}
        mine = self.bundles()
        others = sorted(p.name for p in self.directory.glob("artifacts-*.bin") if p not in mine)
        if others:
            info["other_bundles_ignored"] = others
        loaded: dict[str, dict[str, Any]] = {}
        for bundle in mine:
            data = bundle.read_bytes()
            started = time.perf_counter()
            result = torch.compiler.load_cache_artifacts(data)
            loaded[bundle.name] = {"bytes": len(data), "load_s": round(time.perf_counter() - started, 2),
                                   "artifacts": _artifact_counts(result)}
        info["loaded"] = loaded
        log.info("compile cache: %s", info)
        return info

    def save(self, tag: str) -> dict[str, Any] | None:
        """Write this run's bundle (once per process; see the class docstring)."""
        if self.saved:
            return None
        self.saved = True
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return None
        data, info = result
        bundle = self.directory / f"artifacts-{self.key}-{tag}.bin"
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = bundle.with_suffix(".partial")
        partial.write_bytes(data)
        os.replace(partial, bundle)
        return {"saved": str(bundle), "bytes": len(data), "artifacts": _artifact_counts(info)}


def _artifact_counts(info: Any) -> dict[str, int] | None:
    if info is None:
        return None
    return {kind: len(keys) for kind, keys in info.artifacts.items()}


# --------------------------------------------------------------------------------------------------
# compute efficiency

def forward_flops(transformer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """FLOPs of one forward of ``transformer``'s architecture on these inputs, counted by PyTorch's
    ``FlopCounterMode`` on a copy built from its config on the meta device (no weights, no compute): every
    matrix product, attention included (FLUX.1 at 1024², 256 text tokens: 69.5 TFLOP; 512 tokens: 74.4)."""
    from torch.utils.flop_counter import FlopCounterMode

    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value, device="meta")
        return value

    config = dict(transformer.config)
    with torch.device("meta"):
        shell = type(transformer).from_config(config).to(transformer.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        shell(*(meta(a) for a in args), **{k: meta(v) for k, v in kwargs.items()})
    return float(counter.get_total_flops())


def _best_seconds(run: Callable[[], Any], device: str, calls: int, rounds: int) -> float:
    """Fastest mean seconds per call of ``rounds`` rounds of ``calls`` back-to-back calls."""
    cuda = device.startswith("cuda")
    run()
    best = float("inf")
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def gemm_ceiling_tflops(device: str, dtype: torch.dtype) -> dict[str, float]:
    """TFLOP/s of a big matrix product on ``device``, measured now: in ``dtype`` (bf16 on CUDA: 8192³), and in
    float8 e4m3 through ``torch._scaled_mm`` (fast accumulation, as torchao and fluxserve's fp8 use it) where
    the GPU has fp8 (compute capability 8.9+). On CPU a 1024³ product in ``dtype``."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1024
    flops = 2.0 * n**3
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    name = str(dtype).removeprefix("torch.")
    out = {name: _sig(flops / _best_seconds(lambda: a @ b, device, 20 if cuda else 2, 5 if cuda else 3) / 1e12)}
    if cuda and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9):
        fp8 = torch.float8_e4m3fn
        a8, b8 = a.to(fp8), b.to(fp8).t()  # _scaled_mm takes the second operand column-major
        one = torch.ones((), device=device, dtype=torch.float32)

        def scaled() -> Any:
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

        out["fp8"] = _sig(flops / _best_seconds(scaled, device, 20, 5) / 1e12)
    return out


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (TFLOP/s of a GPU and of a tiny model on a CPU alike)."""
    return float(f"{value:.{digits}g}")


def median_forward_seconds(call: Callable[[], Any], device: str, reps: int = 10) -> float:
    """Median seconds of ``call`` (one transformer forward) after two untimed calls."""
    cuda = device.startswith("cuda")
    for _ in range(2):
        call()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
