"""Where and in which precision a model runs: the device plan, as every layer reads it.

The plan is plain data (device and dtype names, and the reason for each choice), so the HTTP layer, the Ray
ingress and the replicas' messages carry it without torch. :func:`resolve_plan` decides it from the settings and a
description of the machine (:class:`BackendProbe`); ``fluxserve.engine.device`` asks torch what the machine has
(``select_device_dtype``) and turns the names into torch objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DtypeName = Literal["bfloat16", "float16", "float32"]


class DeviceSelectionError(ValueError):
    """The requested device or dtype cannot be used on this machine; the message names the setting."""


@dataclass(frozen=True)
class BackendProbe:
    """What the machine offers. Built from torch by ``fluxserve.engine.device.probe_backends``, or by hand (tests;
    the Ray ingress, which uses no accelerator, describes a machine without one)."""

    cuda_device_count: int = 0
    cuda_bf16: tuple[bool, ...] = ()
    """bf16 support per CUDA device index."""
    cuda_names: tuple[str, ...] = ()
    mps_available: bool = False
    mps_bf16: bool = False
    """Whether bf16 tensors really work on this MPS device (checked by running one op)."""


@dataclass(frozen=True)
class DevicePlan:
    """Where and how a model runs. ``reasons`` explains each choice for the start-up log."""

    device: str
    dtype: DtypeName
    vae_dtype: DtypeName
    generator_device: str
    reasons: tuple[str, ...] = field(default=())

    @property
    def backend(self) -> str:
        """cuda, mps or cpu."""
        return self.device.split(":", 1)[0]

    def describe(self) -> str:
        return (
            f"device={self.device} dtype={self.dtype} vae_dtype={self.vae_dtype} "
            f"generator={self.generator_device} ({'; '.join(self.reasons)})"
        )


def _resolve_device(requested: str, probe: BackendProbe, reasons: list[str]) -> str:
    if requested == "auto":
        if probe.cuda_device_count:
            reasons.append("auto: CUDA available")
            return "cuda:0"
        if probe.mps_available:
            reasons.append("auto: no CUDA, MPS available")
            return "mps"
        reasons.append("auto: no CUDA or MPS, using CPU")
        return "cpu"
    kind, _, index_text = requested.partition(":")
    if kind == "cuda":
        if not probe.cuda_device_count:
            raise DeviceSelectionError(
                f"FLUX_DEVICE={requested}: CUDA is not available on this machine (no CUDA GPU or a CPU-only "
                "torch build); use FLUX_DEVICE=auto or cpu"
            )
        index = int(index_text) if index_text else 0
        if index >= probe.cuda_device_count:
            raise DeviceSelectionError(
                f"FLUX_DEVICE={requested}: this machine has {probe.cuda_device_count} CUDA device(s) "
                f"(cuda:0..cuda:{probe.cuda_device_count - 1})"
            )
        reasons.append(f"{requested} requested")
        return f"cuda:{index}"
    if kind == "mps":
        if not probe.mps_available:
            raise DeviceSelectionError(
                f"FLUX_DEVICE={requested}: MPS is not available (needs Apple silicon and a torch build with MPS)"
            )
        reasons.append("mps requested")
        return "mps"
    reasons.append("cpu requested")
    return "cpu"


def _resolve_dtype(requested: str, device: str, probe: BackendProbe, reasons: list[str]) -> DtypeName:
    backend = device.split(":", 1)[0]
    if backend == "cuda":
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        bf16_ok = probe.cuda_bf16[index] if index < len(probe.cuda_bf16) else False
        if requested in ("auto", "bfloat16"):
            if bf16_ok:
                reasons.append("bfloat16: GPU supports it" if requested == "auto" else "bfloat16 requested")
                return "bfloat16"
            reasons.append(f"{'auto' if requested == 'auto' else 'bfloat16 requested'}: GPU lacks bf16, using float16")
            return "float16"
        reasons.append(f"{requested} requested")
        return requested  # type: ignore[return-value]
    if backend == "mps":
        if requested in ("auto", "bfloat16"):
            if probe.mps_bf16:
                reasons.append("bfloat16: verified working on this MPS device")
                return "bfloat16"
            reasons.append("bfloat16 does not work on this MPS device/macOS, using float16")
            return "float16"
        reasons.append(f"{requested} requested")
        return requested  # type: ignore[return-value]
    # CPU
    if requested == "float16":
        raise DeviceSelectionError(
            "FLUX_DTYPE=float16 is not supported on the CPU (half-precision kernels are missing or very slow); "
            "use FLUX_DTYPE=float32 (default) or bfloat16"
        )
    if requested == "bfloat16":
        reasons.append("bfloat16 requested on CPU")
        return "bfloat16"
    reasons.append("float32 on CPU" + (" (auto)" if requested == "auto" else ""))
    return "float32"


def resolve_plan(device: str, dtype: str, generator_device: str, probe: BackendProbe) -> DevicePlan:
    """Resolve the device, compute dtype, VAE dtype and generator device on the machine ``probe`` describes, each
    with a reason.

    Raises :class:`DeviceSelectionError` (naming ``FLUX_DEVICE`` or ``FLUX_DTYPE``) when the request
    cannot be met on this machine.
    """
    reasons: list[str] = []
    resolved_device = _resolve_device(device, probe, reasons)
    resolved_dtype = _resolve_dtype(dtype, resolved_device, probe, reasons)

    vae_dtype: DtypeName = resolved_dtype
    if resolved_device == "mps" and resolved_dtype != "float32":
        vae_dtype = "float32"
        reasons.append("VAE kept in float32 on MPS (half-precision VAE gives black images there)")

    if generator_device in ("auto", "cpu"):
        gen = "cpu"
        reasons.append("generator on cpu" + (" (auto: same seed, same image on any device)"
                                             if generator_device == "auto" else ""))
    else:
        gen = resolved_device
        reasons.append(f"generator on {gen}")
    return DevicePlan(resolved_device, resolved_dtype, vae_dtype, gen, tuple(reasons))


IN_USE_KEYS = ("allocated_bytes", "current_allocated_bytes", "process_rss_bytes")
"""The reading of a memory snapshot that counts as "in use": CUDA's allocated bytes, MPS's, else the RSS."""


def in_use_of(snapshot: Mapping[str, Any]) -> int:
    """Bytes in use according to one device's memory snapshot (``Engine.memory()``)."""
    return next((int(snapshot[key]) for key in IN_USE_KEYS if key in snapshot), 0)
