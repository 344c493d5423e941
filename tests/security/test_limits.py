"""Request limits: each is a setting, and going past it is a 4xx that names the parameter.

The live app (see conftest.LIMITS) allows n ≤ 2, prompts ≤ 1000 characters, sizes 64..256, 128×128
pixels, ≤ 4 steps, guidance ≤ 10 and 64 KiB bodies. Boundary values that are allowed are generated for
real (64x64, one step), so an off-by-one either way fails a test.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from .conftest import LIMITS
from .helpers import assert_openai_error

GEN = "/v1/images/generations"
OK = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}
MAX_SEED = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER


def _post(client: Any, **fields: Any) -> Any:
    return client.post(GEN, json={**OK, **fields})


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"prompt": "x" * (LIMITS["max_prompt_chars"] + 1)}, "prompt", "prompt_too_long"),
    ({"negative_prompt": "x" * (LIMITS["max_prompt_chars"] + 1)}, "negative_prompt", "prompt_too_long"),
    ({"prompt": ""}, "prompt", None),
    ({"prompt": "   \n\t "}, "prompt", None),
    ({"n": LIMITS["max_images_per_request"] + 1}, "n", None),
    ({"n": 0}, "n", None),
    ({"n": -3}, "n", None),
    ({"size": "32x64"}, "size", "invalid_size"),
    ({"size": "64x512"}, "size", "invalid_size"),
    ({"size": "-64x64"}, "size", "invalid_size"),
    ({"size": "0x0"}, "size", "invalid_size"),
    ({"size": "64x65"}, "size", "invalid_size"),                         # not a multiple of 16
    ({"size": "256x128"}, "size", "invalid_size"),                       # each side fine, pixel budget not
    ({"size": None, "width": 512}, "width", "invalid_size"),
    ({"size": None, "height": 32}, "height", "invalid_size"),
    ({"size": None, "width": 256, "height": 128}, "width", "invalid_size"),
    ({"size": None, "width": -64}, "width", None),
    ({"size": None, "height": 0}, "height", None),
    ({"size": "64x64", "width": 128}, "size", "conflicting_size"),
    ({"num_inference_steps": LIMITS["max_steps"] + 1}, "num_inference_steps", None),
    ({"num_inference_steps": 0}, "num_inference_steps", None),
    ({"guidance_scale": LIMITS["max_guidance"] + 0.5}, "guidance_scale", None),
    ({"guidance_scale": -0.5}, "guidance_scale", None),
    ({"true_cfg_scale": LIMITS["max_guidance"] * 2}, "true_cfg_scale", None),
    ({"seed": -1}, "seed", None),
    ({"seed": MAX_SEED + 1}, "seed", None),
    ({"seed": 2**63 - 1}, "seed", None),
    ({"seed": 2**64}, "seed", None),
    ({"moderation": "high"}, "moderation", "invalid_value"),
    ({"moderation": ""}, "moderation", "invalid_value"),
    ({"max_sequence_length": 10**6}, "max_sequence_length", None),
    ({"output_compression": 101}, "output_compression", None),
    ({"partial_images": 4}, "partial_images", None),
    ({"user": "u" * 257}, "user", None),
    ({"request_id": "../../etc/passwd"}, "request_id", None),
    ({"request_id": "x" * 129}, "request_id", None),
])
def test_limits_answer_400_naming_the_param(live_client: Any, fields: dict[str, Any], param: str,
                                           code: str | None) -> None:
    error = assert_openai_error(_post(live_client, **fields), 400, param=param, code=code)
    assert error["type"] == "invalid_request_error"


def test_limit_messages_say_what_is_allowed(live_client: Any) -> None:
    assert "FLUX_MAX_PIXELS" in _post(live_client, size="256x128").json()["error"]["message"]
    assert str(LIMITS["max_steps"]) in _post(live_client, num_inference_steps=99).json()["error"]["message"]
    assert str(LIMITS["max_images_per_request"]) in _post(live_client, n=9).json()["error"]["message"]
    assert "between 64 and 256" in _post(live_client, size="512x64").json()["error"]["message"]


def _image_size(item: dict[str, Any]) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size


@pytest.mark.parametrize("fields", [
    {"prompt": "y" * LIMITS["max_prompt_chars"]},
    {"seed": MAX_SEED, "n": LIMITS["max_images_per_request"]},  # seeds wrap around, never overflow
    {"seed": 0},
    {"moderation": "low"},
    {"moderation": "auto"},
    {"num_inference_steps": LIMITS["max_steps"]},
    {"guidance_scale": LIMITS["max_guidance"]},
    {"guidance_scale": 0},
    {"size": "128x128"},                                         # exactly the pixel budget
    {"size": None, "width": 64, "height": 64},
])
def test_values_at_the_limits_are_accepted(live_client: Any, fields: dict[str, Any]) -> None:
    response = _post(live_client, **fields)
    assert response.status_code == 200, response.text[:400]
    data = response.json()["data"]
    for item in data:
        assert 0 <= item["seed"] <= MAX_SEED
        assert _image_size(item) == (item["params"]["width"], item["params"]["height"])
    if fields.get("seed") == MAX_SEED:
        assert [item["seed"] for item in data] == [MAX_SEED, 0]


def _chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/octet-stream"])
def test_body_over_the_limit_is_413_with_or_without_content_length(live_client: Any, content_type: str) -> None:
    big = json.dumps({"prompt": "x" * LIMITS["max_body_bytes"]}).encode()
    declared = live_client.post(GEN, content=big, headers={"Content-Type": content_type})
    assert_openai_error(declared, 413, code="request_too_large")
    assert "FLUX_MAX_BODY_BYTES" in declared.json()["error"]["message"]
    chunked = live_client.post(GEN, content=_chunks(LIMITS["max_body_bytes"] * 3),
                               headers={"Content-Type": content_type})
    assert "content-length" not in chunked.request.headers
    assert_openai_error(chunked, 413, code="request_too_large")


def test_body_just_under_the_limit_is_read(live_client: Any) -> None:
    body = json.dumps({**OK, "prompt": "x", "padding": "p" * (LIMITS["max_body_bytes"] - 200)}).encode()
    assert len(body) <= LIMITS["max_body_bytes"]
    assert live_client.post(GEN, content=body, headers={"Content-Type": "application/json"}).status_code == 200


@pytest.mark.parametrize(("content", "headers"), [
    (b'{"prompt": "x",', {"Content-Type": "application/json"}),
    (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}),
    (b'{"prompt": "x"}', {}),
    (b"", {"Content-Type": "application/json"}),
    (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}),
])
def test_malformed_json_and_wrong_content_type_are_400(live_client: Any, content: bytes,
                                                       headers: dict[str, str]) -> None:
    error = assert_openai_error(live_client.post(GEN, content=content, headers=headers), 400)
    assert "None" not in error["message"]
