"""The OOM recovery ladder and the NaN/black-image checks of DeviceEngine.generate, on tiny-flux.

Faults are injected (FLUX_FAULTS' machinery) or, for the CPU, produced for real by the allocator. The
CUDA offload rung and the MPS paths are simulated: the engine is given a CUDA or MPS device plan while
the pipeline stays on the CPU, and the calls that need the real device are patched. None of it ran on
a GPU or on Apple hardware.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from fluxserve.engine import engine as engine_module
from fluxserve.engine import recovery as recovery_module
from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.faults import FaultInjector, InjectedFault, oom_error
from fluxserve.engine.loading import LoadedModel, load_model
from fluxserve.generation import BadOutput, GenerationCancelled, GenerationParams, ImageRequest, OutOfMemory
from fluxserve.models.devices import DevicePlan
from fluxserve.models.registry import BUILTIN_MODELS
from fluxserve.settings import Settings

CPU = DevicePlan("cpu", "float32", "float32", "cpu")
CUDA = DevicePlan("cuda:0", "bfloat16", "bfloat16", "cpu")  # simulated
MPS = DevicePlan("mps", "float16", "float32", "cpu")  # simulated


@pytest.fixture(scope="module")
def model(cache_dir: Path) -> LoadedModel:
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    return load_model(BUILTIN_MODELS["tiny-flux"], CPU, settings)


@pytest.fixture
def make_engine(cache_dir: Path) -> Iterator[Any]:
    def make(plan: DevicePlan = CPU, faults: str = "", **overrides: Any) -> DeviceEngine:
        """An engine over the shared model; min_size 32 keeps downscaled retries cheap (64 → 48 → 32)."""
        values: dict[str, Any] = {"min_size": 32, **overrides}
        settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", fault_injection=True,  # type: ignore[call-arg]
                            _env_file=None, **values)
        return DeviceEngine(settings, plan, FaultInjector(True, faults))

    yield make


def params(size: int = 64, steps: int = 2, allow_fallback: bool = True) -> GenerationParams:
    return GenerationParams("tiny-flux", size, size, steps, 0.0, 64, allow_fallback)


def run(engine: DeviceEngine, model: LoadedModel, p: GenerationParams, n: int = 1) -> Any:
    return engine.generate(model, p, [ImageRequest("a red fox", list(range(n)))])[0]


def assert_modes_restored(model: LoadedModel) -> None:
    vae = model.primary.vae
    assert not vae.use_tiling and not vae.use_slicing
    assert all(p.dtype == torch.float32 for p in model.primary.transformer.parameters())


@pytest.fixture
def no_device_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """For simulated CUDA/MPS plans: the pipeline runs on the CPU, so there is no device to synchronize."""
    monkeypatch.setattr(engine_module, "_synchronizer", lambda *_args: (lambda: None))


# --- each rung, in order -------------------------------------------------------------------------------
@pytest.mark.parametrize(("ooms", "size", "reason"), [
    (1, 64, "cpu_oom: retried after cache cleanup"),
    (2, 64, "cpu_oom: retried after cache cleanup and VAE tiling/slicing"),
    # offload is CUDA-only: skipped on the CPU without spending a retry
    (3, 64, "cpu_oom: retried at 48x48 after cache cleanup and VAE tiling/slicing"),
    (4, 64, "cpu_oom: retried at 32x32 after cache cleanup and VAE tiling/slicing"),
])
def test_each_rung_recovers_in_order(make_engine: Any, model: LoadedModel, ooms: int, size: int,
                                     reason: str) -> None:
    engine = make_engine(faults=f"oom@denoise:{ooms}")
    result = run(engine, model, params(size, steps=4))
    assert result.fallback_applied and result.fallback_reason == reason
    downscaled = ooms >= 3
    assert result.images[0].shape[:2] == (result.params.height, result.params.width)
    assert (result.original_params is not None) == downscaled
    if downscaled:
        assert result.original_params == params(size, steps=4)
    assert result.params.steps == 4
    assert list(engine.oom_events) == ["cpu_oom"] * ooms and engine.consecutive_oom_failures == 0
    assert_modes_restored(model)


def test_ladder_exhausted_raises_with_what_was_tried_then_success_resets(make_engine: Any,
                                                                          model: LoadedModel) -> None:
    engine = make_engine(faults="oom@decode:5")
    with pytest.raises(OutOfMemory) as info:
        run(engine, model, params(64))
    assert info.value.reason == ("cpu_oom: still out of memory at 32x32 after cache cleanup, VAE tiling/slicing, "
                                 "downscale to 48x48 and downscale to 32x32")
    assert engine.consecutive_oom_failures == 1
    engine.faults.arm("oom@encode:9")
    with pytest.raises(OutOfMemory):
        run(engine, model, params(64))
    assert engine.consecutive_oom_failures == 2
    engine.faults.clear()
    assert not run(engine, model, params(64)).fallback_applied
    assert engine.consecutive_oom_failures == 0
    assert_modes_restored(model)


def test_no_downscale_when_the_request_does_not_allow_it(make_engine: Any, model: LoadedModel) -> None:
    engine = make_engine(faults="oom@denoise:3")
    with pytest.raises(OutOfMemory, match=r"at 64x64 .*allow_fallback=false"):
        run(engine, model, params(64, allow_fallback=False))


@pytest.mark.parametrize(("policy", "ooms", "outcome"), [
    ("downscale", 1, "cpu_oom: retried at 48x48"),
    ("slicing,clear_cache", 2, "cpu_oom: retried after VAE tiling/slicing and cache cleanup"),
    ("clear_cache", 2, "OutOfMemory: cpu_oom: still out of memory at 64x64 after cache cleanup"),
    ("", 1, "OutOfMemory: cpu_oom: still out of memory at 64x64 after nothing"),
])
def test_policy_sets_the_rungs_and_their_order(make_engine: Any, model: LoadedModel, policy: str, ooms: int,
                                               outcome: str) -> None:
    engine = make_engine(faults=f"oom@denoise:{ooms}", oom_policy=policy)
    try:
        result = run(engine, model, params(64))
        got = result.fallback_reason
    except OutOfMemory as exc:
        got = f"OutOfMemory: {exc.reason}"
    assert got.startswith(outcome)


def test_slicing_rung_is_skipped_when_everything_is_already_on(make_engine: Any, model: LoadedModel) -> None:
    vae = model.primary.vae
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        engine = make_engine(faults="oom@denoise:2", oom_policy="slicing,downscale", vae_tiling=True,
                             vae_slicing=True)
        result = run(engine, model, params(64))
        assert result.fallback_reason == "cpu_oom: retried at 32x32"  # slicing spent no retry
        assert vae.use_tiling and vae.use_slicing  # configured modes are left on
    finally:
        vae.disable_tiling()
        vae.disable_slicing()


# --- the step count never changes (the earlier server raised schnell's 4 steps to 8) ------------------
class StepSpy:
    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.steps: list[int] = []
        self.sizes: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)

    def denoise(self, pipe: Any, positives: Any, negatives: Any, args: Any) -> torch.Tensor:
        self.steps.append(args.steps)
        self.sizes.append((args.width, args.height))
        return self.adapter.denoise(pipe, positives, negatives, args)


def with_adapter(model: LoadedModel, adapter: Any) -> LoadedModel:
    """The same loaded model (same pipeline views) driven through a wrapped family runner."""
    return dataclasses.replace(model, runner=adapter)


def test_schnell_fallback_keeps_four_steps_on_every_attempt(make_engine: Any, model: LoadedModel) -> None:
    spy = StepSpy(model.runner)
    schnell_like = dataclasses.replace(with_adapter(model, spy), spec=BUILTIN_MODELS["schnell"])
    engine = make_engine(faults="oom@decode:4")
    result = run(engine, schnell_like, GenerationParams("schnell", 64, 64, 4, 0.0, 64))
    assert spy.steps == [4] * 5
    assert spy.sizes == [(64, 64), (64, 64), (64, 64), (48, 48), (32, 32)]
    assert result.params.steps == 4 and result.original_params is not None and result.original_params.steps == 4


@settings(max_examples=300, deadline=None)
@given(width=st.integers(4, 128), height=st.integers(4, 128), multiple=st.sampled_from([8, 16, 32]),
       steps=st.integers(1, 50))
def test_downscaled_params_never_change_steps_and_keep_shape(width: int, height: int, multiple: int,
                                                             steps: int) -> None:
    original = GenerationParams("schnell", width * multiple, height * multiple, steps, 0.0, 256)
    smaller = original.scaled(0.75, multiple, 64)
    if smaller is None:
        return
    assert smaller.steps == steps and smaller.guidance == original.guidance
    assert smaller.width % multiple == 0 and smaller.height % multiple == 0
    assert smaller.width * smaller.height < original.width * original.height
    assert min(smaller.width, smaller.height) >= 64
    # aspect ratio kept to within the rounding of one multiple on each side
    ratio, new_ratio = original.width / original.height, smaller.width / smaller.height
    assert abs(new_ratio - ratio) <= ratio * (multiple / smaller.height + multiple / smaller.width) + 1e-9


# --- what counts as OOM, and what the recovery frees -------------------------------------------------------
def test_real_cpu_allocator_failure_is_recovered(make_engine: Any, model: LoadedModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = model.runner
    calls = []

    class Greedy(StepSpy):
        def denoise(self, pipe: Any, positives: Any, negatives: Any, args: Any) -> torch.Tensor:
            calls.append(args.width)
            if len(calls) == 1:
                torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the allocator's own error
            return real.denoise(pipe, positives, negatives, args)

    engine = make_engine()
    result = run(engine, with_adapter(model, Greedy(real)), params(64))
    assert result.fallback_reason == "cpu_oom: retried after cache cleanup" and calls == [64, 64]


def test_failed_attempt_is_freed_before_the_cache_is_emptied(make_engine: Any, model: LoadedModel,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The OOM's traceback pins the failed attempt's tensors; the cache must be emptied after it is gone."""
    pinned: list[weakref.ref[torch.Tensor]] = []
    seen: list[tuple[bool, bool]] = []
    real = model.runner

    class Hog(StepSpy):
        def denoise(self, pipe: Any, positives: Any, negatives: Any, args: Any) -> torch.Tensor:
            if not pinned:
                big = torch.ones(1024, 1024)
                pinned.append(weakref.ref(big))
                raise oom_error("cpu")
            return real.denoise(pipe, positives, negatives, args)

    def empty_cache(backend: str, **_: Any) -> None:
        seen.append((sys.exc_info()[0] is None, pinned[0]() is None))

    monkeypatch.setattr(recovery_module, "empty_cache", empty_cache)
    gc.disable()  # freed by reference counting alone, not by a collection that happens to run
    try:
        run(make_engine(), with_adapter(model, Hog(real)), params(64))
    finally:
        gc.enable()
    assert seen and seen[0] == (True, True)


def test_other_errors_are_not_retried_or_counted(make_engine: Any, model: LoadedModel) -> None:
    engine = make_engine(faults="error@denoise:1")
    with pytest.raises(InjectedFault):
        run(engine, model, params(64))
    assert not engine.oom_events and engine.consecutive_oom_failures == 0
    assert not run(engine, model, params(64)).fallback_applied


def test_cancelled_batch_is_not_retried(make_engine: Any, model: LoadedModel) -> None:
    engine = make_engine(faults="oom@denoise:1")
    with pytest.raises(GenerationCancelled):
        engine.generate(model, params(64), [ImageRequest("a", [1], is_cancelled=lambda: True)])
    assert engine.faults.pending() == 0


def test_oom_events_are_bounded(make_engine: Any) -> None:
    engine = make_engine()
    for _ in range(1000):
        engine.oom_events.append("cpu_oom")
    assert len(engine.oom_events) <= 256


# --- CUDA: the offload rung (simulated) ------------------------------------------------------------------
class OffloadRecorder:
    def __init__(self, pipe: Any, monkeypatch: pytest.MonkeyPatch, fail_restore: int = 0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_restore = fail_restore
        monkeypatch.setattr(pipe, "enable_model_cpu_offload",
                            lambda device=None: self.calls.append(("offload", device)))
        monkeypatch.setattr(pipe, "remove_all_hooks", lambda: self.calls.append(("remove_hooks", None)))
        monkeypatch.setattr(pipe, "to", self.to)

    def to(self, device: Any) -> None:
        self.calls.append(("to", device))
        if self.fail_restore:
            self.fail_restore -= 1
            raise oom_error("cuda")


def test_offload_rung_on_cuda_then_back_on_the_device(make_engine: Any, model: LoadedModel, no_device_sync: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = OffloadRecorder(model.primary, monkeypatch)
    engine = make_engine(CUDA, faults="oom@denoise:3")
    result = run(engine, model, params(64))
    assert result.fallback_reason == "cuda_oom: retried after cache cleanup, VAE tiling/slicing and model CPU offload"
    assert recorder.calls == [("offload", "cuda:0"), ("remove_hooks", None), ("to", "cuda:0")]
    assert_modes_restored(model)


def test_model_stays_offloaded_when_moving_back_runs_out_of_memory(make_engine: Any, model: LoadedModel,
                                                                    no_device_sync: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = OffloadRecorder(model.primary, monkeypatch, fail_restore=1)
    monkeypatch.setattr(model, "modes", [])
    engine = make_engine(CUDA, faults="oom@denoise:3")
    assert run(engine, model, params(64)).fallback_applied  # the request still gets its image
    assert recorder.calls[-2:] == [("to", "cuda:0"), ("offload", "cuda:0")]
    assert model.modes == ["offload_model_after_oom"]


@pytest.mark.parametrize(("plan", "overrides"), [
    (CPU, {}), (MPS, {}), (CUDA, {"offload": "model"}), (CUDA, {"max_concurrent": 2}),
])
def test_offload_rung_only_where_it_can_help(make_engine: Any, model: LoadedModel, no_device_sync: None,
                                             monkeypatch: pytest.MonkeyPatch, plan: DevicePlan,
                                             overrides: dict[str, Any]) -> None:
    recorder = OffloadRecorder(model.primary, monkeypatch)
    engine = make_engine(plan, faults="oom@denoise:3", oom_policy="offload", **overrides)
    with pytest.raises(OutOfMemory):
        run(engine, model, params(64))
    assert recorder.calls == []


# --- MPS (simulated) -------------------------------------------------------------------------------------
def test_mps_oom_is_recognised_and_recovered(make_engine: Any, model: LoadedModel, no_device_sync: None) -> None:
    engine = make_engine(MPS, faults="oom@denoise:3")
    result = run(engine, model, params(64))
    assert result.fallback_reason == "mps_oom: retried at 48x48 after cache cleanup and VAE tiling/slicing"


def test_mps_half_precision_nan_is_retried_in_float32(make_engine: Any, model: LoadedModel,
                                                      no_device_sync: None) -> None:
    """Latents NaN in half precision → the whole generation again in float32, then the dtypes restored."""
    pipe = model.primary
    pipe.to(torch.bfloat16)  # stands in for MPS float16 (the CPU computes bf16 well)
    model.prompt_cache.clear()
    try:
        engine = make_engine(MPS, faults="nan@denoise:1")
        result = run(engine, model, params(64))
        assert result.fallback_reason == "nan_output: retried in float32 after NaN/black output in float16"
        assert np.isfinite(result.images[0]).all() and result.images[0].std() > 0
        assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
        assert len(model.prompt_cache._items) == 1  # the float32 embeddings were not cached
    finally:
        pipe.to(torch.float32)
        model.prompt_cache.clear()


# --- NaN / black output ---------------------------------------------------------------------------------
def test_nan_decode_is_re_decoded(make_engine: Any, model: LoadedModel) -> None:
    result = run(make_engine(faults="nan@decode:1"), model, params(64))
    assert result.fallback_reason == "nan_output: re-decoded the VAE in float32 after NaN/black output"
    assert result.original_params is None and result.images[0].std() > 0


def test_nan_latents_on_cpu_fail_clearly(make_engine: Any, model: LoadedModel) -> None:
    engine = make_engine(faults="nan@denoise:1")
    with pytest.raises(BadOutput, match="NaN latents"):
        run(engine, model, params(64))
    assert engine.consecutive_oom_failures == 0


def test_black_image_counts_as_bad_output(make_engine: Any, model: LoadedModel) -> None:
    real = model.runner
    decodes = []

    class Black(StepSpy):
        def decode(self, pipe: Any, latents: Any, width: int, height: int) -> torch.Tensor:
            out = real.decode(pipe, latents, width, height)
            decodes.append(1)
            return torch.full_like(out, -1.0) if len(decodes) == 1 else out

    result = run(make_engine(), with_adapter(model, Black(real)), params(64))
    assert result.fallback_reason is not None and result.fallback_reason.startswith("nan_output: re-decoded")
    assert len(decodes) == 2


# --- on a real CUDA GPU (skipped elsewhere) ----------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_oom_is_recovered_and_offload_is_undone(cache_dir: Path) -> None:
    """Real CUDA: a memory cap makes a 1024x1024 request run out of memory for real; the ladder recovers.
    Then the offload rung runs for real (injected OOMs) and the model is back on the GPU afterwards."""
    from fluxserve.engine.device import select_device_dtype
    from fluxserve.engine.memory import empty_cache

    plan = select_device_dtype("cuda:0")
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cuda:0", fault_injection=True,  # type: ignore[call-arg]
                        _env_file=None)
    model = load_model(BUILTIN_MODELS["tiny-flux"], plan, settings)
    engine = DeviceEngine(settings, plan, FaultInjector(True))
    peaks = {}
    for size in (1024, 768):
        empty_cache("cuda")
        torch.cuda.reset_peak_memory_stats()
        run(engine, model, GenerationParams("tiny-flux", size, size, 2, 0.0, 64), n=2)
        peaks[size] = torch.cuda.max_memory_allocated()
    empty_cache("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (peaks[1024] + peaks[768]) / 2
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        result = run(engine, model, GenerationParams("tiny-flux", 1024, 1024, 2, 0.0, 64), n=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"\nCUDA peaks 1024px {peaks[1024] / 2**20:.0f} MiB, 768px {peaks[768] / 2**20:.0f} MiB, "
          f"cap {cap / 2**20:.0f} MiB → {result.fallback_reason!r} at {result.params.width}x{result.params.height}")
    assert result.fallback_reason is not None and result.fallback_reason.startswith("cuda_oom: retried")
    assert engine.oom_events[0] == "cuda_oom"

    engine = DeviceEngine(Settings(model="tiny-flux", cache_dir=cache_dir, device="cuda:0",  # type: ignore[call-arg]
                                   fault_injection=True, oom_policy=["offload"], _env_file=None),
                          plan, FaultInjector(True, "oom@denoise:1"))
    result = run(engine, model, params(256))
    assert result.fallback_reason == "cuda_oom: retried after model CPU offload"
    pipe = model.primary
    assert all(p.device.type == "cuda" for p in pipe.transformer.parameters())
    assert not hasattr(pipe.transformer, "_hf_hook") or pipe.transformer._hf_hook is None
    assert not run(engine, model, params(256)).fallback_applied


def test_the_ladder_changes_the_shared_vae_only_under_the_models_lock(make_engine: Any, model: LoadedModel) -> None:
    """With several pipeline views one VAE serves them all: the slicing rung's VAE modes and the float32
    re-decode are applied only around this batch's own decode, holding the model's shared lock, so another
    view never decodes with (or while someone changes) modes it did not ask for."""
    vae = model.primary.vae
    seen: list[bool] = []
    original = vae.enable_tiling

    def enable_tiling(*args: Any, **kwargs: Any) -> None:
        seen.append(model.shared_lock.locked())
        original(*args, **kwargs)

    vae.enable_tiling = enable_tiling  # records whether the lock is held when the mode changes
    try:
        engine = make_engine(faults="oom@denoise:2", max_concurrent=2)
        result = run(engine, model, params(64, steps=2))
    finally:
        del vae.enable_tiling
    assert result.fallback_reason == "cpu_oom: retried after cache cleanup and VAE tiling/slicing"
    assert seen == [True]
    assert_modes_restored(model)
    assert not model.shared_lock.locked()
