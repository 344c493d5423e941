"""Memory: OOM detection per backend, cache release, per-device memory readings and memory modes."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)

_OOM_MARKERS = (
    "out of memory",  # CUDA ("CUDA out of memory"), MPS ("MPS backend out of memory")
    "can't allocate memory",  # CPU DefaultCPUAllocator
    "cannot allocate memory",
)


def is_oom(exc: BaseException) -> bool:
    """True for the out-of-memory errors of CUDA, MPS and the CPU allocator; nothing else."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def oom_kind(exc: BaseException, backend: str) -> str:
    """A short label for metrics and fallback reasons: cuda_oom, mps_oom or cpu_oom."""
    return f"{backend}_oom"


def empty_cache(backend: str) -> None:
    """Run the garbage collector and return cached accelerator memory to the driver."""
    gc.collect()
    if backend == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif backend == "mps" and hasattr(torch, "mps"):
        with contextlib.suppress(RuntimeError):  # no MPS device at all
            torch.mps.empty_cache()


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
    snap = memory_snapshot(device)
    for key in ("allocated_bytes", "current_allocated_bytes", "process_rss_bytes"):
        if key in snap:
            return int(snap[key])
    return 0


def apply_attention_slicing(pipe: Any, value: str) -> bool:
    """Apply FLUX_ATTENTION_SLICING where the pipeline supports it; return whether it applied."""
    if value == "off" or not hasattr(pipe, "enable_attention_slicing"):
        return False
    try:
        pipe.enable_attention_slicing(int(value) if value.isdigit() else value)
    except (AttributeError, NotImplementedError, ValueError) as exc:
        # Transformer-based pipelines (FLUX, Qwen) use fused SDPA processors without slicing support.
        log.info("attention slicing not supported by %s: %s", type(pipe).__name__, exc)
        return False
    return True


def apply_vae_modes(pipe: Any, *, slicing: bool, tiling: bool, tile_size: int | None) -> list[str]:
    """Turn on VAE slicing/tiling where the VAE supports it; return the modes applied."""
    vae = getattr(pipe, "vae", None)
    applied: list[str] = []
    if vae is None:
        return applied
    if slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        applied.append("vae_slicing")
    if tiling and hasattr(vae, "enable_tiling"):
        if tile_size and hasattr(vae, "tile_sample_min_size"):
            vae.enable_tiling()
            vae.tile_sample_min_size = tile_size
            vae.tile_latent_min_size = tile_size // (2 ** (len(vae.config.block_out_channels) - 1))
        else:
            vae.enable_tiling()
        applied.append("vae_tiling")
    return applied


def apply_offload(pipe: Any, mode: str, device: str) -> None:
    """model → enable_model_cpu_offload, sequential → enable_sequential_cpu_offload, none → .to(device)."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
