"""Tiny offline models: built with fixed seeds, saved with save_pretrained, loaded with from_pretrained."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.tiny import is_tiny_model_dir, write_tiny_model
from fluxserve.generation import GenerationParams, ImageRequest
from fluxserve.models.registry import FAMILIES, fallback_family, resolve_model, tiny_families


def _weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.safetensors")):
        for name, tensor in sorted(load_file(file).items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family", tiny_families())
def test_written_in_diffusers_format_with_the_same_weights_every_time(tmp_path: Path, family: str) -> None:
    a = write_tiny_model(tmp_path / "a", family)
    b = write_tiny_model(tmp_path / "b", family)
    index = json.loads((a / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[family].pipeline_classes["generate"]
    assert is_tiny_model_dir(a, family)
    assert not is_tiny_model_dir(a, "qwen" if family == "flux" else "flux")
    assert _weights_digest(a) == _weights_digest(b)
    assert not list(tmp_path.glob(".a-*")), "temporary build directory left behind"


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> DeviceEngine:
    from fluxserve.settings import Settings

    settings = Settings(cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    return DeviceEngine(settings.engine, select_device_dtype("cpu"))


@pytest.mark.parametrize("key", ["tiny-flux", "tiny-qwen"])
def test_same_seed_same_image_different_seed_different_image(engine: DeviceEngine, key: str) -> None:
    spec = resolve_model(key)
    model, _ = engine.load(spec)
    assert model.pipeline_class == ("FluxPipeline" if key == "tiny-flux" else "QwenImagePipeline")
    params = GenerationParams(key, 64, 64, 3, spec.guidance, 32)
    first = engine.generate(model, params, [ImageRequest("a red fox", [7])])[0].images[0]
    second = engine.generate(model, params, [ImageRequest("a red fox", [7])])[0].images[0]
    other = engine.generate(model, params, [ImageRequest("a red fox", [8])])[0].images[0]
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first.tobytes() == second.tobytes()
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1


def test_progress_bars_disabled_and_on_the_resolved_device(engine: DeviceEngine) -> None:
    model, _ = engine.load(resolve_model("tiny-flux"))
    assert model.primary._progress_bar_config.get("disable") is True
    assert str(model.primary.transformer.device) == "cpu"


def test_generic_runner_runs_any_pipeline_in_one_call(engine: DeviceEngine) -> None:
    """Pipelines of other families go through one plain pipeline call; seeds and batching still hold."""
    from fluxserve.engine.families import runner_for

    spec = resolve_model("tiny-flux")
    model, _ = engine.load(spec)
    staged = model.runner
    params = GenerationParams("tiny-flux", 64, 64, 2, 0.0, 64)
    expected = engine.generate(model, params, [ImageRequest("a red fox", [7])])[0].images[0]
    model.runner = runner_for(fallback_family())
    try:
        steps: list[int] = []
        one, two = engine.generate(model, params, [
            ImageRequest("a red fox", [7], on_progress=lambda s, t, p: steps.append(s), partial_images=1),
            ImageRequest("a cat", [8])])
    finally:
        model.runner = staged
    assert steps == [1, 2]
    diff = np.abs(one.images[0].astype(int) - expected.astype(int))
    assert diff.max() <= 2
    assert np.abs(two.images[0].astype(int) - expected.astype(int)).mean() > 1
