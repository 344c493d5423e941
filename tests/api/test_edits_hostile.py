"""A table of hostile and awkward edit requests: each bad one gets a 400 (413 for the body) in OpenAI's error
shape naming the field; awkward but valid images (CMYK, palette, 16-bit, EXIF-rotated, transparent) are
converted and edited. The server stays ready and keeps serving afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.models.registry import BUILTIN_MODELS
from tests.security.helpers import assert_openai_error

TINY_KEYS = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]
"""Requests may name every tiny model here (FLUX_MODELS)."""

pytestmark = pytest.mark.asyncio(loop_scope="module")

EDIT = "/v1/images/edits"
LIMITS = {"max_input_bytes": 100_000, "max_input_pixels": 256 * 256, "max_edit_body_bytes": 1_000_000,
          "max_images_per_request": 2, "max_steps": 4}


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    blocks = np.random.default_rng(seed).integers(0, 255, (height // 8 + 1, width // 8 + 1, 3))
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)[:height, :width])


def mask(width: int = 64, height: int = 64, *, transparent: bool = True) -> bytes:
    alpha = np.full((height, width), 255, np.uint8)
    if transparent:
        alpha[:, : width // 2] = 0
    return encode(Image.fromarray(np.dstack([np.zeros((height, width, 3), np.uint8), alpha]), "RGBA"))


def bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    image = rgb(64, 32)
    exif = image.getexif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to display
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def sixteen_bit() -> bytes:
    return encode(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)))


def transparent_rgba() -> bytes:
    pixels = np.asarray(rgb().convert("RGBA")).copy()
    pixels[:32, :, 3] = 0
    return encode(Image.fromarray(pixels, "RGBA"))


PNG = encode(rgb())
Files = list[tuple[str, tuple[str, bytes, str]]]


def files(*images: bytes, mask_file: bytes | None = None, field: str = "image") -> Files:
    parts: Files = [(field, (f"in{i}.png", data, "image/png")) for i, data in enumerate(images)]
    if mask_file is not None:
        parts.append(("mask", ("mask.png", mask_file, "image/png")))
    return parts


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


FIELDS = {"prompt": "a red barn", "num_inference_steps": "2", "size": "64x64"}
JSON_FIELDS = {"prompt": "a red barn", "num_inference_steps": 2, "size": "64x64"}
Case = tuple[Callable[[], dict[str, Any]], int, str | None, str | None]
"""(request kwargs for httpx, status, param, code); status 200 = accepted and converted."""

CASES: dict[str, Case] = {
    # the image itself
    "not an image": (lambda: {"files": files(b"hello, I am text"), "data": FIELDS}, 400, "image", "invalid_image"),
    "pdf bytes": (lambda: {"files": files(b"%PDF-1.7\n%\xe2\xe3"), "data": FIELDS}, 400, "image", "invalid_image"),
    "gif": (lambda: {"files": files(encode(rgb(), "GIF")), "data": FIELDS}, 400, "image", "invalid_image"),
    "empty file": (lambda: {"files": files(b""), "data": FIELDS}, 400, "image", "invalid_image"),
    "truncated png": (lambda: {"files": files(PNG[: len(PNG) // 2]), "data": FIELDS}, 400, "image", "invalid_image"),
    "decompression bomb": (lambda: {"files": files(bomb(40_000, 40_000)), "data": FIELDS}, 400, "image",
                           "image_too_large"),
    "over FLUX_MAX_INPUT_PIXELS": (lambda: {"files": files(bomb(300, 300)), "data": FIELDS}, 400, "image",
                                   "image_too_large"),
    "over FLUX_MAX_INPUT_BYTES": (lambda: {"files": files(b"\x89PNG" + b"\x00" * 150_000), "data": FIELDS}, 400,
                                  "image", "image_too_large"),
    "second image bad": (lambda: {"files": files(PNG, b"nope"), "data": {**FIELDS, "model": "tiny-qwen-edit"}},
                         400, "image[1]", "invalid_image"),
    "no image": (lambda: {"files": [("other", ("x.txt", b"x", "text/plain"))], "data": FIELDS}, 400, "other",
                 "invalid_value"),
    "only a mask": (lambda: {"files": files(mask_file=mask()), "data": FIELDS}, 400, "image",
                    "missing_required_parameter"),
    "image as text": (lambda: {"data": {**FIELDS, "image": "not a file"}, "files": files(PNG)}, 400, "image",
                      "invalid_image"),
    # how many
    "two images for FLUX.1": (lambda: {"files": files(PNG, PNG, field="image[]"), "data": FIELDS}, 400, "image",
                              "too_many_images"),
    "two images for Kontext": (lambda: {"files": files(PNG, PNG, field="image[]"),
                                        "data": {**FIELDS, "model": "tiny-kontext"}}, 400, "image", "too_many_images"),
    "17 images": (lambda: {"files": files(*[PNG] * 17, field="image[]"), "data": FIELDS}, 400, "image", None),
    # the mask
    "mask of another size": (lambda: {"files": files(PNG, mask_file=mask(32, 64)), "data": FIELDS}, 400, "mask",
                             "invalid_mask"),
    "mask without alpha": (lambda: {"files": files(PNG, mask_file=PNG), "data": FIELDS}, 400, "mask", "invalid_mask"),
    "empty mask": (lambda: {"files": files(PNG, mask_file=mask(transparent=False)), "data": FIELDS}, 400, "mask",
                   "empty_mask"),
    "mask not an image": (lambda: {"files": files(PNG, mask_file=b"GIF89a"), "data": FIELDS}, 400, "mask",
                          "invalid_image"),
    # fields
    "input_fidelity medium": (lambda: {"files": files(PNG), "data": {**FIELDS, "input_fidelity": "medium"}}, 400,
                              "input_fidelity", "invalid_value"),
    "input_fidelity low on Kontext": (lambda: {"files": files(PNG), "data": {
        **FIELDS, "model": "tiny-kontext", "input_fidelity": "low"}}, 400, "input_fidelity", "unsupported_value"),
    "strength 1.5": (lambda: {"files": files(PNG), "data": {**FIELDS, "strength": "1.5"}}, 400, "strength",
                     "invalid_value"),
    "strength text": (lambda: {"files": files(PNG), "data": {**FIELDS, "strength": "lots"}}, 400, "strength",
                      "invalid_value"),
    "strength leaves no step": (lambda: {"files": files(PNG), "data": {**FIELDS, "strength": "0.2"}}, 400,
                                "strength", "invalid_value"),
    "strength on an instruction edit": (lambda: {"files": files(PNG), "data": {
        **FIELDS, "model": "tiny-kontext", "strength": "0.5"}}, 400, "strength", "unsupported_value"),
    "background transparent": (lambda: {"files": files(PNG), "data": {**FIELDS, "background": "transparent"}}, 400,
                               "background", "unsupported_value"),
    "prompt missing": (lambda: {"files": files(PNG), "data": {"size": "64x64"}}, 400, "prompt",
                       "missing_required_parameter"),
    "n 99": (lambda: {"files": files(PNG), "data": {**FIELDS, "n": "99"}}, 400, "n", "invalid_value"),
    "size 65x64": (lambda: {"files": files(PNG), "data": {**FIELDS, "size": "65x64"}}, 400, "size", "invalid_size"),
    "steps 50": (lambda: {"files": files(PNG), "data": {**FIELDS, "num_inference_steps": "50"}}, 400,
                 "num_inference_steps", "invalid_value"),
    "stream maybe": (lambda: {"files": files(PNG), "data": {**FIELDS, "stream": "maybe"}}, 400, "stream",
                     "invalid_value"),
    "unknown model": (lambda: {"files": files(PNG), "data": {**FIELDS, "model": "nope"}}, 404, "model",
                      "model_not_found"),
    # JSON bodies
    "json remote url": (lambda: {"json": {**JSON_FIELDS, "image": "https://example.com/cat.png"}}, 400, "image",
                        "unsupported_url"),
    "json local file url": (lambda: {"json": {**JSON_FIELDS, "image": "file:///etc/passwd"}}, 400, "image",
                            "unsupported_url"),
    "json not base64": (lambda: {"json": {**JSON_FIELDS, "image": "data:image/png;base64,!!!"}}, 400, "image",
                        "invalid_image"),
    "json file id": (lambda: {"json": {**JSON_FIELDS, "images": [{"file_id": "file-123"}]}}, 400, "images",
                     "invalid_image"),
    "json strength NaN": (lambda: {"content": b'{"prompt": "a", "strength": NaN}',
                                   "headers": {"content-type": "application/json"}}, 400, None, "invalid_json"),
    "json mask wrong type": (lambda: {"json": {**JSON_FIELDS, "image": url(PNG), "mask": 5}}, 400, "mask",
                             "invalid_value"),
    "text/plain body": (lambda: {"content": b"prompt=a", "headers": {"content-type": "text/plain"}}, 400, None,
                        "unsupported_media_type"),
    "body over FLUX_MAX_EDIT_BODY_BYTES": (lambda: {"files": files(b"\x00" * 1_100_000), "data": FIELDS}, 413, None,
                                           "request_too_large"),
    # awkward but valid: converted, then edited
    "cmyk jpeg": (lambda: {"files": files(encode(rgb().convert("CMYK"), "JPEG")), "data": FIELDS}, 200, None, None),
    "palette png": (lambda: {"files": files(encode(rgb().convert("P"))), "data": FIELDS}, 200, None, None),
    "16-bit png": (lambda: {"files": files(sixteen_bit()), "data": FIELDS}, 200, None, None),
    "exif-rotated jpeg": (lambda: {"files": files(exif_rotated()), "data": {**FIELDS, "size": "auto"}}, 200, None,
                          None),
    "transparent png": (lambda: {"files": files(transparent_rgba()), "data": FIELDS}, 200, None, None),
    "grayscale webp": (lambda: {"files": files(encode(rgb().convert("L"), "WEBP")), "data": FIELDS}, 200, None, None),
    "json data url": (lambda: {"json": {**JSON_FIELDS, "image": url(PNG), "mask": url(mask())}}, 200, None, None),
}


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("out"),
                        device="cpu", warmup_sizes=["64x64"], preload_models=["tiny-kontext"], models=TINY_KEYS,
                        store_local=False,
                        _env_file=None, **LIMITS)  # type: ignore[call-arg, arg-type]
    async with running_app(settings) as c:
        yield c


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_edit_request(client: Any, name: str) -> None:
    make, status, param, code = CASES[name]
    kwargs = make()
    if kwargs.get("files") is None:
        kwargs.pop("files", None)
    response = await client.post(EDIT, **kwargs)
    if status == 200:
        assert response.status_code == 200, response.text[:400]
        return
    error = assert_openai_error(response, status, param=param, code=code)
    assert "Traceback" not in error["message"] and "/work" not in error["message"]


async def test_converted_inputs_look_like_their_source(client: Any) -> None:
    """The EXIF-rotated JPEG is edited upright: size "auto" follows the displayed (portrait) orientation."""
    response = await client.post(EDIT, files=files(exif_rotated()), data={**FIELDS, "size": "auto"})
    width, height = (int(v) for v in response.json()["size"].split("x"))
    assert height > width


async def test_still_ready_after_the_table(client: Any) -> None:
    assert (await client.get("/ready")).status_code == 200
    response = await client.post(EDIT, files=files(PNG), data=FIELDS)
    assert response.status_code == 200
