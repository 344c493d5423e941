"""Image encoding: uint8 pixels → PNG / JPEG / WebP bytes (CPU work, run off the GPU's critical path)."""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from PIL import Image

from fluxserve.storage.png import encode_png

OutputFormat = Literal["png", "jpeg", "webp"]
PngEncoder = Literal["parallel", "pil"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(pixels: np.ndarray, fmt: OutputFormat = "png", *, compression: int | None = None,
                 png_level: int = 1, png_encoder: PngEncoder = "parallel") -> bytes:
    """Encode an [H, W, 3] uint8 array.

    ``compression`` is OpenAI's ``output_compression`` (0–100, higher = smaller file): for JPEG/WebP it
    maps to quality ``100 - compression``; for PNG it maps onto zlib levels 0–9. Without it PNG uses
    ``png_level`` (FLUX_PNG_COMPRESS_LEVEL) and JPEG/WebP quality 90.

    PNG goes through :func:`fluxserve.storage.png.encode_png` (bands deflated in parallel, ISA-L when
    installed: about 20x faster than PIL on a 1024² noise image, the same decoded pixels); PIL's encoder
    stays for ``png_encoder="pil"`` and for arrays the fast encoder does not take (not uint8, odd shapes).
    """
    if fmt == "png":
        level = png_level if compression is None else min(9, round(compression / 100 * 9))
        if png_encoder == "parallel" and _fast_png_fits(pixels):
            return encode_png(pixels, level=level)
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=level)
    elif fmt == "jpeg":
        quality = 90 if compression is None else max(1, 100 - compression)
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        quality = 90 if compression is None else max(1, 100 - compression)
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buffer.getvalue()


def _fast_png_fits(pixels: np.ndarray) -> bool:
    if pixels.dtype != np.uint8 or pixels.size == 0:
        return False
    return pixels.ndim == 2 or (pixels.ndim == 3 and 1 <= pixels.shape[2] <= 4)


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
