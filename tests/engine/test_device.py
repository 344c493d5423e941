"""Every branch of select_device_dtype, with CUDA and MPS simulated (MPS never runs on Apple hardware here)."""

from __future__ import annotations

import pytest
import torch

from fluxserve.engine.device import (
    BackendProbe,
    DeviceSelectionError,
    probe_backends,
    select_device_dtype,
    validate_generator_device,
)

CPU = BackendProbe()
ONE_H100 = BackendProbe(cuda_device_count=1, cuda_bf16=(True,), cuda_names=("H100",))
OLD_GPU = BackendProbe(cuda_device_count=1, cuda_bf16=(False,), cuda_names=("T4",))
MAC_BF16 = BackendProbe(mps_available=True, mps_bf16=True)
MAC_OLD = BackendProbe(mps_available=True, mps_bf16=False)


def test_auto_prefers_cuda_then_mps_then_cpu() -> None:
    assert select_device_dtype(probe=ONE_H100).device == "cuda:0"
    assert select_device_dtype(probe=MAC_BF16).device == "mps"
    assert select_device_dtype(probe=CPU).device == "cpu"
    both = BackendProbe(cuda_device_count=1, cuda_bf16=(True,), mps_available=True)
    assert select_device_dtype(probe=both).device == "cuda:0"


def test_cuda_dtypes() -> None:
    plan = select_device_dtype(probe=ONE_H100)
    assert (plan.dtype, plan.vae_dtype) == ("bfloat16", "bfloat16")
    assert select_device_dtype(probe=OLD_GPU).dtype == "float16"
    assert select_device_dtype(dtype="bfloat16", probe=OLD_GPU).dtype == "float16"
    assert select_device_dtype(dtype="float32", probe=ONE_H100).dtype == "float32"
    assert any("bf16" in r or "bfloat16" in r for r in select_device_dtype(probe=OLD_GPU).reasons)


def test_mps_bfloat16_is_checked_not_assumed_and_vae_stays_float32() -> None:
    plan = select_device_dtype(dtype="bfloat16", probe=MAC_OLD)
    assert plan.dtype == "float16"
    assert plan.vae_dtype == "float32"
    assert any("black images" in r for r in plan.reasons)
    plan = select_device_dtype(dtype="auto", probe=MAC_BF16)
    assert (plan.dtype, plan.vae_dtype) == ("bfloat16", "float32")
    plan = select_device_dtype(dtype="float32", probe=MAC_OLD)
    assert (plan.dtype, plan.vae_dtype) == ("float32", "float32")


def test_cpu_dtypes() -> None:
    assert select_device_dtype(probe=CPU).dtype == "float32"
    assert select_device_dtype(dtype="bfloat16", probe=CPU).dtype == "bfloat16"
    with pytest.raises(DeviceSelectionError, match="FLUX_DTYPE=float16"):
        select_device_dtype(device="cpu", dtype="float16", probe=CPU)


def test_missing_devices_are_refused_clearly() -> None:
    with pytest.raises(DeviceSelectionError, match="FLUX_DEVICE=cuda: CUDA is not available"):
        select_device_dtype(device="cuda", probe=CPU)
    with pytest.raises(DeviceSelectionError, match=r"has 1 CUDA device\(s\)"):
        select_device_dtype(device="cuda:3", probe=ONE_H100)
    with pytest.raises(DeviceSelectionError, match="MPS is not available"):
        select_device_dtype(device="mps", probe=ONE_H100)
    assert select_device_dtype(device="cuda:0", probe=ONE_H100).device == "cuda:0"


def test_generator_device() -> None:
    assert select_device_dtype(probe=ONE_H100).generator_device == "cpu"
    plan = select_device_dtype(generator_device="device", probe=MAC_BF16)
    assert plan.generator_device == "mps"
    validate_generator_device(plan, torch.device("mps"))
    with pytest.raises(DeviceSelectionError, match="FLUX_GENERATOR_DEVICE"):
        validate_generator_device(plan, torch.device("cpu"))


def test_every_decision_has_a_reason() -> None:
    plan = select_device_dtype(probe=MAC_OLD)
    assert len(plan.reasons) >= 3
    assert "device=mps" in plan.describe()


def test_probe_on_this_machine_runs() -> None:
    probe = probe_backends()
    assert probe.cuda_device_count == len(probe.cuda_bf16)
