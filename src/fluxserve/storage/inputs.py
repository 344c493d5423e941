"""Decoding and checking the images a client uploads for an edit (torch-free; used by the HTTP layer).

Every failure is an :class:`InputError` naming the request field (``image``, ``image[1]``, ``mask``),
so the route can answer a 400 in OpenAI's shape. What is accepted and how it is converted:

- formats: PNG, JPEG and WebP (OpenAI's list); anything else, or bytes that are no image, is refused;
- size: the file at most ``max_bytes``; width × height at most ``max_pixels`` and the aspect ratio at most
  ``max_aspect``, checked from the header *before* the pixels are decoded, so a small file that declares a
  huge image (a decompression bomb) or a 16777216×1 strip costs nothing; truncated or corrupt files are
  refused, never half-decoded;
- EXIF orientation is applied (a phone photo taken upright stays upright);
- CMYK, palette, grayscale, 16-bit and other modes are converted to 8-bit RGB (16-bit keeps its high
  byte, not a clipped value);
- transparency: an input image's alpha is composited over **white** (diffusion models take no alpha);
- a mask must have an alpha channel; its transparent pixels mark the area to change (OpenAI's rule), so
  the mask handed on is ``255 - alpha`` (255 = may change, 0 = keep). A mask with no transparent pixel
  would change nothing and is refused.
"""

from __future__ import annotations

import binascii
import contextlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


class InputError(ValueError):
    """An uploaded image cannot be used; ``param`` names the request field."""

    def __init__(self, message: str, param: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class DecodedImage:
    rgb: np.ndarray
    """``uint8`` H×W×3, alpha already composited over white."""
    alpha: np.ndarray | None
    """``uint8`` H×W when the file had transparency, else None."""
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[1], self.rgb.shape[0]


_BASE64_STEP = 4 * 1024 * 1024
"""Characters of base64 decoded at a time (a multiple of 4): each step holds the interpreter lock for
milliseconds, where a 20 MB data URL in one call would hold it for a good part of a second."""


def decode_data_url(value: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL. Remote URLs are never fetched. The text is read
    in place (only its prefix is ever copied) and its length is checked against ``max_bytes`` before
    anything is decoded."""
    text = value.strip()  # the same object when there is nothing to strip
    if text[:8].lower().startswith(("http://", "https://", "file:", "ftp:")):
        raise InputError(f"{param} must be a base64 data URL (data:image/png;base64,...); remote URLs are not "
                         "fetched", param, "unsupported_url")
    match = _DATA_URL.match(text[:512])
    if match is None or match.group("b64") is None:
        raise InputError(f"{param} must be a base64 data URL (data:image/png;base64,...)", param, "invalid_image")
    start = match.end()
    if len(text) - start > (max_bytes + 2) // 3 * 4 + 4:
        raise InputError(f"{param} is larger than {max_bytes} bytes (FLUX_MAX_INPUT_BYTES)", param, "image_too_large")
    parts = []
    try:
        for offset in range(start, len(text), _BASE64_STEP):
            chunk = text[offset:offset + _BASE64_STEP]
            if offset + _BASE64_STEP < len(text) and "=" in chunk:  # padding is only allowed at the very end
                raise ValueError("padding before the end")
            parts.append(binascii.a2b_base64(chunk, strict_mode=True))
    except (binascii.Error, ValueError):
        raise InputError(f"{param} is not valid base64", param, "invalid_image") from None
    return b"".join(parts)


def _open(data: bytes, param: str, max_bytes: int, max_pixels: int, max_aspect: float | None) -> Image.Image:
    if not data:
        raise InputError(f"{param} is an empty file", param)
    if len(data) > max_bytes:
        raise InputError(f"{param} is {len(data)} bytes; the limit is {max_bytes} (FLUX_MAX_INPUT_BYTES)", param,
                         "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(f"{param} declares more pixels than FLUX_MAX_INPUT_PIXELS allows", param,
                         "image_too_large") from None
    except UnidentifiedImageError:
        raise InputError(f"{param} is not a PNG, JPEG or WebP image", param) from None
    except (OSError, ValueError, SyntaxError):
        raise InputError(f"{param} could not be read as an image (corrupt header)", param) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InputError(f"{param} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                         "(FLUX_MAX_INPUT_PIXELS)", param, "image_too_large")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise InputError(f"{param} is {width}x{height}, an aspect ratio over {max_aspect:g}:1, more than any output "
                         "size can keep (FLUX_MAX_SIZE / FLUX_MIN_SIZE)", param, "unsupported_aspect_ratio")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning,
            Image.DecompressionBombError):
        raise InputError(f"{param} is truncated or corrupt", param) from None
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB or RGBA with 8 bits per channel."""
    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit (or wider) grayscale
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "F" else max(1.0, float(values.max()))
        if mode == "I" and values.max() <= 255:
            top = 255.0
        gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return image.convert("RGBA")
    if mode in ("L", "1"):
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, param: str, *, max_bytes: int, max_pixels: int,
                 max_aspect: float | None = None) -> DecodedImage:
    """Check and decode one uploaded image (see the module docstring for the rules)."""
    image = _open(data, param, max_bytes, max_pixels, max_aspect)
    fmt = image.format or "?"
    with contextlib.suppress(OSError, ValueError, SyntaxError, KeyError, TypeError):  # broken EXIF: keep as stored
        image = ImageOps.exif_transpose(image) or image
    image = _eight_bit(image)
    alpha = None
    if image.mode == "RGBA":
        rgba = np.asarray(image, dtype=np.uint8)
        alpha = rgba[..., 3].copy()
        a = alpha[..., None].astype(np.uint16)
        rgb = ((rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return DecodedImage(rgb=rgb, alpha=alpha, format=fmt)


def mask_from(decoded: DecodedImage, image_size: tuple[int, int], param: str = "mask") -> np.ndarray:
    """The inpainting mask (255 = change, 0 = keep) from a decoded mask image with alpha."""
    if decoded.alpha is None:
        raise InputError(f"{param} must have an alpha channel (a PNG whose transparent pixels mark the area to "
                         "change)", param, "invalid_mask")
    if decoded.size != image_size:
        raise InputError(f"{param} is {decoded.size[0]}x{decoded.size[1]} but the image is "
                         f"{image_size[0]}x{image_size[1]}; they must be the same size", param, "invalid_mask")
    mask = 255 - decoded.alpha
    if not mask.any():
        raise InputError(f"{param} has no transparent pixels, so nothing would change", param, "empty_mask")
    return mask


def resize_rgb(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``uint8`` H×W×3 pixels to width × height (Lanczos; unchanged when already that size)."""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.LANCZOS))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an H×W ``uint8`` mask; bilinear, so soft edges stay soft."""
    if mask.shape[1] == width and mask.shape[0] == height:
        return mask
    return np.asarray(Image.fromarray(mask, "L").resize((width, height), Image.Resampling.BILINEAR))


def inputs_digest(images: list[np.ndarray], mask: np.ndarray | None) -> str:
    """A short digest of decoded inputs: equal for byte-identical pixels (the batching key's ``inputs``)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for array in [*images, *([] if mask is None else [mask])]:
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(b"mask" if mask is not None else b"nomask")
    return digest.hexdigest()
