"""FLUX.1's VAE decode at 1024², one compile arrangement at a time: which one closes the gap to the recipe's?

The recipe's pipeline is faster than fluxserve's lossless engine by its VAE decode (at most 27 ms against 42 ms
on an H100, BENCHMARKS.md). This times the decoder of FLUX.1's VAE (its published config, random weights, bf16)
on one 1024² latent in each arrangement, each from a fresh copy of the same weights and a reset Dynamo:

- ``eager``;
- ``decoder-default``: what fluxserve does today (``vae.decoder.compile()``, Inductor's default mode);
- ``decoder-default-cl``: the same on a channels-last VAE (``FLUX_CHANNELS_LAST=1``);
- ``decode-default-cl-1x1mm``: ``vae.decode`` compiled whole, channels-last, 1x1 convolutions as matrix
  products (the recipe's ``conv_1x1_as_mm``);
- ``decode-autotune-aten-cl``: ``mode="max-autotune-no-cudagraphs"`` with the recipe's Inductor flags, kernels
  for convolutions and matrix products from cuDNN/cuBLAS only (``--autotune-budget aten``);
- ``decode-autotune-aten-cl-graphs``: the same with CUDA graphs (``mode="max-autotune"``): the recipe under
  the ``aten`` budget;
- ``decode-autotune-cl-graphs``: the recipe's own search (Triton convolution templates too, the ``bounded``
  budget), last, only when ``--budget`` leaves time for it (about 3 minutes cold on an H100).

Each row: the first call (the compile), the median and fastest of ``--reps`` decodes, and the PSNR of its image
against eager's. Rows go to ``--out``/vae_decode.jsonl as they are measured.

    python bench/vae_decode_gpu.py --out DIR          # CUDA
    python bench/vae_decode_gpu.py --tiny --out DIR   # CPU: a small VAE at 64², checks the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fluxbench.recipes import AUTOTUNE_BUDGETS, RECIPE_INDUCTOR_FLAGS, scoped_compile_config, set_inductor_flags

FLUX_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
TINY_VAE = {**FLUX_VAE, "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "sample_size": 64}


def arrangements(device: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, how): ``target`` decoder | decode, ``mode``, ``channels_last``, ``flags`` laid over Inductor's."""
    recipe_aten = {**RECIPE_INDUCTOR_FLAGS, **AUTOTUNE_BUDGETS["aten"]}
    rows: list[tuple[str, dict[str, Any]]] = [
        ("eager", {"target": None}),
        ("decoder-default", {"target": "decoder", "mode": None, "channels_last": False, "flags": {}}),
        ("decoder-default-cl", {"target": "decoder", "mode": None, "channels_last": True, "flags": {}}),
        ("decode-default-cl-1x1mm", {"target": "decode", "mode": None, "channels_last": True,
                                     "flags": {"conv_1x1_as_mm": True}}),
        ("decode-autotune-aten-cl", {"target": "decode", "mode": "max-autotune-no-cudagraphs",
                                     "channels_last": True, "flags": recipe_aten}),
    ]
    if device.startswith("cuda"):
        rows += [
            ("decode-autotune-aten-cl-graphs", {"target": "decode", "mode": "max-autotune", "channels_last": True,
                                                "flags": recipe_aten}),
            ("decode-autotune-cl-graphs", {"target": "decode", "mode": "max-autotune", "channels_last": True,
                                           "flags": {**RECIPE_INDUCTOR_FLAGS, **AUTOTUNE_BUDGETS["bounded"]},
                                           "needs_s": 240}),
        ]
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], reps: int, device: str) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of the two decodes as 8-bit images (what the server encodes)."""
    def pixels(x: torch.Tensor) -> torch.Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round()

    mse = float(((pixels(a) - pixels(b)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds; an arrangement that needs more "
                                                                     "than is left is skipped, and says so")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    begun = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = 64 if args.tiny else 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "vae_decode.jsonl"

    def record(row: dict[str, Any]) -> None:
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    base = AutoencoderKL(**(TINY_VAE if args.tiny else FLUX_VAE)).to(device, dtype).eval().requires_grad_(False)
    latents = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    record({"name": "env", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "size": size, "dtype": str(dtype)})
    reference: torch.Tensor | None = None
    for name, how in arrangements(device):
        left = args.budget - (time.perf_counter() - begun)
        if left < how.get("needs_s", 30):
            record({"name": name, "skipped": f"{left:.0f} s of --budget left"})
            continue
        torch._dynamo.reset()
        vae = copy.deepcopy(base)
        try:
            with scoped_compile_config(), torch.inference_mode():
                set_inductor_flags(how.get("flags", {}))
                if how.get("channels_last"):
                    vae.to(memory_format=torch.channels_last)
                kwargs: dict[str, Any] = {"dynamic": False}
                if how.get("mode"):
                    kwargs["mode"] = how["mode"]
                if how["target"] == "decoder":
                    vae.decoder.compile(fullgraph=False, **kwargs)
                elif how["target"] == "decode":
                    vae.decode = torch.compile(vae.decode, fullgraph=True, **kwargs)

                def decode(v: Any = vae) -> torch.Tensor:
                    return v.decode(latents, return_dict=False)[0]

                sync(device)
                started = time.perf_counter()
                image = decode().clone()
                sync(device)
                first = time.perf_counter() - started
                median, best = timed(decode, args.reps, device)
            if reference is None:
                reference = image
            record({"name": name, "first_call_s": round(first, 2), "median_ms": round(median * 1000, 2),
                    "min_ms": round(best * 1000, 2), "psnr_vs_eager_db": round(psnr(image, reference), 2)})
        except Exception as exc:  # one arrangement that does not compile here: its row says why
            record({"name": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        del vae
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
