"""PNG + base64 of a 1024² noise image (what random weights produce): PIL vs the parallel encoder.

    PYTHONPATH=src python bench/png_encode.py [--size 1024] [--repeat 15]

Prints the median and best milliseconds and the file size of each encoder; every encoded file is decoded
and compared with the input first.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from fluxserve.storage.png import encode_png, has_isal


def _pil(pixels: np.ndarray, level: int | None) -> bytes:
    buffer = io.BytesIO()
    options = {} if level is None else {"compress_level": level}
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    encoders: dict[str, Callable[[], bytes]] = {
        "PIL default (level 6)": lambda: _pil(pixels, None),
        "PIL level 1 (fluxserve's level)": lambda: _pil(pixels, 1),
        "parallel, zlib, level 1": lambda: encode_png(pixels, level=1, deflater="zlib"),
        "parallel, zlib, level 1, 1 band": lambda: encode_png(pixels, level=1, deflater="zlib", bands=1),
    }
    if has_isal():
        encoders["parallel, ISA-L, level 1 (fluxserve now)"] = lambda: encode_png(pixels, level=1)
        encoders["parallel, ISA-L, level 1, 1 band"] = lambda: encode_png(pixels, level=1, bands=1)
        encoders["parallel, ISA-L, level 6"] = lambda: encode_png(pixels, level=6)
    print(f"PNG + base64 of {args.size}² RGB noise, {os.cpu_count()} CPUs, ISA-L {'yes' if has_isal() else 'no'}")
    for name, encode in encoders.items():
        decoded = np.asarray(Image.open(io.BytesIO(encode())))
        assert np.array_equal(decoded, pixels), name
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            data = encode()
            base64.b64encode(data)
            times.append(time.perf_counter() - start)
        print(f"{name:45s} median {statistics.median(times) * 1000:7.1f} ms  best {min(times) * 1000:7.1f} ms"
              f"  {len(data):>9,d} bytes of PNG")


if __name__ == "__main__":
    main()
