"""Every registered family served over HTTP by a real ``fluxserve serve`` (the package's shared ``live``
server, tests/e2e/conftest.py), driven by the official openai client."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fluxserve.engine.families import runner_for
from fluxserve.models.registry import BUILTIN_MODELS
from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e

TINY_KEYS = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]


def test_models_list_every_family_with_licence_and_gated_state(live: ServerProcess) -> None:
    listed = {m["id"]: m for m in httpx.get(live.base_url + "/v1/models?all=true", timeout=30).json()["data"]}
    assert set(BUILTIN_MODELS) <= set(listed)
    for key, spec in BUILTIN_MODELS.items():
        entry = listed[key]
        assert entry["family"] == spec.family
        assert entry["licence"] == spec.licence and entry["gated"] is spec.gated
        assert entry["commercial_use"] is spec.commercial_use
    assert listed["klein-9b"]["commercial_use"] is False and listed["klein"]["licence"] == "Apache-2.0"
    assert listed["zimage"]["defaults"]["num_inference_steps"] == 8
    assert listed["zimage"]["defaults"]["guidance_scale"] == 0.0
    assert listed["klein"]["defaults"]["num_inference_steps"] == 4


@pytest.mark.parametrize("key", TINY_KEYS)
def test_every_family_generates_over_http(live: ServerProcess, key: str) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    spec = BUILTIN_MODELS[key]
    result = client.images.generate(model=key, prompt="a red fox in the snow", size="64x64", n=2,  # type: ignore[arg-type]
                                    extra_body={"seed": 21, "num_inference_steps": 2})
    assert len(result.data) == 2
    extra: dict[str, Any] = result.data[0].model_extra or {}
    assert extra["model_key"] == key and extra["seed"] == 21
    first = base64.b64decode(result.data[0].b64_json or "")
    second = base64.b64decode(result.data[1].b64_json or "")
    assert Image.open(io.BytesIO(first)).size == (64, 64)
    assert first != second  # seeds 21 and 22
    again = client.images.generate(model=key, prompt="a red fox in the snow", size="64x64", n=2,  # type: ignore[arg-type]
                                   extra_body={"seed": 21, "num_inference_steps": 2})
    assert base64.b64decode(again.data[0].b64_json or "") == first  # the same request, the same bytes
    alone = client.images.generate(model=key, prompt="a red fox in the snow", size="64x64",  # type: ignore[arg-type]
                                   extra_body={"seed": 22, "num_inference_steps": 2})
    # Seed 22 alone is the second image of the batch, up to float rounding of a different batch size.
    diff = np.abs(_pixels(base64.b64decode(alone.data[0].b64_json or "")) - _pixels(second))
    assert diff.max() <= 2
    assert runner_for(spec.family).has_tiny


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
