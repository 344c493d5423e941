"""In-process tests of POST /v1/images/generations: fields, defaults, bounds and errors."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.asyncio(loop_scope="module")

BAD_INPUTS: list[tuple[dict[str, Any], str | None, str]] = [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": "   "}, "prompt", "invalid_value"),
    ({"prompt": 12}, "prompt", "invalid_value"),
    ({"prompt": "x" * 5000}, "prompt", "prompt_too_long"),
    ({"prompt": "a\x00b"}, "prompt", "invalid_value"),
    ({"prompt": "a", "n": 0}, "n", "invalid_value"),
    ({"prompt": "a", "n": 99}, "n", "invalid_value"),
    ({"prompt": "a", "n": "two"}, "n", "invalid_value"),
    ({"prompt": "a", "size": "big"}, "size", "invalid_size"),
    ({"prompt": "a", "size": "65x64"}, "size", "invalid_size"),
    ({"prompt": "a", "size": "16x16"}, "size", "invalid_size"),
    ({"prompt": "a", "size": "4096x4096"}, "size", "invalid_size"),
    ({"prompt": "a", "size": "64x64", "width": 128}, "size", "conflicting_size"),
    ({"prompt": "a", "width": 100}, "width", "invalid_size"),
    ({"prompt": "a", "height": -64}, "height", "invalid_value"),
    ({"prompt": "a", "response_format": "gif"}, "response_format", "invalid_value"),
    ({"prompt": "a", "output_format": "bmp"}, "output_format", "invalid_value"),
    ({"prompt": "a", "output_compression": 101}, "output_compression", "invalid_value"),
    ({"prompt": "a", "quality": "ultra"}, "quality", "invalid_value"),
    ({"prompt": "a", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "a", "seed": 2**63}, "seed", "invalid_value"),
    ({"prompt": "a", "seed": "abc"}, "seed", "invalid_value"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
    ({"prompt": "a", "num_inference_steps": 1000}, "num_inference_steps", "invalid_value"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale", "invalid_value"),
    ({"prompt": "a", "guidance_scale": 1e9}, "guidance_scale", "invalid_value"),
    ({"prompt": "a", "max_sequence_length": 4096}, "max_sequence_length", "invalid_value"),
    ({"prompt": "a", "request_id": "../../etc"}, "request_id", "invalid_value"),
    ({"prompt": "a", "store_local": "maybe"}, "store_local", "invalid_value"),
    ({"prompt": "a", "partial_images": 9}, "partial_images", "invalid_value"),
]


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    out = tmp_path_factory.mktemp("outputs")
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=out, device="cpu",  # type: ignore[call-arg]
                        warmup_sizes=["64x64"], preload_models=["tiny-qwen"], store_local=False, hub_downloads="off",
                        _env_file=None)
    async with running_app(settings) as c:
        c.output_dir = out  # type: ignore[attr-defined]
        yield c


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _max_pixel_diff(a: str, b: str) -> int:
    return int(np.abs(np.asarray(_png(a), dtype=int) - np.asarray(_png(b), dtype=int)).max())


@pytest.mark.parametrize(("body", "param", "code"), BAD_INPUTS, ids=[json.dumps(b)[:40] for b, _, _ in BAD_INPUTS])
async def test_bad_input_is_a_400_naming_the_param(client: Any, body: dict[str, Any], param: str | None,
                                                   code: str) -> None:
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"]


async def test_malformed_json_and_wrong_content_type(client: Any) -> None:
    response = await client.post("/v1/images/generations", content=b"{bad json",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    response = await client.post("/v1/images/generations", content=b"prompt=a",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


async def test_unknown_model_is_404(client: Any) -> None:
    response = await client.post("/v1/images/generations", json={"prompt": "a", "model": "nope"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.json()["error"]["param"] == "model"
    # hub repos and paths need FLUX_ALLOW_ANY_MODEL
    response = await client.post("/v1/images/generations", json={"prompt": "a", "model": "someone/some-model"})
    assert response.status_code == 404


async def test_defaults(client: Any) -> None:
    response = await client.post("/v1/images/generations", json={"prompt": "a red fox"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_format"] == "png" and body["size"] == "128x128" and body["quality"] == "auto"
    (item,) = body["data"]
    image = _png(item["b64_json"])
    assert image.size == (128, 128)
    assert item["model_key"] == "tiny-flux" and item["device"] == "cpu" and item["dtype"] == "float32"
    assert item["params"]["num_inference_steps"] == 4
    assert item["params"]["fallback_applied"] is False
    assert 0 <= item["seed"] < 2**53  # a random seed JavaScript reads exactly
    assert "saved_path" not in item  # FLUX_STORE_LOCAL=0 here
    assert response.headers["x-job-id"] == item["job_id"] == item["request_id"]  # no label sent: the job id
    assert item["job_id"].startswith("img_") and len(item["job_id"]) == 36
    for stage in ("queue_wait", "text_encode", "denoise", "vae_decode", "image_encode", "save", "total",
                  "pipeline_load", "generation", "encode"):
        assert stage in item["timing"]


async def test_no_seed_means_a_fresh_seed_each_time(client: Any) -> None:
    seeds = set()
    for _ in range(3):
        response = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64",
                                                                     "num_inference_steps": 1})
        seeds.add(response.json()["data"][0]["seed"])
    assert len(seeds) == 3


async def test_n_images_get_consecutive_seeds_reproducible_alone(client: Any) -> None:
    body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "n": 3, "seed": 100}
    response = await client.post("/v1/images/generations", json=body)
    items = response.json()["data"]
    assert [i["seed"] for i in items] == [100, 101, 102]
    alone = await client.post("/v1/images/generations", json={**body, "n": 1, "seed": 101})
    # Same image up to float rounding: CPU kernels may sum in another order for another batch size.
    assert _max_pixel_diff(alone.json()["data"][0]["b64_json"], items[1]["b64_json"]) <= 2
    assert _max_pixel_diff(items[0]["b64_json"], items[1]["b64_json"]) > 20


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
async def test_output_formats(client: Any, fmt: str, magic: bytes) -> None:
    response = await client.post("/v1/images/generations", json={
        "prompt": "a", "size": "64x64", "num_inference_steps": 1, "output_format": fmt, "output_compression": 50})
    assert response.status_code == 200
    assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(magic)
    assert response.json()["output_format"] == fmt
    # PNG is lossless (its level is FLUX_PNG_COMPRESS_LEVEL): output_compression is reported as ignored there
    assert ("output_compression" in response.json()["ignored_fields"]) is (fmt == "png")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
async def test_output_compression_applies_to_lossy_formats(client: Any, fmt: str) -> None:
    sizes = []
    for compression in (5, 95):
        response = await client.post("/v1/images/generations", json={
            "prompt": "a", "size": "128x128", "num_inference_steps": 1, "seed": 3, "output_format": fmt,
            "output_compression": compression})
        sizes.append(len(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert sizes[1] < sizes[0]  # higher is smaller, as OpenAI's


async def test_quality_maps_to_presets_and_steps_override(client: Any) -> None:
    low = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "quality": "low"})
    assert low.json()["data"][0]["params"]["num_inference_steps"] == 2
    explicit = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "quality": "high",
                                                                  "num_inference_steps": 3})
    assert explicit.json()["data"][0]["params"]["num_inference_steps"] == 3


async def test_openai_only_fields_are_accepted_and_reported_ignored(client: Any) -> None:
    response = await client.post("/v1/images/generations", json={
        "prompt": "a", "size": "64x64", "num_inference_steps": 1, "style": "vivid", "background": "opaque",
        "moderation": "low", "some_future_field": 1, "user": "u-1"})
    assert response.status_code == 200
    # background is honoured (the image is opaque), so it is not listed as ignored
    assert set(response.json()["ignored_fields"]) == {"style", "moderation", "some_future_field"}
    assert response.json()["background"] == "opaque"


async def test_earlier_server_request_shape(client: Any) -> None:
    """The earlier web client's body, unchanged: height/width, steps, guidance, seed, store_local, metadata."""
    body = {"prompt": "a cat", "height": 64, "width": 128, "num_inference_steps": 2, "guidance_scale": 3.5,
            "max_sequence_length": 256, "seed": 42, "store_local": True, "write_metadata": True,
            "request_id": "web-123"}
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["params"] == {**item["params"], "height": 64, "width": 128, "num_inference_steps": 2,
                              "guidance_scale": 3.5, "max_sequence_length": 256, "seed": 42}
    assert item["request_id"] == "web-123"
    assert not Path(item["saved_path"]).is_absolute()  # relative to the output directory
    saved = client.output_dir / item["saved_path"]
    assert saved.is_file() and client.output_dir in saved.parents
    meta = json.loads((client.output_dir / item["metadata_path"]).read_text())
    assert meta["prompt"] == "a cat" and meta["seed"] == 42 and meta["params"]["width"] == 128
    assert meta["model_key"] == "tiny-flux" and "timing" in meta and meta["device"] == "cpu"
    assert _png(item["b64_json"]).size == (128, 64)
    assert saved.read_bytes() == base64.b64decode(item["b64_json"])


async def test_two_saves_in_the_same_second_keep_both(client: Any) -> None:
    body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "store_local": True, "n": 2, "seed": 1}
    response = await client.post("/v1/images/generations", json=body)
    paths = {i["saved_path"] for i in response.json()["data"]}
    assert len(paths) == 2 and all((client.output_dir / p).is_file() for p in paths)


async def test_url_response_format(client: Any) -> None:
    response = await client.post("/v1/images/generations", json={
        "prompt": "a", "size": "64x64", "num_inference_steps": 1, "response_format": "url", "seed": 5})
    item = response.json()["data"][0]
    assert "b64_json" not in item
    assert item["url"].startswith("http://testserver/v1/images/files/file_")
    image = await client.get(item["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert _png(base64.b64encode(image.content).decode()).size == (64, 64)
    missing = await client.get("/v1/images/files/file_" + "A" * 32 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
    traversal = await client.get("/v1/images/files/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code == 404


async def test_qwen_takes_true_cfg_and_negative_prompt(client: Any) -> None:
    body = {"prompt": "a sign that says hi", "model": "tiny-qwen", "size": "64x64", "num_inference_steps": 2,
            "seed": 3}
    plain = await client.post("/v1/images/generations", json=body)
    assert plain.status_code == 200, plain.text
    assert plain.json()["data"][0]["params"]["guidance_scale"] == 4.0
    negative = await client.post("/v1/images/generations", json={**body, "negative_prompt": "blurry"})
    assert negative.json()["data"][0]["b64_json"] != plain.json()["data"][0]["b64_json"]
    via_true_cfg = await client.post("/v1/images/generations", json={**body, "true_cfg_scale": 4.0})
    assert via_true_cfg.json()["data"][0]["b64_json"] == plain.json()["data"][0]["b64_json"]


async def test_validation_errors_never_are_422(client: Any) -> None:
    for path, body in (("/v1/models/select", {}), ("/v1/images/cancel", {"request_id": 5}),
                       ("/v1/tokenize", {"prompt": 1})):
        response = await client.post(path, json=body)
        assert response.status_code == 400, (path, response.text)


async def test_openapi_documents_fields_and_errors(client: Any) -> None:
    schema = (await client.get("/openapi.json")).json()
    request_schema = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    for field in ("prompt", "n", "size", "response_format", "seed", "num_inference_steps", "store_local"):
        assert request_schema[field].get("description"), field
    responses = schema["paths"]["/v1/images/generations"]["post"]["responses"]
    for status in ("400", "404", "429", "503", "504"):
        assert status in responses
    assert (await client.get("/docs")).status_code == 200


async def test_unknown_route_is_openai_shaped_404(client: Any) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"

