"""A parallel PNG encoder: the image's rows in bands, each band filtered and deflated on its own thread.

PNG's pixel data is one zlib stream over the filtered rows. Here each band of rows is deflated as a raw
deflate piece on a thread pool (numpy, zlib and ISA-L release the interpreter while they work); every
piece but the last ends with a sync flush (a byte-aligned empty stored block, no final bit), so the
pieces concatenated are one valid deflate stream. Each band's compressor is primed with the last 32 KiB
of the band before it (``zdict``, as pigz does), so back-references may cross band boundaries. The zlib
header goes in front, the Adler-32 of the whole raw stream (combined from the bands' checksums) behind;
every piece is its own IDAT chunk, its CRC computed on its thread.

Deflate is ISA-L's (``isal``, several times faster than zlib at its low levels) when installed, else the
standard library's zlib. Filters are chosen per band: the filter type whose output on a sample of the
band's rows has the least sum of absolute values as signed bytes (libpng's heuristic, applied to a sample
instead of every row), among None, Sub and Up, and Paeth too from zlib level 6 on (in numpy Paeth costs
as much as the rest of the encoding). A filter only changes the file size, never the decoded pixels.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

_isal_zlib: Any
try:  # ISA-L's deflate: the same stream format, much faster at low levels
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib stays the fallback
    _isal_zlib = None

FilterChoice = Literal["auto", "none", "sub", "up", "paeth"]
Deflater = Literal["auto", "isal", "zlib"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels → PNG colour type (gray, gray+alpha, RGB, RGBA)
_FILTER_CODES = {"none": 0, "sub": 1, "up": 2, "paeth": 4}
_WINDOW = 32 * 1024
_ADLER_BASE = 65521
_BAND_BYTES = 192 * 1024  # about this many pixel bytes per band when the caller does not choose
_MAX_BANDS = 16
_SAMPLE_EVERY = 7  # a prime stride, so that few periodic patterns alias with it
_SAMPLE_FROM = 3
_AUTO_FILTERS = ("none", "sub", "up")
_PAETH_FROM_LEVEL = 6  # rows between the rows sampled to choose a band's filter

_pool: ThreadPoolExecutor | None = None


def has_isal() -> bool:
    return _isal_zlib is not None


def _shared_pool() -> Executor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_MAX_BANDS, thread_name_prefix="png")
    return _pool


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """The Adler-32 of A+B from adler32(A), adler32(B) and len(B) (zlib's ``adler32_combine``)."""
    rem = len2 % _ADLER_BASE
    a1, b1 = adler1 & 0xFFFF, adler1 >> 16
    a2, b2 = adler2 & 0xFFFF, adler2 >> 16
    s1 = (a1 + a2 - 1) % _ADLER_BASE
    s2 = (b1 + b2 + rem * a1 - rem) % _ADLER_BASE
    return (s2 << 16) | s1


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _rows_above(rows: np.ndarray, above: np.ndarray | None) -> np.ndarray:
    """For each row of ``rows``, the raw row above it (zeros above the image's first row)."""
    up = np.empty_like(rows)
    up[0] = 0 if above is None else above
    up[1:] = rows[:-1]
    return up


def _apply_filter(kind: str, rows: np.ndarray, up: np.ndarray, bpp: int, out: np.ndarray) -> None:
    """Write ``kind``-filtered ``rows`` [h, stride] into ``out`` (uint8, modulo-256 maths as PNG's).

    ``up`` holds the raw row above each row; left neighbours are those ``bpp`` bytes before.
    """
    if kind == "none":
        out[:] = rows
    elif kind == "sub":
        out[:, :bpp] = rows[:, :bpp]
        np.subtract(rows[:, bpp:], rows[:, :-bpp], out=out[:, bpp:])
    elif kind == "up":
        np.subtract(rows, up, out=out)
    else:  # Paeth: predictor a (left), b (up) or c (up-left), whichever is nearest to a + b - c
        a = np.zeros(rows.shape, dtype=np.int16)
        a[:, bpp:] = rows[:, :-bpp]
        b = up.astype(np.int16)
        c = np.zeros(rows.shape, dtype=np.int16)
        c[:, bpp:] = b[:, :-bpp]
        pa = np.abs(b - c)
        pb = np.abs(a - c)
        pc = np.abs(a + b - 2 * c)
        predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        np.subtract(rows, predictor.astype(np.uint8), out=out)


def _choose_filter(rows: np.ndarray, up: np.ndarray, bpp: int, kinds: tuple[str, ...]) -> str:
    """The filter with the least sum of |byte as int8| over every ``_SAMPLE_EVERY``-th row of ``rows``."""
    sample, sample_up = rows[_SAMPLE_FROM::_SAMPLE_EVERY], up[_SAMPLE_FROM::_SAMPLE_EVERY]
    out = np.empty_like(sample)
    best, best_score = "none", -1
    for kind in kinds:
        _apply_filter(kind, sample, sample_up, bpp, out)
        score = int(np.abs(out.view(np.int8).astype(np.int16)).sum())
        if best_score < 0 or score < best_score:
            best, best_score = kind, score
    return best


def _deflate_level(deflater: Deflater, level: int) -> tuple[Any, int]:
    """(module, level) for a zlib ``level`` 0-9; level 0 stays zlib's stored blocks."""
    use_isal = _isal_zlib is not None and deflater in ("auto", "isal") and level > 0
    if deflater == "isal" and _isal_zlib is None:
        raise ValueError("the isal package is not installed")
    if use_isal:
        return _isal_zlib, 1 if level <= 2 else 2 if level <= 5 else 3  # ISA-L has levels 0-3
    return zlib, level


def encode_png(pixels: np.ndarray, *, level: int = 1, bands: int | None = None, filters: FilterChoice = "auto",
               deflater: Deflater = "auto", executor: Executor | None = None) -> bytes:
    """PNG bytes of an [H, W] or [H, W, C] uint8 array (C = 1–4: gray, gray+alpha, RGB, RGBA).

    ``level`` is zlib's 0–9 (mapped onto ISA-L's 0–3 when ISA-L deflates); ``bands`` None picks about one
    band per 192 KiB of pixels, at most 16. Whatever ``bands``, ``filters``, ``deflater`` and ``level``
    are, the decoded pixels are exactly ``pixels``.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG encoding needs uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOR_TYPES or 0 in pixels.shape:
        raise ValueError(f"PNG encoding needs [H, W] or [H, W, 1-4] pixels, got shape {pixels.shape}")
    if not 0 <= level <= 9:
        raise ValueError(f"zlib level must be 0-9, got {level}")
    if filters != "auto" and filters not in _FILTER_CODES:
        raise ValueError(f"unknown PNG filter {filters!r}")
    module, zlevel = _deflate_level(deflater, level)
    # Paeth costs ~30x the others in numpy (≈35 ms per 1024² RGB on one core): only when asked for size
    candidates = _AUTO_FILTERS + (("paeth",) if level >= _PAETH_FROM_LEVEL else ())
    height, width, channels = pixels.shape
    stride = width * channels
    rows = np.ascontiguousarray(pixels).reshape(height, stride)
    if bands is None:
        bands = min(_MAX_BANDS, max(1, (height * stride) // _BAND_BYTES))
    bands = max(1, min(bands, height))
    edges = [round(i * height / bands) for i in range(bands + 1)]
    run: Callable[[Callable[[int], Any]], list[Any]]
    if bands == 1:
        def run(fn: Callable[[int], Any]) -> list[Any]:
            return [fn(0)]
    else:
        pool = executor or _shared_pool()

        def run(fn: Callable[[int], Any]) -> list[Any]:
            return list(pool.map(fn, range(bands)))

    # 1. Filter each band: a band's filtered bytes depend only on its raw rows and the raw row above it.
    def filter_band(i: int) -> np.ndarray:
        start, stop = edges[i], edges[i + 1]
        band = rows[start:stop]
        above = rows[start - 1] if start > 0 else None
        up = _rows_above(band, above)
        kind = _choose_filter(band, up, channels, candidates) if filters == "auto" else filters
        out = np.empty((stop - start, stride + 1), dtype=np.uint8)
        out[:, 0] = _FILTER_CODES[kind]
        _apply_filter(kind, band, up, channels, out[:, 1:])
        return out.reshape(-1)

    filtered = run(filter_band)

    # 2. Deflate each band, primed with the previous band's last 32 KiB; sync-flush all but the last.
    def deflate_band(i: int) -> tuple[bytes, int, int]:
        raw = filtered[i]
        options: dict[str, Any] = {}
        if i > 0 and zlevel > 0:
            options["zdict"] = filtered[i - 1][-_WINDOW:].tobytes()
        compressor = module.compressobj(zlevel, module.DEFLATED, -15, 9, 0, **options)
        last = i == bands - 1
        body = compressor.compress(raw) + compressor.flush(module.Z_FINISH if last else module.Z_SYNC_FLUSH)
        return _chunk(b"IDAT", body), zlib.adler32(raw), raw.size

    pieces = run(deflate_band)

    # 3. Assemble: signature, IHDR, zlib header, the bands, the combined Adler-32, IEND.
    adler = 1
    for _, piece_adler, piece_len in pieces:
        adler = adler32_combine(adler, piece_adler, piece_len)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    parts = [_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", b"\x78\x01")]
    parts.extend(chunk for chunk, _, _ in pieces)
    parts.append(_chunk(b"IDAT", struct.pack(">I", adler)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)
