"""The engine's edit part on tiny-flux: from_pipe pipelines per view, the real step count, batching of
identical inputs, cancellation, and the OOM ladder shrinking the inputs along with the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.engine import DeviceEngine, denoising_steps
from fluxserve.engine.families import runner_for
from fluxserve.engine.faults import FaultInjector
from fluxserve.engine.loading import LoadedModel, load_model
from fluxserve.generation import GenerationCancelled, GenerationParams, ImageRequest
from fluxserve.models.devices import DevicePlan
from fluxserve.models.registry import BUILTIN_MODELS, FAMILIES, tiny_families
from fluxserve.settings import Settings

CPU = DevicePlan("cpu", "float32", "float32", "cpu")


@pytest.fixture(scope="module")
def model(cache_dir: Path) -> LoadedModel:
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    return load_model(BUILTIN_MODELS["tiny-flux"], CPU, settings)


def engine(cache_dir: Path, faults: str = "") -> DeviceEngine:
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", fault_injection=True,  # type: ignore[call-arg]
                        min_size=32, _env_file=None)
    return DeviceEngine(settings, CPU, FaultInjector(True, faults))


def photo(size: int = 64) -> np.ndarray:
    return np.kron(np.random.default_rng(0).integers(0, 255, (size // 8, size // 8, 3)),
                   np.ones((8, 8, 1))).astype(np.uint8)


def half_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255
    return mask


def edit_params(task: str = "img2img", strength: float | None = 0.6, size: int = 64,
                steps: int = 4) -> GenerationParams:
    return GenerationParams("tiny-flux", size, size, steps, 0.0, 64, task=task, strength=strength,  # type: ignore[arg-type]
                            inputs="digest")


@pytest.mark.parametrize(("steps", "strength", "expected"), [(4, 0.6, 3), (4, 0.5, 2), (4, 1.0, 4), (10, 0.25, 3)])
def test_progress_counts_the_steps_img2img_really_runs(cache_dir: Path, model: LoadedModel, steps: int,
                                                      strength: float, expected: int) -> None:
    seen: list[tuple[int, int]] = []
    request = ImageRequest("a barn", [1], images=[photo()], on_progress=lambda s, t, _p: seen.append((s, t)))
    engine(cache_dir).generate(model, edit_params(strength=strength, steps=steps), [request])
    assert denoising_steps(edit_params(strength=strength, steps=steps)) == expected
    assert seen == [(i, expected) for i in range(1, expected + 1)]


def test_identical_inputs_batch_into_one_call(cache_dir: Path, model: LoadedModel) -> None:
    eng = engine(cache_dir)
    image = photo()
    first, second = eng.generate(model, edit_params(), [ImageRequest("a barn", [3], images=[image]),
                                                        ImageRequest("a lighthouse", [4, 5], images=[image])])
    assert first.batch_size == second.batch_size == 3 and len(second.images) == 2
    alone = eng.generate(model, edit_params(), [ImageRequest("a lighthouse", [4], images=[image])])[0]
    assert np.abs(alone.images[0].astype(int) - second.images[0].astype(int)).max() <= 2  # batched = alone
    with model.view() as view:  # the edit pipeline was made once for this view, on the same modules
        edit = model.runner.edit_pipeline(view.pipeline, "img2img")
        assert edit is model.runner.edit_pipeline(view.pipeline, "img2img")
        assert edit.transformer is view.pipeline.transformer and edit.vae is view.pipeline.vae


def test_cancel_interrupts_an_edit(cache_dir: Path, model: LoadedModel) -> None:
    cancelled = False

    def progress(step: int, _total: int, _preview: Any) -> None:
        nonlocal cancelled
        cancelled = step >= 1

    request = ImageRequest("a barn", [1], images=[photo()], on_progress=progress, is_cancelled=lambda: cancelled)
    with pytest.raises(GenerationCancelled):
        engine(cache_dir).generate(model, edit_params(steps=6, strength=1.0), [request])


def test_an_edit_without_images_is_refused(cache_dir: Path, model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="needs its input images"):
        engine(cache_dir).generate(model, edit_params(), [ImageRequest("a barn", [1])])


def test_oom_downscale_shrinks_the_inputs_and_keeps_the_unmasked_area(cache_dir: Path, model: LoadedModel) -> None:
    """Three OOMs: cache cleanup, VAE tiling/slicing, then 48x48; the input and mask follow the output size."""
    image, mask = photo(), half_mask()
    result = engine(cache_dir, "oom@denoise:3").generate(model, edit_params("inpaint"), [
        ImageRequest("a window", [2], images=[image], mask=mask)])[0]
    assert result.fallback_applied and "48x48" in (result.fallback_reason or "")
    out = result.images[0]
    assert out.shape == (48, 48, 3)
    small = np.asarray(Image.fromarray(image).resize((48, 48), Image.Resampling.LANCZOS))
    assert np.array_equal(out[:, 26:], small[:, 26:])  # away from the (resampled, now soft) mask edge
    assert np.abs(out[:, :22].astype(int) - small[:, :22]).mean() > 5


EDIT_PIPELINES = [(name, task) for name in tiny_families() for task in FAMILIES[name].tasks if task != "generate"]


@pytest.mark.parametrize(("family_name", "task"), EDIT_PIPELINES)
def test_an_edit_pipeline_shares_the_loaded_modules_and_keeps_their_dtypes(family_name: str, task: str) -> None:
    """diffusers' from_pipe would cast every shared module to float32: a bf16 model on a GPU would silently
    turn float32 (found on the H200: twice the memory, 3× slower, and fp8 linears crashing) after its first
    edit. The edit pipeline holds the very same modules, each in the dtype the engine gave it."""
    import torch

    runner = runner_for(family_name)
    pipe = runner.tiny_pipeline()
    pipe.transformer.to(torch.bfloat16)  # what a CUDA load gives; the VAE stays float32 (MPS does this)
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None:
        text_encoder.to(torch.bfloat16)
    before = {name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}
    edit = runner.edit_pipeline(pipe, task)  # type: ignore[arg-type]
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name in edit.components:
            assert edit.components[name] is module, name
    after = {name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    assert after == before
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
