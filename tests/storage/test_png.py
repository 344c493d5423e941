"""The parallel PNG encoder: valid files (chunk CRCs, one zlib stream with its Adler-32) whose decoded
pixels are exactly the input, for every mode, size, band count, filter, deflater and level."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxserve.storage import png
from fluxserve.storage.images import encode_image
from fluxserve.storage.png import adler32_combine, encode_png

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _images(height: int, width: int, channels: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(height * 1000 + width + channels)
    noise = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x * 3 + y + c * 40) % 256 for c in range(channels)], axis=-1).astype(np.uint8)
    flat = np.full((height, width, channels), 200, dtype=np.uint8)
    return {"noise": noise, "smooth": smooth, "flat": flat}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        pos += 12 + length
    return out


def _decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


def test_adler32_combine_matches_zlib() -> None:
    rng = np.random.default_rng(1)
    for len_a, len_b in [(0, 5), (1, 1), (1000, 70000), (65521, 65521 * 3 + 7), (300000, 1)]:
        a, b = rng.bytes(len_a), rng.bytes(len_b)
        assert adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5), (64, 64), (129, 77), (300, 257)])
def test_round_trip_exact_for_modes_and_sizes(channels: int, shape: tuple[int, int]) -> None:
    for name, pixels in _images(*shape, channels).items():
        for bands in (1, 2, 3, 16):
            data = encode_png(pixels, bands=bands)
            decoded = _decode(data)
            assert Image.open(io.BytesIO(data)).mode == MODES[channels]
            expected = pixels[:, :, 0] if channels == 1 else pixels
            assert np.array_equal(decoded, expected), (name, bands)


@pytest.mark.parametrize("filters", ["auto", "none", "sub", "up", "paeth"])
@pytest.mark.parametrize("deflater", ["isal", "zlib"])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_round_trip_exact_for_filters_deflaters_levels(filters: png.FilterChoice, deflater: png.Deflater,
                                                       level: int) -> None:
    for name, pixels in _images(203, 181, 3).items():
        for bands in (1, 5):
            data = encode_png(pixels, level=level, bands=bands, filters=filters, deflater=deflater)
            assert np.array_equal(_decode(data), pixels), (name, bands)


def test_one_valid_zlib_stream_across_bands() -> None:
    pixels = _images(500, 400, 3)["smooth"]
    data = encode_png(pixels, bands=7)
    chunks = _chunks(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    stream = b"".join(body for kind, body in chunks if kind == b"IDAT")
    inflater = zlib.decompressobj()  # checks the zlib header and the Adler-32 trailer
    raw = inflater.decompress(stream)
    assert inflater.eof and not inflater.unused_data
    assert len(raw) == 500 * (400 * 3 + 1)
    assert set(raw[:: 400 * 3 + 1]) <= {0, 1, 2, 4}  # a legal filter byte leads every row


def test_bands_keep_the_file_as_small_as_one_band() -> None:
    # the previous band's tail primes each band's window, so splitting costs only a few bytes per band
    pixels = np.tile(_images(32, 512, 3)["noise"], (16, 1, 1))  # repeats every 32 rows
    one, many = encode_png(pixels, bands=1), encode_png(pixels, bands=8)
    assert len(many) < len(one) * 1.05


def test_rejects_what_png_cannot_hold() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="level"):
        encode_png(np.zeros((4, 4, 3), dtype=np.uint8), level=10)


@pytest.mark.parametrize("compression", [None, 0, 50, 100])
def test_encode_image_png_matches_pil_pixels(compression: int | None) -> None:
    pixels = _images(96, 80, 3)["noise"]
    fast = encode_image(pixels, "png", compression=compression)
    slow = encode_image(pixels, "png", compression=compression, png_encoder="pil")
    assert fast != slow  # really two encoders
    assert np.array_equal(_decode(fast), pixels) and np.array_equal(_decode(slow), pixels)
