"""Attention kernels for FLUX's shapes on one GPU: each installed diffusers backend vs bf16 native.

Run on a GPU machine from the repo root (after installing the kernels to compare, e.g. the
``flash-attn-4`` / ``sageattention`` wheels):
    PYTHONPATH=src python bench/attention_gpu.py --out attention.jsonl [--sizes 1024,2048] [--repeat 20]

Two measurements per backend that ``fluxserve.engine.optimize.available_attention_backends`` accepts
on this GPU (the same check start-up applies to FLUX_ATTENTION_BACKEND):
1. the kernel alone on FLUX's attention shape (batch 1, 24 heads × 128, 4096 image + 512 text tokens at
   1024², 16384 + 512 at 2048²), through diffusers' ``dispatch_attention_fn``; PSNR of its output vs
   bf16 ``native``;
2. one full-size FLUX.1 transformer forward (random weights, the published config) with the backend set on the
   model; PSNR of the forward's output vs the forward with ``native``.
A row is written per measurement as soon as it is taken (JSON lines), so a run cut short keeps them.
The fastest backend with PSNR >= 35 dB is the candidate for FLUX_ATTENTION_BACKEND.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fluxbench.serving import build_fullsize_flux, transformer_inputs
from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.optimize import available_attention_backends

TEXT_TOKENS = 512
HEADS, HEAD_DIM = 24, 128


def psnr(result: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the signal."""
    ref = reference.float()
    mse = torch.mean((result.float() - ref) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def timed(fn: Any, repeat: int) -> float:
    """Median seconds of ``fn()`` on the GPU after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def write(out: Path, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def kernel_rows(backends: list[str], sizes: list[int], repeat: int, out: Path) -> None:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    for size in sizes:
        tokens = (size // 16) ** 2 + TEXT_TOKENS
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        reference = dispatch_attention_fn(q, k, v, backend="native")
        flops = 4 * tokens * tokens * HEAD_DIM * HEADS
        for backend in backends:
            row: dict[str, Any] = {"what": "kernel", "size": size, "tokens": tokens, "backend": backend}
            try:
                result = dispatch_attention_fn(q, k, v, backend=backend)
                seconds = timed(partial(dispatch_attention_fn, q, k, v, backend=backend), repeat)
                row.update(seconds=seconds, tflops=flops / seconds / 1e12, psnr_db=psnr(result, reference))
            except Exception as exc:  # a kernel that refuses this shape or dtype is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            write(out, row)


def forward_rows(backends: list[str], sizes: list[int], repeat: int, out: Path) -> None:
    transformer = build_fullsize_flux(device="cuda").transformer  # only the transformer is kept and timed
    torch.cuda.empty_cache()
    holder = SimpleNamespace(transformer=transformer)
    for size in sizes:
        inputs = transformer_inputs(holder, size, size, text_tokens=TEXT_TOKENS)
        call = {**inputs, "return_dict": False}  # the inputs already carry it: set it once, here
        with torch.inference_mode():
            transformer.set_attention_backend("native")
            reference = transformer(**call)[0]
            for backend in backends:
                row: dict[str, Any] = {"what": "forward", "size": size, "backend": backend}
                try:
                    transformer.set_attention_backend(backend)
                    result = transformer(**call)[0]
                    row.update(seconds=timed(partial(transformer, **call), repeat),
                               psnr_db=psnr(result, reference),
                               peak_gb=torch.cuda.max_memory_allocated() / 1e9)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                write(out, row)
        del inputs, reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("attention.jsonl"))
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-forward", action="store_true", help="only the kernels (seconds, not minutes)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    plan = select_device_dtype("cuda:0")
    backends = [b for b in available_attention_backends(plan) if b not in ("_native_math", "flex")]  # too slow
    write(args.out, {"what": "setup", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "backends": backends, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    kernel_rows(backends, sizes, args.repeat, args.out)
    if not args.skip_forward:
        forward_rows(backends, sizes, max(5, args.repeat // 4), args.out)


if __name__ == "__main__":
    main()
