"""The Serve config YAML and the KubeRay manifest are valid for Ray and point at a working builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _serve_configs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy/kubernetes/rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    return {"serve-config.yaml": config, "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["serve-config.yaml", "rayservice.yaml"])
def test_serve_config_is_valid_for_ray(name: str) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed (pip install '.[ray]')")
    config = _serve_configs()[name]
    parsed = schema.ServeDeploySchema.model_validate(config)
    app = parsed.applications[0]
    assert app.import_path == "fluxserve.distributed.ray_serve:app_builder"
    env = app.runtime_env["env_vars"]
    assert all(key.startswith(("FLUX_", "HF_")) for key in env)


def test_builder_reads_the_settings_of_the_config() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")
    from fluxserve.distributed.ray_serve import app_builder
    from fluxserve.settings import SettingsError

    app = app_builder({"model": "tiny-flux", "FLUX_PRELOAD_MODELS": "tiny-qwen", "ray_num_gpus": "0"})
    assert type(app).__name__ == "Application"
    with pytest.raises(SettingsError, match="FLUX_RAY_MIN_REPLICAS must be ≤ FLUX_RAY_MAX_REPLICAS"):
        app_builder({"ray_min_replicas": "3", "ray_max_replicas": "1"})
