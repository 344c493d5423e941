"""Loading failures are explained; registry resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fluxserve.engine.loading import _explain_load_failure
from fluxserve.models.registry import BUILTIN_MODELS, UnknownModelError, resolve_model


def _error(name: str, text: str = "") -> Exception:
    return type(name, (OSError,), {})(text)


def test_failure_messages() -> None:
    dev = BUILTIN_MODELS["dev"]
    assert "HF_TOKEN" in _explain_load_failure(dev, _error("GatedRepoError", "401 Client Error"))
    assert "not found" in _explain_load_failure(dev, _error("RepositoryNotFoundError"))
    offline = _explain_load_failure(dev, _error("LocalEntryNotFoundError", "Cannot find the requested files"))
    assert "cannot reach the hub" in offline and "tiny-flux" in offline


def test_no_network_gives_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    env.update({"HF_HUB_OFFLINE": "1", "FLUX_CACHE_DIR": str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "fluxserve", "generate", "x", "--model", "schnell", "-o",
                           str(tmp_path / "x.png")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "could not download black-forest-labs/FLUX.1-schnell" in done.stderr
    assert "Traceback" not in done.stderr


def test_resolution_rules(tmp_path: Path) -> None:
    assert resolve_model("schnell").source == "black-forest-labs/FLUX.1-schnell"
    assert resolve_model("black-forest-labs/FLUX.1-dev").key == "dev"
    assert resolve_model("someone/model").family == "generic"
    with pytest.raises(UnknownModelError, match="FLUX_ALLOW_ANY_MODEL"):
        resolve_model("someone/model", allow_unregistered=False)
    with pytest.raises(UnknownModelError, match="not a diffusers pipeline"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    spec = resolve_model(str(tmp_path))
    assert spec.family == "qwen" and spec.negative_prompt == " "
    with pytest.raises(UnknownModelError):
        resolve_model("not a model!")


def test_presets_fit_the_size_multiple() -> None:
    for spec in BUILTIN_MODELS.values():
        for preset in spec.presets.values():
            assert preset.width % spec.size_multiple == 0 and preset.height % spec.size_multiple == 0, spec.key
        assert spec.width % spec.size_multiple == 0
    assert all(p.steps >= 24 for p in BUILTIN_MODELS["dev"].presets.values())


def test_weights_load_straight_onto_the_gpu_only_when_the_whole_pipeline_lives_there(make_settings: Any) -> None:
    """``device_map="cuda"`` (no full host-memory copy on the way) for CUDA without offload; CPU, MPS and the
    offload modes load on the CPU first, as diffusers needs for them."""
    from fluxserve.engine.loading import direct_placement
    from fluxserve.models.devices import DevicePlan

    def plan(device: str) -> DevicePlan:
        return DevicePlan(device, "bfloat16", "bfloat16", "cpu")

    settings = make_settings()
    assert direct_placement(plan("cuda:0"), settings) == "cuda"
    assert direct_placement(plan("cuda:1"), settings) == "cuda"  # made the current device while loading
    assert direct_placement(plan("cuda:0"), make_settings(offload="model")) is None
    assert direct_placement(plan("cuda:0"), make_settings(offload="sequential")) is None
    assert direct_placement(plan("mps"), settings) is None
    assert direct_placement(plan("cpu"), settings) is None
