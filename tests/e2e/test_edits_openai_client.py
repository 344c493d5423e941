"""The official openai client's ``images.edit`` against a real ``fluxserve serve`` (the package's shared
``live`` server, tests/e2e/conftest.py) for every tiny edit family: one image, a mask, several images,
streaming; seeds reproduce byte-identical images."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e

FAMILIES = {"tiny-flux": ("img2img", "inpaint", 1), "tiny-kontext": ("edit", "inpaint", 1),
            "tiny-qwen-edit": ("edit", "edit", 3)}
"""model → (task without a mask, task with a mask, most images)."""


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int = 0, width: int = 64, height: int = 64) -> np.ndarray:
    blocks = np.random.default_rng(seed).integers(0, 255, (height // 8, width // 8, 3))
    return np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)


def mask_png(width: int = 64, height: int = 64) -> bytes:
    """Transparent (alpha 0) on the left half: the area to change."""
    rgba = np.full((height, width, 4), 255, np.uint8)
    rgba[:, : width // 2, 3] = 0
    return png(rgba)


def decoded(b64: str | None) -> np.ndarray:
    assert b64 is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_single_image_edit_reproduces(live: ServerProcess, model: str) -> None:
    client = client_for(live)
    task, _, _ = FAMILIES[model]
    image = ("photo.png", png(photo()), "image/png")
    runs = [client.images.edit(model=model, image=image, prompt="make it look like winter", size="auto",
                               extra_body={"seed": 21, "num_inference_steps": 2}) for _ in range(2)]
    first, again = (run.data[0] for run in runs)
    assert first.b64_json == again.b64_json  # same seed: byte-identical
    assert decoded(first.b64_json).shape == (64, 64, 3)
    extra: dict[str, Any] = first.model_extra or {}
    assert extra["seed"] == 21 and extra["model_key"] == model and extra["params"]["task"] == task
    other = client.images.edit(model=model, image=image, prompt="make it look like winter",
                               extra_body={"seed": 22, "num_inference_steps": 2})
    assert other.data[0].b64_json != first.b64_json


@pytest.mark.parametrize("model", list(FAMILIES))
def test_masked_edit_keeps_the_rest(live: ServerProcess, model: str) -> None:
    client = client_for(live)
    _, task, _ = FAMILIES[model]
    source = photo(1)
    result = client.images.edit(model=model, image=("photo.png", png(source), "image/png"),
                                mask=("mask.png", mask_png(), "image/png"), prompt="a window",
                                extra_body={"seed": 3, "num_inference_steps": 2})
    out = decoded(result.data[0].b64_json)
    assert (result.data[0].model_extra or {})["params"]["task"] == task
    assert np.array_equal(out[:, 32:], source[:, 32:])  # outside the mask: the input's own pixels
    assert np.abs(out[:, :32].astype(int) - source[:, :32]).mean() > 5


@pytest.mark.parametrize("model", list(FAMILIES))
def test_several_images(live: ServerProcess, model: str) -> None:
    client = client_for(live)
    most = FAMILIES[model][2]
    images = [(f"ref{i}.png", png(photo(10 + i)), "image/png") for i in range(most + 1)]
    if most > 1:
        result = client.images.edit(model=model, image=images[:most], prompt="put the first into the second",
                                    extra_body={"seed": 4, "num_inference_steps": 2})
        assert decoded(result.data[0].b64_json).shape == (64, 64, 3)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=model, image=images, prompt="too many")
    assert refused.value.param == "image" and refused.value.code == "too_many_images"


@pytest.mark.parametrize("model", list(FAMILIES))
def test_streamed_edit(live: ServerProcess, model: str) -> None:
    client = client_for(live)
    stream = client.images.edit(model=model, image=("photo.png", png(photo()), "image/png"), prompt="at night",
                                stream=True, partial_images=1, extra_body={"seed": 21, "num_inference_steps": 3})
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert all(decoded(event.b64_json).shape == (64, 64, 3) for event in events)  # the partial too: full size


def test_errors_name_the_field(live: ServerProcess) -> None:
    client = client_for(live)
    with pytest.raises(openai.BadRequestError) as not_image:
        client.images.edit(image=("photo.png", b"not an image", "image/png"), prompt="x")
    assert not_image.value.param == "image" and not_image.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError) as bad_mask:
        client.images.edit(image=("photo.png", png(photo()), "image/png"), prompt="x",
                           mask=("mask.png", png(photo()), "image/png"))
    assert bad_mask.value.param == "mask" and bad_mask.value.code == "invalid_mask"
    with pytest.raises(openai.BadRequestError) as fidelity:
        client.images.edit(model="tiny-kontext", image=("photo.png", png(photo()), "image/png"), prompt="x",
                           input_fidelity="low")
    assert fidelity.value.param == "input_fidelity"


def test_variation_through_the_client(live: ServerProcess) -> None:
    client = client_for(live)
    result = client.images.create_variation(image=("photo.png", png(photo()), "image/png"), n=1,
                                            extra_body={"seed": 8, "num_inference_steps": 4})
    assert decoded(result.data[0].b64_json).shape == (64, 64, 3)
