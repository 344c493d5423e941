"""Decoding uploaded images: formats, limits, conversions and the mask rules (no model, no server)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxserve.storage.inputs import (
    InputError,
    decode_data_url,
    decode_image,
    inputs_digest,
    mask_from,
    resize_mask,
)

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 512 * 512}


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 32, height: int = 16) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=2).round().astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width × height, then one tiny IDAT: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_rgb_png_round_trips_exactly() -> None:
    pixels = gradient()
    decoded = decode_image(encode(Image.fromarray(pixels)), "image", **LIMITS)
    assert decoded.size == (32, 16) and decoded.alpha is None and decoded.format == "PNG"
    assert np.array_equal(decoded.rgb, pixels)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95), "image", **LIMITS)
    assert decoded.rgb.shape == (16, 32, 3)
    assert np.abs(decoded.rgb.astype(int) - gradient().astype(int)).mean() < 12  # JPEG loss, not inverted colours


def test_palette_png_keeps_its_colours() -> None:
    palette = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    decoded = decode_image(encode(palette), "image", **LIMITS)
    assert np.array_equal(decoded.rgb, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_grayscale_keeps_the_high_byte() -> None:
    values = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(values)), "image", **LIMITS)
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    assert np.abs(decoded.rgb[..., 0].astype(int) - expected).max() <= 1  # not clipped at 255
    assert decoded.rgb[..., 0].max() == 255 and decoded.rgb[..., 0].min() == 0


def test_exif_orientation_is_applied() -> None:
    pixels = gradient(32, 16)  # landscape as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()), "image", **LIMITS)
    assert decoded.size == (16, 32)  # shown upright: portrait
    assert np.abs(decoded.rgb.astype(int) - np.rot90(pixels, k=-1).astype(int)).mean() < 6


def test_transparency_is_composited_over_white() -> None:
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 0      # left half fully transparent
    rgba[:, 16:, 3] = 255    # right half opaque red-ish
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA")), "image", **LIMITS)
    assert decoded.alpha is not None
    assert (decoded.rgb[:, :16] == 255).all()
    assert (decoded.rgb[:, 16:] == [200, 0, 0]).all()


def test_webp_is_accepted_and_gif_is_not() -> None:
    assert decode_image(encode(Image.fromarray(gradient()), "WEBP", lossless=True), "image", **LIMITS).format == "WEBP"
    with pytest.raises(InputError) as refused:
        decode_image(encode(Image.fromarray(gradient()), "GIF"), "image[2]", **LIMITS)
    assert refused.value.param == "image[2]" and "PNG, JPEG or WebP" in refused.value.message


@pytest.mark.parametrize(("data", "code", "words"), [
    (b"", "invalid_image", "empty"),
    (b"GIF89a not really", "invalid_image", "not a PNG"),
    (b"%PDF-1.4 hello", "invalid_image", "not a PNG"),
    (png_header_only(50_000, 50_000), "image_too_large", "FLUX_MAX_INPUT_PIXELS"),
    (png_header_only(600, 600), "image_too_large", "FLUX_MAX_INPUT_PIXELS"),
    (b"\x89PNG" + b"\x00" * 2_000_000, "image_too_large", "FLUX_MAX_INPUT_BYTES"),
])
def test_bad_files_name_the_field(data: bytes, code: str, words: str) -> None:
    with pytest.raises(InputError) as refused:
        decode_image(data, "image[1]", **LIMITS)
    assert refused.value.param == "image[1]" and refused.value.code == code
    assert words in refused.value.message


def test_truncated_file_is_refused_not_half_decoded() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    with pytest.raises(InputError) as refused:
        decode_image(data[: len(data) // 2], "image", **LIMITS)
    assert refused.value.param == "image" and "truncated" in refused.value.message


def test_mask_rules() -> None:
    rgba = np.full((16, 32, 4), 255, np.uint8)
    rgba[4:8, 4:8, 3] = 0
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA")), "mask", **LIMITS)
    mask = mask_from(decoded, (32, 16))
    assert mask.dtype == np.uint8 and mask[4:8, 4:8].min() == 255 and mask.sum() == 16 * 255
    with pytest.raises(InputError, match="same size") as other_size:
        mask_from(decoded, (64, 16))
    assert other_size.value.param == "mask"
    opaque = decode_image(encode(Image.fromarray(np.full((16, 32, 4), 255, np.uint8), "RGBA")), "mask", **LIMITS)
    with pytest.raises(InputError, match="no transparent pixels") as empty:
        mask_from(opaque, (32, 16))
    assert empty.value.code == "empty_mask"
    rgb = decode_image(encode(Image.fromarray(gradient())), "mask", **LIMITS)
    with pytest.raises(InputError, match="alpha channel"):
        mask_from(rgb, (32, 16))
    assert resize_mask(mask, 64, 32).shape == (32, 64)


def test_data_urls() -> None:
    data = encode(Image.fromarray(gradient()))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url, "image", 1_000_000) == data
    for bad, code in (("https://example.com/cat.png", "unsupported_url"), ("file:///etc/passwd", "unsupported_url"),
                      ("data:image/png,rawbytes", "invalid_image"), ("data:image/png;base64,@@@@", "invalid_image"),
                      ("just text", "invalid_image")):
        with pytest.raises(InputError) as refused:
            decode_data_url(bad, "image[3]", 1_000_000)
        assert refused.value.param == "image[3]" and refused.value.code == code
    with pytest.raises(InputError) as too_big:
        decode_data_url("data:image/png;base64," + "A" * 2_000_000, "mask", 1_000_000)
    assert too_big.value.code == "image_too_large"


def test_inputs_digest_tells_inputs_apart() -> None:
    a = gradient()
    b = a.copy()
    b[0, 0, 0] ^= 1
    mask = np.zeros((16, 32), np.uint8)
    assert inputs_digest([a], None) == inputs_digest([a.copy()], None)
    assert inputs_digest([a], None) != inputs_digest([b], None)
    assert inputs_digest([a], None) != inputs_digest([a], mask)
    assert inputs_digest([a, b], None) != inputs_digest([b, a], None)
