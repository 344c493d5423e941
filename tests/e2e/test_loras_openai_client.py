"""LoRA adapters through a real ``fluxserve serve`` (the package's shared ``live`` server, tests/e2e/conftest.py,
whose FLUX_LORA_DIR is fresh: only what serving tiny-flux writes) and the official openai client's
``extra_body``: the demo adapter is listed, it changes the image, scale 0 is the model itself, A→B→A gives A's
bytes again, and a bad name is the OpenAI error naming ``loras``."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fluxserve.engine.adapters import build_tiny_lora
from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def _pixels(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def test_openai_client_with_loras(live: ServerProcess, live_dir: Path, cache_dir: Path) -> None:
    server, library = live, live_dir / "loras"
    listing = httpx.get(server.base_url + "/v1/loras", timeout=30).json()
    assert [card["name"] for card in listing["data"]] == ["tiny-flux-demo"]  # written by serving tiny-flux
    # A second adapter dropped into the library is picked up without a restart.
    build_tiny_lora(cache_dir / "models" / "tiny-flux", library / "flux" / "second.safetensors", family="flux",
                    base_model="tiny-flux", seed=9)

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def generate(loras: list[dict[str, Any]] | None) -> tuple[np.ndarray, dict[str, Any]]:
        extra: dict[str, Any] = {"seed": 5, "num_inference_steps": 2}
        if loras is not None:
            extra["loras"] = loras
        result = client.images.generate(model="tiny-flux", prompt="a red fox", size="64x64",  # type: ignore[arg-type]
                                        extra_body=extra)
        item = result.data[0]
        return _pixels(item.b64_json), (item.model_extra or {})["params"]

    plain, plain_params = generate(None)
    demo, demo_params = generate([{"name": "tiny-flux-demo", "scale": 1.0}])
    assert "loras" not in plain_params
    assert demo_params["loras"] == [{"name": "tiny-flux-demo", "scale": 1.0}]
    assert np.abs(demo - plain).max() > 8
    zero, _ = generate([{"name": "tiny-flux-demo", "scale": 0.0}])
    assert np.abs(zero - plain).max() <= 1
    second, _ = generate([{"name": "second", "scale": 1.0}])
    again, _ = generate([{"name": "tiny-flux-demo", "scale": 1.0}])
    assert not np.array_equal(second, demo)
    assert np.array_equal(again, demo)

    with pytest.raises(openai.NotFoundError) as missing:
        generate([{"name": "nope", "scale": 1.0}])
    error = missing.value.body["error"] if isinstance(missing.value.body, dict) and "error" in missing.value.body \
        else missing.value.body
    assert isinstance(error, dict) and error["param"] == "loras" and error["code"] == "lora_not_found"
    with pytest.raises(openai.BadRequestError):
        generate([{"name": "tiny-flux-demo", "scale": 50}])
    cards = {c["name"]: c for c in httpx.get(server.base_url + "/v1/loras", timeout=30).json()["data"]}
    assert cards["tiny-flux-demo"]["loaded"] == ["tiny-flux@cpu"] and cards["second"]["loaded"] == ["tiny-flux@cpu"]
