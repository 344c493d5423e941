"""Memory helpers and memory modes: OOM detection per backend, readings per device, cache release, the
modes applied at load (and refused at start-up where they cannot work), fault-injection parsing.

CUDA and MPS readings are simulated by patching torch's query functions: nothing here ran on a GPU or
on Apple hardware. The real CPU allocator error is produced for real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fluxserve.engine import memory
from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.faults import FaultInjector, InjectedFault, oom_error, parse_faults
from fluxserve.engine.memory import (
    MemoryModeError,
    apply_attention_slicing,
    apply_vae_modes,
    attention_slicing_supported,
    check_memory_modes,
    in_use_bytes,
    is_oom,
    memory_snapshot,
    oom_kind,
)
from fluxserve.models.devices import DevicePlan
from fluxserve.settings import SettingsError

CPU = DevicePlan("cpu", "float32", "float32", "cpu")
CUDA = DevicePlan("cuda:0", "bfloat16", "bfloat16", "cpu")
MPS = DevicePlan("mps", "float16", "float32", "cpu")


def real_cpu_oom() -> RuntimeError:
    """The CPU allocator's own error: ask for a petabyte."""
    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated a petabyte")


# --- OOM detection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "backend", "kind"), [
    (oom_error("cuda"), "cuda", "cuda_oom"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), "cuda", "cuda_oom"),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), "cuda",
     "cuda_oom"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "cuda", "cuda_oom"),
    (oom_error("mps"), "mps", "mps_oom"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 9.05 GB, other allocations: 0 bytes, max allowed: "
                  "9.07 GB). Tried to allocate 32.00 MB on private pool."), "mps", "mps_oom"),
    (oom_error("cpu"), "cpu", "cpu_oom"),
    (MemoryError(), "cpu", "cpu_oom"),
    # Host RAM running out on a GPU machine is a CPU OOM, whatever the device.
    (oom_error("cpu"), "cuda", "cpu_oom"),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1024 bytes."), "mps", "cpu_oom"),
])
def test_oom_detected_and_classified_per_backend(error: BaseException, backend: str, kind: str) -> None:
    assert is_oom(error)
    assert oom_kind(error, backend) == kind


def test_real_cpu_allocator_failure_is_oom() -> None:
    error = real_cpu_oom()
    assert is_oom(error)
    assert oom_kind(error, "cpu") == "cpu_oom"


@pytest.mark.parametrize("error", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
    RuntimeError("Expected all tensors to be on the same device"),
    InjectedFault("injected failure at denoise"),
    ValueError("out of memory"),  # only runtime/allocator errors count, not any text
    KeyError("transformer"),
    OSError(12, "Cannot allocate memory"),  # e.g. fork failing: not a tensor allocation
    TimeoutError(),
])
def test_anything_else_is_not_oom(error: BaseException) -> None:
    assert not is_oom(error)


# --- readings per device ---------------------------------------------------------------------------
def test_cpu_snapshot_reports_rss() -> None:
    snap = memory_snapshot("cpu")
    assert snap["device"] == "cpu"
    assert snap["process_rss_bytes"] > 0 and snap["total_bytes"] > 0
    assert in_use_bytes("cpu") > 0


def test_cuda_snapshot_reports_allocated_and_reserved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: torch's CUDA queries patched (no GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (30, 80))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: 11)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 22)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: 33)
    snap = memory_snapshot("cuda:0")
    assert snap["allocated_bytes"] == 11 and snap["reserved_bytes"] == 22
    assert snap["free_bytes"] == 30 and snap["total_bytes"] == 80
    assert in_use_bytes("cuda:0") == 11


def test_mps_snapshot_reports_current_and_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: torch.mps's queries patched (not run on Apple hardware)."""
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 5)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 7)
    snap = memory_snapshot("mps")
    assert snap["current_allocated_bytes"] == 5 and snap["driver_allocated_bytes"] == 7
    assert in_use_bytes("mps") == 5


def test_mps_snapshot_without_mps_falls_back_to_rss() -> None:
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    snap = memory_snapshot("mps")
    assert "process_rss_bytes" in snap and "current_allocated_bytes" not in snap


@pytest.mark.parametrize("backend", ["cuda", "mps", "cpu"])
def test_empty_cache_empties_the_backend_cache(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append("trim"))
    memory.empty_cache(backend)
    assert calls == ([backend] if backend != "cpu" else []) + ["trim"]


# --- memory modes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipelines(cache_dir: Path) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    return {key: DiffusionPipeline.from_pretrained(cache_dir / "models" / key, torch_dtype=torch.float32)
            for key in ("tiny-flux", "tiny-qwen")}


def test_attention_slicing_is_not_claimed_where_it_would_be_a_no_op(pipelines: dict[str, Any]) -> None:
    """diffusers' enable_attention_slicing exists on FLUX/Qwen pipelines but reaches no module there."""
    for pipe in pipelines.values():
        assert not attention_slicing_supported(pipe)
        assert not apply_attention_slicing(pipe, "auto")
        assert not apply_attention_slicing(pipe, "off")


def test_attention_slicing_applies_where_a_module_supports_it() -> None:
    class Sliceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.slices: list[Any] = []

        def set_attention_slice(self, size: Any) -> None:
            self.slices.append(size)

    class Pipe:
        def __init__(self) -> None:
            self.unet = Sliceable()
            self.components = {"unet": self.unet, "scheduler": object()}

        def enable_attention_slicing(self, size: Any) -> None:
            self.unet.set_attention_slice(size)

    pipe = Pipe()
    assert apply_attention_slicing(pipe, "max") and apply_attention_slicing(pipe, "4")
    assert pipe.unet.slices == ["max", 4]


def test_vae_modes_and_tile_size_on_both_vae_kinds(pipelines: dict[str, Any]) -> None:
    flux, qwen = pipelines["tiny-flux"].vae, pipelines["tiny-qwen"].vae
    try:
        assert apply_vae_modes(pipelines["tiny-flux"], slicing=True, tiling=True, tile_size=64) == \
            ["vae_slicing", "vae_tiling"]
        assert flux.use_slicing and flux.use_tiling
        assert (flux.tile_sample_min_size, flux.tile_latent_min_size) == (64, 8)
        # Already on: nothing new is claimed (the OOM ladder relies on this to skip a useless rung).
        assert apply_vae_modes(pipelines["tiny-flux"], slicing=True, tiling=True, tile_size=64) == []
        assert apply_vae_modes(pipelines["tiny-qwen"], slicing=False, tiling=True, tile_size=128) == ["vae_tiling"]
        assert (qwen.tile_sample_min_height, qwen.tile_sample_min_width) == (128, 128)
        assert (qwen.tile_sample_stride_height, qwen.tile_sample_stride_width) == (96, 96)
    finally:
        for vae in (flux, qwen):
            vae.disable_tiling()
            vae.disable_slicing()


def test_offload_modes_on_cpu(make_settings: Callable[..., Any]) -> None:
    """model offload works on the CPU but saves nothing (a warning); sequential fails in diffusers at the first
    generation, so it is refused at start-up naming FLUX_OFFLOAD."""
    cpu = select_device_dtype("cpu")
    assert check_memory_modes(make_settings(), cpu) == []
    warnings = check_memory_modes(make_settings(offload="model"), cpu)
    assert len(warnings) == 1 and "FLUX_OFFLOAD=model" in warnings[0]
    with pytest.raises(MemoryModeError, match="FLUX_OFFLOAD=sequential"):
        check_memory_modes(make_settings(offload="sequential"), cpu)
    # On CUDA (simulated plan) both offload modes pass the check.
    for mode in ("model", "sequential"):
        assert check_memory_modes(make_settings(offload=mode), CUDA) == []


@pytest.mark.parametrize(("overrides", "plan", "names"), [
    ({"offload": "model", "max_concurrent": 2}, CUDA, ("FLUX_OFFLOAD", "FLUX_MAX_CONCURRENT")),
    ({"attention_slicing": "auto", "attention_backend": "flash"}, CPU,
     ("FLUX_ATTENTION_SLICING", "FLUX_ATTENTION_BACKEND")),
    ({"vae_tiling": True, "vae_tile_size": 100}, CPU, ("FLUX_VAE_TILE_SIZE",)),
])
def test_conflicting_memory_modes_are_refused(make_settings: Callable[..., Any], overrides: dict[str, Any],
                                              plan: DevicePlan, names: tuple[str, ...]) -> None:
    with pytest.raises(MemoryModeError) as info:
        check_memory_modes(make_settings(**overrides), plan)
    assert all(name in str(info.value) for name in names)


@pytest.mark.parametrize("overrides", [
    {"offload": "model", "compile": "regional"},
    {"offload": "sequential", "quantize": "fp8"},
    {"attention_slicing": "sometimes"},
    {"oom_policy": "clear_cache,pray"},
    {"faults": "oom@denoise:1"},  # without FLUX_FAULT_INJECTION=1
])
def test_settings_refuse_bad_memory_settings(make_settings: Callable[..., Any], overrides: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_settings(**overrides)


def test_runtime_refuses_sequential_offload_on_cpu_at_start(make_settings: Callable[..., Any]) -> None:
    from fluxserve.runtime import Runtime

    with pytest.raises(MemoryModeError, match="FLUX_OFFLOAD=sequential"):
        Runtime(make_settings(offload="sequential"))


# --- fault injection -----------------------------------------------------------------------------------
def test_fault_spec_parsing() -> None:
    armed = parse_faults("oom@denoise:2, nan@decode, error@encode:3")
    assert [(f.kind, f.stage, f.remaining) for f in armed] == [
        ("oom", "denoise", 2), ("nan", "decode", 1), ("error", "encode", 3)]
    for bad in ("oom@render", "boom@denoise", "oom@denoise:x", "oom@denoise:0", "nan@encode", "oom"):
        with pytest.raises(SettingsError, match="FLUX_FAULTS"):
            parse_faults(bad)


def test_injector_counts_down_and_is_inert_unless_enabled() -> None:
    off = FaultInjector(False, "oom@denoise:1")
    assert off.take("denoise") is None
    with pytest.raises(RuntimeError, match="FLUX_FAULT_INJECTION"):
        off.arm("oom@denoise")
    on = FaultInjector(True, "oom@denoise:2,nan@decode:1")
    assert on.pending() == 3
    with on.suspended():
        assert on.take("denoise") is None  # warm-up runs suspended: nothing is consumed
    assert on.take("encode") is None
    with pytest.raises(torch.OutOfMemoryError):
        on.raise_if_armed("denoise", "cuda")
    with pytest.raises(RuntimeError, match="MPS backend out of memory"):
        on.raise_if_armed("denoise", "mps")
    assert on.raise_if_armed("decode", "cpu") is True
    assert on.pending() == 0 and on.take("denoise") is None
    on.arm("error@encode")
    with pytest.raises(InjectedFault):
        on.raise_if_armed("encode", "cpu")


def test_runtime_reports_a_bad_fault_spec_as_a_settings_error(make_settings: Callable[..., Any]) -> None:
    from fluxserve.runtime import Runtime

    with pytest.raises(SettingsError, match="FLUX_FAULTS"):
        Runtime(make_settings(fault_injection=True, faults="oom@everywhere"))


# --- on a real CUDA GPU (skipped elsewhere) ----------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_memory_mode_on_cuda_generates_and_offload_frees_the_device(cache_dir: Path) -> None:
    """Real CUDA: each mode generates; offload leaves (almost) no weights resident. Prints the figures that
    docs/memory.md quotes (tiny-flux, bf16)."""
    import time

    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.loading import load_model
    from fluxserve.generation import GenerationParams, ImageRequest
    from fluxserve.models.registry import BUILTIN_MODELS
    from fluxserve.settings import Settings

    plan = select_device_dtype("cuda:0")
    rows: dict[tuple[str, int], tuple[int, int, float, list[str]]] = {}
    modes: list[tuple[str, dict[str, Any]]] = [
        ("none", {}), ("model", {"offload": "model"}), ("sequential", {"offload": "sequential"}),
        ("vae_slicing+tiling", {"vae_slicing": True, "vae_tiling": True}),
        ("attention_slicing=max", {"attention_slicing": "max"})]
    for name, overrides in modes:
        memory.empty_cache("cuda")
        base = torch.cuda.memory_allocated()
        settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cuda:0", _env_file=None,  # type: ignore[call-arg]
                            **overrides)
        assert check_memory_modes(settings, plan) == []
        model = load_model(BUILTIN_MODELS["tiny-flux"], plan, settings)
        resident = torch.cuda.memory_allocated() - base
        engine = DeviceEngine(settings, plan)
        for size, n in ((256, 1), (1024, 2)):
            p = GenerationParams("tiny-flux", size, size, 4, 0.0, 256)
            engine.generate(model, p, [ImageRequest("a", list(range(n)))])  # warm
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(3):
                result = engine.generate(model, p, [ImageRequest("a", list(range(n)))])[0]
            seconds = (time.perf_counter() - started) / 3
            assert result.images[0].shape == (size, size, 3) and not result.fallback_applied
            rows[(name, size)] = (resident, torch.cuda.max_memory_allocated() - base, seconds, model.modes)
        del model, engine
    for (name, size), (resident, peak, seconds, applied) in rows.items():
        print(f"\nCUDA {name:22s} {size:4d}px resident {resident / 2**20:8.2f} MiB  peak {peak / 2**20:9.2f} MiB  "
              f"{seconds * 1000:8.1f} ms  modes={applied}")
    for offloaded in ("model", "sequential"):
        assert rows[(offloaded, 256)][0] < rows[("none", 256)][0] / 4
    assert rows[("vae_slicing+tiling", 1024)][1] < rows[("none", 1024)][1]
