"""Smaller holes, each with OpenAI's error shape: too many multipart parts has a code; a mask sent to
/v1/images/variations is refused (OpenAI's variations take none) instead of silently ignored; a full output
directory is a warning on /ready, not a 503, since generation goes on (saves answer ``save_error``).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from .helpers import assert_openai_error


def _png(alpha: bool = False) -> bytes:
    pixels = np.full((64, 64, 4 if alpha else 3), 200, np.uint8)
    if alpha:
        pixels[:, :32, 3] = 0  # a mask: its transparent half may change
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA" if alpha else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


PNG, MASK = _png(), _png(alpha=True)


def test_too_many_multipart_parts_is_a_400_with_a_code(live_client: TestClient) -> None:
    files = [("image[]", (f"in{i}.png", PNG, "image/png")) for i in range(20)]  # 20 file parts: over 18
    response = live_client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    error = assert_openai_error(response, 400, code="invalid_multipart")
    assert "Maximum number of files is 18" in error["message"]


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_a_mask_sent_to_variations_is_refused(live_client: TestClient, form: str) -> None:
    import base64

    if form == "multipart":  # the SDKs' form
        response = live_client.post("/v1/images/variations", data={"num_inference_steps": "2"},
                                    files={"image": ("in.png", PNG, "image/png"), "mask": ("m.png", MASK, "image/png")})
    else:
        def url(data: bytes) -> str:
            return "data:image/png;base64," + base64.b64encode(data).decode()
        response = live_client.post("/v1/images/variations",
                                    json={"image": url(PNG), "mask": url(MASK), "num_inference_steps": 2})
    error = assert_openai_error(response, 400, param="mask", code="unsupported_value")
    assert "edits endpoint" in error["message"]
    without = live_client.post("/v1/images/variations", data={"num_inference_steps": "2"},
                               files={"image": ("in.png", PNG, "image/png")})
    assert without.status_code == 200, without.text[:300]


async def test_a_full_output_directory_is_a_warning_not_a_503(make_settings: Callable[..., Any]) -> None:
    from tests.conftest import running_app

    settings = make_settings(store_local=True, output_max_bytes=4096)
    settings.output_dir.mkdir(parents=True)
    (settings.output_dir / "earlier.png").write_bytes(b"\0" * 8192)  # the quota is already spent
    async with running_app(settings, ready=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert await asyncio.to_thread(runtime.wait_started, 120)
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["warnings"] == ["output directory is full: FLUX_OUTPUT_MAX_BYTES=4096 reached"]
        response = await client.post("/v1/images/generations",
                                     json={"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1})
        assert response.status_code == 200, response.text[:300]
        item = response.json()["data"][0]
        assert item["b64_json"] and item["save_error"] == "output_dir_full"
