"""Speed optimizations applied to a loaded pipeline (FLUX_COMPILE, FLUX_QUANTIZE, ...).

:func:`apply_optimizations` runs once per loaded model, after the pipeline is on its device and the
memory modes are applied. Every optimization is driven by one field of :class:`~fluxserve.settings.Settings`
and everything is off by default, so a default CPU start changes nothing. The order is fixed because the
steps depend on each other:

1. ``FLUX_ATTENTION_BACKEND`` — diffusers' attention dispatcher (e.g. ``_native_cudnn`` on Hopper).
2. ``FLUX_FUSE_QKV`` — one matmul for Q, K and V (exact up to float rounding; done before quantizing so
   the fused weight is quantized once).
3. ``FLUX_QUANTIZE=fp8`` — float8 dynamic activation × float8 weight with row-wise scales, the numerics
   of torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` as a plain module (see
   :class:`Float8RowwiseLinear`; lossy, CUDA compute capability ≥ 8.9).
4. ``FLUX_STEP_CACHE=fbcache:<t>`` — diffusers' First Block Cache (lossy; skips most blocks on steps
   whose first-block residual barely changed; for many-step models).
5. ``FLUX_CHANNELS_LAST`` — channels_last memory format for the VAE's convolutions.
6. ``FLUX_COMPILE`` — ``torch.compile`` of the transformer's repeated blocks (regional, fast to compile)
   or of the whole transformer (full), plus the VAE decoder on CUDA.

Invalid combinations raise :class:`OptimizationError` (a ``ValueError``) naming the variable to change,
before anything is modified.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxserve.engine.device import torch_device
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.devices import DevicePlan
from fluxserve.settings import Settings

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
"""float8 matmuls (``torch._scaled_mm``) need Ada (8.9) or Hopper (9.0) and later."""
RECOMPILE_LIMIT = 64
"""Compiled variants kept per code object: every (batch size, width, height) is one static graph."""


class OptimizationError(ValueError):
    """The requested optimizations cannot run here; the message names the setting (``FLUX_...``)."""


@dataclass(frozen=True)
class StepCache:
    """A parsed ``FLUX_STEP_CACHE`` value."""

    kind: str
    """off | fbcache."""
    threshold: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.kind != "off"


def parse_step_cache(value: str) -> StepCache:
    """Parse ``off`` or ``fbcache[:<threshold>]`` (threshold in (0, 1), default 0.08)."""
    text = value.strip().lower()
    if text in ("", "off", "none", "0", "false"):
        return StepCache("off")
    kind, _, arg = text.partition(":")
    if kind != "fbcache":
        raise OptimizationError(f"FLUX_STEP_CACHE={value!r}: must be off or fbcache:<threshold>")
    try:
        threshold = float(arg) if arg else 0.08
    except ValueError:
        raise OptimizationError(f"FLUX_STEP_CACHE={value!r}: the fbcache threshold must be a number") from None
    if not 0.0 < threshold < 1.0:
        raise OptimizationError(f"FLUX_STEP_CACHE={value!r}: the fbcache threshold must be in (0, 1)")
    return StepCache("fbcache", threshold)


def _cuda_capability(plan: DevicePlan) -> tuple[int, int] | None:
    if plan.backend != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(torch_device(plan))


def _diffusers_has_cache() -> bool:
    try:
        from diffusers.hooks import FirstBlockCacheConfig  # noqa: F401
    except ImportError:
        return False
    return True


def validate_optimizations(settings: Settings, plan: DevicePlan, transformer: Any = None) -> StepCache:
    """Check the requested optimizations against the device and the installed libraries.

    Raises :class:`OptimizationError` naming the variable for any combination that cannot work, before
    the pipeline is touched. Returns the parsed step cache.
    """
    cache = parse_step_cache(settings.step_cache)
    if settings.quantize == "fp8":
        if plan.backend != "cuda":
            raise OptimizationError(
                f"FLUX_QUANTIZE=fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or later); "
                f"this model runs on {plan.device}. Unset FLUX_QUANTIZE (or set it to none)."
            )
        capability = _cuda_capability(plan)
        if capability is None or capability < FP8_MIN_CAPABILITY:
            found = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
            raise OptimizationError(
                f"FLUX_QUANTIZE=fp8 needs compute capability >= 8.9 (Ada, Hopper or later); {plan.device} has "
                f"{found}. Unset FLUX_QUANTIZE (or set it to none)."
            )
        if not hasattr(torch, "_scaled_mm"):
            raise OptimizationError(
                f"FLUX_QUANTIZE=fp8 needs torch._scaled_mm (torch >= 2.5); torch {torch.__version__} lacks it. "
                "Unset FLUX_QUANTIZE or upgrade torch."
            )
        if settings.offload != "none":
            raise OptimizationError(
                f"FLUX_QUANTIZE=fp8 cannot be combined with FLUX_OFFLOAD={settings.offload} (quantized weights "
                "must stay on the GPU); set FLUX_OFFLOAD=none."
            )
    if settings.compile != "off" and settings.offload == "sequential":
        raise OptimizationError(
            f"FLUX_COMPILE={settings.compile} cannot be combined with FLUX_OFFLOAD=sequential (its hooks move "
            "weights inside every layer); use FLUX_OFFLOAD=model or none, or FLUX_COMPILE=off."
        )
    if cache.enabled:
        if not _diffusers_has_cache():
            raise OptimizationError(
                f"FLUX_STEP_CACHE={settings.step_cache}: the installed diffusers has no First Block Cache "
                "(needs diffusers >= 0.35); set FLUX_STEP_CACHE=off."
            )
        if transformer is not None and not hasattr(transformer, "enable_cache"):
            raise OptimizationError(
                f"FLUX_STEP_CACHE={settings.step_cache}: this model's transformer does not support caching; "
                "set FLUX_STEP_CACHE=off."
            )
    check_attention_backend(settings, plan)
    if settings.attention_backend and transformer is not None and not hasattr(transformer, "set_attention_backend"):
        raise OptimizationError(
            f"FLUX_ATTENTION_BACKEND={settings.attention_backend}: the installed diffusers has no attention "
            "backends (needs diffusers >= 0.35); unset FLUX_ATTENTION_BACKEND."
        )
    return cache


CPU_ATTENTION_BACKENDS = frozenset({"native", "_native_math", "flex"})
"""diffusers attention backends that run off CUDA too (the rest are CUDA kernels, or NPU/XLA's)."""
_NON_CUDA_ACCELERATORS = {"_native_npu": "an Ascend NPU", "_native_xla": "an XLA device (TPU)"}


def attention_backend_problem(name: str, plan: DevicePlan) -> str | None:
    """Why diffusers' attention backend ``name`` cannot run for ``plan`` (None: it can).

    Checked at start-up, before any model loads: an unknown name, a backend whose kernel diffusers would
    download from the Hugging Face Hub at run time (``*_hub``: this server runs no code from a hub), a
    package that is not installed (diffusers' own requirement check: flash-attn, sageattention, xformers),
    and a CUDA kernel on a device that is not CUDA.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    setting = f"FLUX_ATTENTION_BACKEND={name}"
    value = name.strip().lower()
    names = sorted(member.value for member in AttentionBackendName)
    if value not in names:
        usable = ", ".join(available_attention_backends(plan)) or "none"
        return f"{setting}: no such diffusers attention backend; usable here: {usable}"
    if value.endswith("_hub"):
        return (f"{setting}: this backend downloads its kernel from the Hugging Face Hub when first used, which "
                "this server never does; install the kernel's package (flash-attn, sageattention) and use its "
                "plain name (flash, _flash_3, sage), or unset FLUX_ATTENTION_BACKEND")
    try:
        _check_attention_backend_requirements(AttentionBackendName(value))
    except RuntimeError as exc:
        return f"{setting}: {exc} Or unset FLUX_ATTENTION_BACKEND (the default runs everywhere)."
    if value in _NON_CUDA_ACCELERATORS:
        return f"{setting} needs {_NON_CUDA_ACCELERATORS[value]}; this model runs on {plan.device}"
    if value not in CPU_ATTENTION_BACKENDS and plan.backend != "cuda":
        return (f"{setting} is a CUDA kernel; this model runs on {plan.device}. Use native (the default), "
                "_native_math or flex, or unset FLUX_ATTENTION_BACKEND")
    return None


def available_attention_backends(plan: DevicePlan) -> list[str]:
    """The diffusers attention backends that pass :func:`attention_backend_problem` for ``plan``."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [member.value for member in AttentionBackendName
            if not member.value.endswith("_hub") and attention_backend_problem(member.value, plan) is None]


def check_attention_backend(settings: Settings, plan: DevicePlan) -> None:
    """Refuse a ``FLUX_ATTENTION_BACKEND`` that cannot run here (:class:`OptimizationError` naming it)."""
    if settings.attention_backend:
        problem = attention_backend_problem(settings.attention_backend, plan)
        if problem:
            raise OptimizationError(problem)


def _set_attention_backend(transformer: Any, name: str) -> None:
    try:
        transformer.set_attention_backend(name)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise OptimizationError(f"FLUX_ATTENTION_BACKEND={name}: {exc}") from exc


def _fuse_qkv(pipe: Any, transformer: Any) -> bool:
    if hasattr(transformer, "fuse_qkv_projections"):
        transformer.fuse_qkv_projections()
    elif hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections(text_encoder=False, vae=False)
    else:
        return False
    dropped = drop_unfused_projections(transformer)
    log.info("fuse_qkv: dropped %d unfused projection weights (%.2f GB)", dropped[0], dropped[1] / 1e9)
    return True


_UNFUSED_BY_FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
"""diffusers' fused projection → the separate projections it replaces (``AttentionModuleMixin.fuse_projections``)."""


def drop_unfused_projections(transformer: Any) -> tuple[int, int]:
    """Delete the separate Q/K/V projections that a fused one replaced; returns (tensors, bytes) freed.

    diffusers' ``fuse_projections`` concatenates ``to_q``/``to_k``/``to_v`` into a new ``to_qkv`` (and
    the ``add_*_proj`` into ``to_added_qkv``) but keeps the originals, which the fused forward never reads:
    about 3 GB of dead weights on FLUX.1 in bf16. Only modules whose ``fused_projections`` flag is set and
    whose fused layer exists lose their originals, so the forward is unchanged. ``unfuse_qkv_projections``
    cannot bring them back afterwards (fusing is one-way here; reload the model to unfuse).
    """
    tensors = size = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for fused, separate in _UNFUSED_BY_FUSED.items():
            if not isinstance(getattr(module, fused, None), torch.nn.Module):
                continue
            for name in separate:
                layer = module._modules.get(name)  # only registered submodules
                if layer is None:
                    continue
                for tensor in list(layer.parameters()) + list(layer.buffers()):
                    tensors += 1
                    size += tensor.numel() * tensor.element_size()
                delattr(module, name)
    if size and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tensors, size


def _unused_projection(name: str, fused_parents: set[str]) -> bool:
    parent, _, leaf = name.rpartition(".")
    return parent in fused_parents and leaf in {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}


FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""


def _rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of a 2-D tensor to float8_e4m3fn with one float32 scale per row."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Float8RowwiseLinear(torch.nn.Module):
    """``nn.Linear`` with float8 weights and dynamically quantized float8 activations, row-wise scales.

    The numerics of torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: e4m3
    weights and activations, one float32 scale per weight row and per activation row, bf16 output from
    ``torch._scaled_mm`` with fast accumulation (torchao's inference default). It is written as a plain
    module with buffers instead of a tensor subclass because that matters for regional compilation: all
    blocks of a class share one compiled graph (torchao's subclass recompiled per block here: ~290 s of
    compile on an H100 against ~16 s).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            weight_fp8, weight_scale = _rowwise_fp8(linear.weight.detach())
        self.weight_fp8: torch.Tensor
        self.weight_scale: torch.Tensor
        self.register_buffer("weight_fp8", weight_fp8)  # [out, in], row-major: its .t() is column-major
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())  # [1, out]
        self.bias: torch.nn.Parameter | None = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        xq, x_scale = _rowwise_fp8(x2d)
        bias = self.bias.to(self.out_dtype) if self.bias is not None else None
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=bias, out_dtype=self.out_dtype, use_fast_accum=True)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=rowwise"


def _quantize_fp8(transformer: Any, keep: tuple[str, ...] = ()) -> int:
    """Swap the transformer's linear layers for :class:`Float8RowwiseLinear` (except those under the
    ``keep`` prefixes); returns how many."""
    fused_parents = {name for name, module in transformer.named_modules()
                     if getattr(module, "fused_projections", False)}
    targets: list[str] = []  # names only: a list of the modules would keep every bf16 weight alive to the end
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        # _scaled_mm needs both dimensions to be multiples of 16; tiny layers gain nothing anyway.
        if module.in_features % 16 or module.out_features % 16 or module.in_features < 256:
            continue
        if _unused_projection(name, fused_parents):
            continue  # replaced by the fused to_qkv / to_added_qkv
        if name.startswith(keep):
            continue
        targets.append(name)
    # One layer at a time, so the memory peak is the model plus one layer. Converting all of them before
    # releasing any held the bf16 and the fp8 weights together: FLUX.2 dev's text encoder, bf16 transformer
    # and fp8 copy (48 + 64 + 32 GB) are more than an H200's 139 GB (its fast server never got ready), and
    # Qwen-Image-2512's fast server kept 14 GB more than its lossless one.
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, leaf, Float8RowwiseLinear(getattr(parent, leaf)))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(targets)


def _enable_fbcache(transformer: Any, threshold: float) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def _configure_compile_cache(settings: Settings) -> Path:
    """Keep Inductor's caches under FLUX_CACHE_DIR so a second start reuses the compiled kernels."""
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache_dir = Path(settings.cache_dir) / "inductor"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the environment on first use; anything else is an operator's choice.
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    else:
        cache_dir = Path(current)
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), RECOMPILE_LIMIT))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return cache_dir


def _compile_transformer(transformer: Any, mode: str, fullgraph: bool) -> str:
    """Compile the transformer; returns the variant used (regional falls back to full without blocks)."""
    # dynamic=False: each (batch, size) gets its own static graph — the fastest kernels, compiled once
    # per shape (warm-up sizes at start, cached on disk across restarts).
    options: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": False}
    if mode == "regional" and getattr(transformer, "_repeated_blocks", None) and hasattr(
        transformer, "compile_repeated_blocks"
    ):
        transformer.compile_repeated_blocks(**options)
        return "regional"
    transformer.compile(**options)
    return "full"


def _compile_vae_decoder(vae: Any) -> bool:
    decoder = getattr(vae, "decoder", None)
    if decoder is None or not isinstance(decoder, torch.nn.Module):
        return False
    decoder.compile(fullgraph=False, dynamic=False)
    return True


def apply_optimizations(pipe: Any, settings: Settings, plan: DevicePlan,
                        family: FamilyDescriptor | None = None) -> list[str]:
    """Apply the optimizations the settings ask for; return their names (shown to users).

    ``family`` (the model's :class:`~fluxserve.models.descriptor.FamilyDescriptor`) says which optimizations its
    transformer can take: fused QKV is skipped where its attention has no fused path (diffusers' generic
    ``fuse_qkv_projections`` would silently fuse nothing there), fp8 where its linears must stay as they are.

    With default settings nothing happens and ``[]`` comes back. Raises :class:`OptimizationError`
    (a ``ValueError`` naming the ``FLUX_`` variable) for combinations this device or install cannot run.
    """
    transformer = getattr(pipe, "transformer", None)
    cache = validate_optimizations(settings, plan, transformer)
    applied: list[str] = []
    wants_transformer = (settings.attention_backend or settings.fuse_qkv or settings.quantize != "none"
                         or cache.enabled or settings.compile != "off")
    if transformer is None:
        if wants_transformer:
            log.warning("pipeline %s has no transformer; transformer optimizations skipped",
                        type(pipe).__name__)
        transformer_ops = False
    else:
        transformer_ops = True

    if transformer_ops and settings.attention_backend:
        _set_attention_backend(transformer, settings.attention_backend)
        applied.append(f"attention_{settings.attention_backend}")

    if transformer_ops and settings.fuse_qkv:
        if family is not None and not family.optimizations.fused_qkv:
            log.warning("FLUX_FUSE_QKV: %s models cannot fuse QKV projections (%s); skipped", family.name,
                        family.optimizations.notes or "no fused attention path")
        elif _fuse_qkv(pipe, transformer):
            applied.append("fuse_qkv")
        else:
            log.warning("FLUX_FUSE_QKV: %s cannot fuse QKV projections; skipped", type(transformer).__name__)

    if transformer_ops and settings.quantize == "fp8" and family is not None and not family.optimizations.fp8_linears:
        log.warning("FLUX_QUANTIZE=fp8: %s models keep their linear layers (%s); skipped", family.name,
                    family.optimizations.notes)
    elif transformer_ops and settings.quantize == "fp8":
        count = _quantize_fp8(transformer, family.optimizations.fp8_keep if family is not None else ())
        applied.append("fp8_rowwise")
        log.info("fp8: quantized %d linear layers of the transformer (row-wise scales, torchao's numerics)", count)

    if transformer_ops and cache.enabled:
        _enable_fbcache(transformer, cache.threshold)
        applied.append(f"fbcache_{cache.threshold:g}")

    vae = getattr(pipe, "vae", None)
    if settings.channels_last and vae is not None:
        vae.to(memory_format=torch.channels_last)
        applied.append("vae_channels_last")

    from fluxserve.engine.parallel import KINDS, active_plan, enable_context_parallel

    split = active_plan()
    if transformer_ops and split is not None and split.kind in KINDS:  # before compile: it hooks attention
        applied.append(enable_context_parallel(transformer))

    if settings.compile != "off":
        cache_dir = _configure_compile_cache(settings)
        if transformer_ops:
            # The cache's decision (a .item() in the first block) is a graph break: no fullgraph then.
            variant = _compile_transformer(transformer, settings.compile, fullgraph=not cache.enabled)
            applied.append(f"compile_{variant}")
        # The VAE decoder pays on CUDA (fused group norms/activations); on CPU/MPS compiling it only
        # costs start-up time.
        if plan.backend == "cuda" and vae is not None and _compile_vae_decoder(vae):
            applied.append("compile_vae_decoder")
        log.info("torch.compile (%s) set up; kernels compile on the first call of each shape (cache: %s)",
                 settings.compile, cache_dir)
    if applied:
        log.info("optimizations: %s", ", ".join(applied))
    return applied
