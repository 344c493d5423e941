"""Device and dtype resolution (``select_device_dtype``).

One function decides where and in which precision a model runs, from the settings and from what the machine
has: a :class:`~fluxserve.models.devices.DevicePlan`, plain data the other layers read without torch. Every
decision carries its reason so start-up can log one line that explains itself. The decision itself is torch-free
(:func:`~fluxserve.models.devices.resolve_plan`); this module asks torch what the machine has
(:func:`probe_backends`). Tests build probes by hand to cover CUDA, MPS and CPU on any machine (MPS paths are
tested by simulation only, never on Apple hardware here).
"""

from __future__ import annotations

import logging

import torch

from fluxserve.models.devices import BackendProbe, DevicePlan, DeviceSelectionError, DtypeName, resolve_plan

__all__ = [
    "DTYPES",
    "BackendProbe",
    "DevicePlan",
    "DeviceSelectionError",
    "probe_backends",
    "select_device_dtype",
    "torch_device",
    "torch_dtype",
    "validate_generator_device",
]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _mps_bf16_works() -> bool:
    try:
        x = torch.ones(4, 4, dtype=torch.bfloat16, device="mps")
        return bool(torch.isfinite((x @ x).float().cpu()).all())
    except (RuntimeError, TypeError):  # older torch/macOS: bf16 not implemented on MPS
        return False


def probe_backends() -> BackendProbe:
    """Ask torch what this machine has."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = []
    names = []
    for index in range(count):
        major, _minor = torch.cuda.get_device_capability(index)
        bf16.append(major >= 8)
        names.append(torch.cuda.get_device_name(index))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return BackendProbe(
        cuda_device_count=count,
        cuda_bf16=tuple(bf16),
        cuda_names=tuple(names),
        mps_available=mps,
        mps_bf16=_mps_bf16_works() if mps else False,
    )


def torch_dtype(name: DtypeName) -> torch.dtype:
    """The torch dtype of a plan's dtype name (``plan.dtype``, ``plan.vae_dtype``)."""
    return DTYPES[name]


def torch_device(plan: DevicePlan) -> torch.device:
    return torch.device(plan.device)


def select_device_dtype(
    device: str = "auto",
    dtype: str = "auto",
    generator_device: str = "auto",
    probe: BackendProbe | None = None,
) -> DevicePlan:
    """:func:`~fluxserve.models.devices.resolve_plan` on this machine (``probe``: a machine described by hand).

    Raises :class:`DeviceSelectionError` (naming ``FLUX_DEVICE`` or ``FLUX_DTYPE``) when the request
    cannot be met on this machine.
    """
    return resolve_plan(device, dtype, generator_device, probe if probe is not None else probe_backends())


def validate_generator_device(plan: DevicePlan, pipeline_device: torch.device) -> None:
    """Refuse a generator that the pipeline's device would reject mid-request."""
    if plan.generator_device == "cpu":
        return
    gen = torch.device(plan.generator_device)
    if gen.type != pipeline_device.type:
        raise DeviceSelectionError(
            f"FLUX_GENERATOR_DEVICE: generator device {gen} does not match the pipeline's device "
            f"{pipeline_device}; use FLUX_GENERATOR_DEVICE=cpu or auto"
        )
