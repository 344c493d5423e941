"""Memory: OOM detection per backend, cache release, per-device memory readings and memory modes.

Memory modes (``FLUX_OFFLOAD``, ``FLUX_ATTENTION_SLICING``, ``FLUX_VAE_SLICING``, ``FLUX_VAE_TILING``,
``FLUX_VAE_TILE_SIZE``) are checked against the device once at start-up (:func:`check_memory_modes`)
and applied at load only where the pipeline supports them; the engine's OOM ladder turns the same modes
on temporarily. docs/memory.md describes all of it, with measured costs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
from typing import Any

import psutil
import torch

from fluxserve.engine.device import DeviceSelectionError
from fluxserve.models.devices import DevicePlan, in_use_of

log = logging.getLogger(__name__)

_CPU_OOM_MARKERS = (
    "defaultcpuallocator",  # "[enforce fail at alloc_cpu.cpp:..] DefaultCPUAllocator: can't allocate memory"
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",  # DefaultCPUAllocator's wording on some platforms
)
_OOM_MARKERS = (
    "out of memory",  # CUDA ("CUDA out of memory", "CUDA error: out of memory"), MPS ("MPS backend out of memory")
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its workspace: CUDA memory is exhausted
    *_CPU_OOM_MARKERS,
)


class MemoryModeError(DeviceSelectionError):
    """A memory mode cannot work on this device or with another setting; the message names the variable."""


def is_oom(exc: BaseException) -> bool:
    """True for the out-of-memory errors of CUDA, MPS and the CPU allocator; nothing else."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def oom_kind(exc: BaseException, backend: str) -> str:
    """A short label for metrics and fallback reasons: cuda_oom, mps_oom or cpu_oom.

    Read from the error itself where it says which memory ran out (host RAM can run out on a CUDA
    machine too); otherwise the device's backend.
    """
    text = str(exc).lower()
    if "mps backend out of memory" in text:
        return "mps_oom"
    if isinstance(exc, MemoryError) or any(marker in text for marker in _CPU_OOM_MARKERS):
        return "cpu_oom"
    if "cuda" in text or "cublas" in text:
        return "cuda_oom"
    return f"{backend}_oom"


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc only), so RSS shows what release freed."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)


def empty_cache(backend: str, *, full_gc: bool = True) -> None:
    """Run the garbage collector and return cached memory: the accelerator's cache to the driver,
    freed host heap to the OS.

    ``full_gc=False`` collects only the young generations (milliseconds instead of a few hundred with a
    model's objects alive): enough for garbage made since the last full collection.
    """
    gc.collect() if full_gc else gc.collect(1)
    if backend == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif backend == "mps" and hasattr(torch, "mps"):
        with contextlib.suppress(RuntimeError):  # no MPS device at all
            torch.mps.empty_cache()
    _malloc_trim()


def memory_snapshot(device: str) -> dict[str, Any]:
    """Memory in use for ``device``: allocated/reserved on CUDA, current/driver on MPS, RSS on CPU."""
    backend = device.split(":", 1)[0]
    rss = psutil.Process(os.getpid()).memory_info().rss
    if backend == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        return {
            "device": device,
            "allocated_bytes": torch.cuda.memory_allocated(index),
            "reserved_bytes": torch.cuda.memory_reserved(index),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(index),
            "free_bytes": free,
            "total_bytes": total,
            "process_rss_bytes": rss,
        }
    if backend == "mps":
        try:
            return {
                "device": device,
                "current_allocated_bytes": torch.mps.current_allocated_memory(),
                "driver_allocated_bytes": torch.mps.driver_allocated_memory(),
                "process_rss_bytes": rss,
            }
        except (RuntimeError, AttributeError):
            pass
    vm = psutil.virtual_memory()
    return {"device": device, "process_rss_bytes": rss, "available_bytes": vm.available, "total_bytes": vm.total}


def in_use_bytes(device: str) -> int:
    return in_use_of(memory_snapshot(device))


def attention_slicing_supported(pipe: Any) -> bool:
    """Whether any component of ``pipe`` can slice attention.

    ``DiffusionPipeline.enable_attention_slicing`` exists on every pipeline but only reaches modules
    with ``set_attention_slice`` (UNets); FLUX's and Qwen-Image's transformers have none, so there it
    would be a silent no-op.
    """
    if not hasattr(pipe, "enable_attention_slicing"):
        return False
    components = getattr(pipe, "components", None) or {}
    return any(isinstance(m, torch.nn.Module) and hasattr(m, "set_attention_slice") for m in components.values())


def apply_attention_slicing(pipe: Any, value: str) -> bool:
    """Apply FLUX_ATTENTION_SLICING where the pipeline supports it; return whether it applied."""
    if value == "off":
        return False
    if not attention_slicing_supported(pipe):
        log.info("attention slicing not applied: no component of %s supports it (FLUX/Qwen transformers use "
                 "fused SDPA attention without slicing)", type(pipe).__name__)
        return False
    try:
        pipe.enable_attention_slicing(int(value) if value.isdigit() else value)
    except (AttributeError, NotImplementedError, ValueError) as exc:
        log.info("attention slicing not supported by %s: %s", type(pipe).__name__, exc)
        return False
    return True


def _set_tile_size(vae: Any, tile_size: int) -> bool:
    """Set the VAE's tile size in pixels (AutoencoderKL and Qwen-Image's VAE name it differently)."""
    if hasattr(vae, "tile_sample_min_size"):  # AutoencoderKL (FLUX)
        vae.tile_sample_min_size = tile_size
        vae.tile_latent_min_size = tile_size // (2 ** (len(vae.config.block_out_channels) - 1))
        return True
    if hasattr(vae, "tile_sample_min_height"):  # AutoencoderKLQwenImage: tiles overlap by a quarter
        stride = max(8, tile_size * 3 // 4 // 8 * 8)
        vae.tile_sample_min_height = vae.tile_sample_min_width = tile_size
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = stride
        return True
    return False


def apply_vae_modes(pipe: Any, *, slicing: bool, tiling: bool, tile_size: int | None) -> list[str]:
    """Turn on VAE slicing/tiling where the VAE supports it; return the modes this call turned on
    (a mode already on is not listed again)."""
    vae = getattr(pipe, "vae", None)
    applied: list[str] = []
    if vae is None:
        return applied
    if slicing and hasattr(vae, "enable_slicing") and not getattr(vae, "use_slicing", False):
        vae.enable_slicing()
        applied.append("vae_slicing")
    if tiling and hasattr(vae, "enable_tiling") and not getattr(vae, "use_tiling", False):
        vae.enable_tiling()
        if tile_size and not _set_tile_size(vae, tile_size):
            log.info("FLUX_VAE_TILE_SIZE ignored: %s has no tile size to set", type(vae).__name__)
        applied.append("vae_tiling")
    return applied


def check_memory_modes(settings: Any, plan: DevicePlan) -> list[str]:
    """Refuse, at start-up, memory modes that cannot work on ``plan``'s device or with other settings.

    Raises :class:`MemoryModeError` naming the variable; returns warnings for modes that work but do
    nothing useful here (logged by the caller). Combinations with FLUX_COMPILE and FLUX_QUANTIZE are
    refused by the settings themselves.
    """
    warnings: list[str] = []
    offload = settings.offload
    if offload != "none" and plan.backend == "cpu":
        if offload == "sequential":
            raise MemoryModeError(
                f"FLUX_OFFLOAD=sequential cannot run on the CPU ({plan.device}): diffusers' "
                "enable_sequential_cpu_offload fails at the first generation there, and offloading to the CPU "
                "from the CPU saves nothing; use FLUX_OFFLOAD=none on the CPU (offload is for CUDA and MPS)")
        warnings.append(f"FLUX_OFFLOAD=model on the CPU ({plan.device}) saves no memory: the weights already live "
                        "in host memory (it only adds hooks); use FLUX_OFFLOAD=none on the CPU")
    if offload != "none" and settings.max_concurrent > 1:
        raise MemoryModeError(
            f"FLUX_OFFLOAD={offload} cannot be combined with FLUX_MAX_CONCURRENT={settings.max_concurrent}: "
            "concurrent generations would move the same shared modules between CPU and device under each other; "
            "use FLUX_MAX_CONCURRENT=1 with offload")
    if settings.attention_slicing != "off" and settings.attention_backend:
        raise MemoryModeError(
            f"FLUX_ATTENTION_SLICING={settings.attention_slicing} cannot be combined with "
            f"FLUX_ATTENTION_BACKEND={settings.attention_backend}: slicing replaces the attention processors "
            "the backend selects; set one of them")
    if settings.quantize == "fp8" and settings.compile == "off":
        warnings.append("FLUX_QUANTIZE=fp8 without FLUX_COMPILE is slower than bf16 (one transformer forward at "
                        "1024x1024 on an H100: 0.315 s fp8 eager vs 0.174 s bf16 eager); it only saves memory. "
                        "Set FLUX_COMPILE=regional for fp8's speed-up (0.103 s)")
    if settings.vae_tile_size is not None and settings.vae_tile_size % 8:
        raise MemoryModeError(
            f"FLUX_VAE_TILE_SIZE={settings.vae_tile_size} must be a multiple of 8 (the VAE's downsampling factor)")
    return warnings


def apply_offload(pipe: Any, mode: str, device: str) -> None:
    """model → enable_model_cpu_offload, sequential → enable_sequential_cpu_offload, none → .to(device)."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
