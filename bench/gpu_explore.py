"""Which optimizations pay for full-size FLUX.1 on this GPU? One process, many variants.

Usage (on a CUDA GPU): python bench/gpu_explore.py --phase lossless|fp8 --out DIR
Writes one JSON object per measurement to <out>/explore_<phase>.jsonl as it goes and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fluxbench.serving import build_fullsize_flux, transformer_inputs

T0 = time.perf_counter()
ROWS: list[dict[str, Any]] = []
OUT: Path = Path(".")
SCRATCH = Path(tempfile.gettempdir())
"""Where the saved random checkpoint and the compile cache go."""
PHASE = ""
BUDGET_S = 520.0


def left() -> float:
    return BUDGET_S - (time.perf_counter() - T0)


def record(name: str, **values: Any) -> None:
    row = {"name": name, "t": round(time.perf_counter() - T0, 1), **values}
    ROWS.append(row)
    with open(OUT / f"explore_{PHASE}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def timeit(fn: Any, reps: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float((diff**2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), int(np.abs(diff).max())


def gen_image(pipe: Any, size: int, steps: int, seed: int = 0, guidance: float = 0.0) -> Any:
    return pipe("a photo of a red fox in the snow", height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance, max_sequence_length=256,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def forward_fn(pipe: Any, inputs: dict[str, Any]) -> Any:
    def run() -> Any:
        with torch.no_grad():
            return pipe.transformer(**inputs)
    return run


def profile_forward(pipe: Any, inputs: dict[str, Any], label: str) -> None:
    """Top GPU kernels of one forward, grouped by a coarse category."""
    from torch.profiler import ProfilerActivity, profile

    fn = forward_fn(pipe, inputs)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    top = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if total <= 0:
            continue
        name = evt.key
        low = name.lower()
        cat = ("attention" if ("flash" in low or "fmha" in low or "attention" in low or "sdpa" in low)
               else "gemm" if ("gemm" in low or "sm90" in low or "cutlass" in low or "matmul" in low
                               or "scaled_mm" in low or "xmma" in low or "nvjet" in low)
               else "triton" if "triton" in low else "other")
        groups[cat] = groups.get(cat, 0.0) + total / 1000.0
        top.append((round(total / 1000.0, 2), evt.count, name[:90]))
    top.sort(reverse=True)
    record(f"profile_{label}", groups_ms={k: round(v, 2) for k, v in groups.items()}, top=top[:15])


def attention_micro() -> None:
    """SDPA alone at the 1024² shape (4352 tokens, 24 heads × 128), bf16 and fp8 if it runs."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 24, 4352, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * 4352 * 4352 * 128 * 24
    r = timeit(lambda: F.scaled_dot_product_attention(q, k, v), 20)
    record("sdpa_bf16", **r, tflops=round(flops / r["median_s"] / 1e12, 1))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            r = timeit(lambda: F.scaled_dot_product_attention(q, k, v), 20)
        record("sdpa_bf16_cudnn", **r, tflops=round(flops / r["median_s"] / 1e12, 1))
    except Exception as exc:
        record("sdpa_bf16_cudnn", error=f"{type(exc).__name__}: {exc}"[:200])
    try:
        q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
        r = timeit(lambda: F.scaled_dot_product_attention(q8, k8, v8), 20)
        record("sdpa_fp8", **r, tflops=round(flops / r["median_s"] / 1e12, 1))
    except Exception as exc:
        record("sdpa_fp8", error=f"{type(exc).__name__}: {exc}"[:200])


def main() -> int:
    global OUT, PHASE, BUDGET_S
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=520.0)
    args = parser.parse_args()
    OUT, PHASE, BUDGET_S = Path(args.out), args.phase, args.budget
    OUT.mkdir(parents=True, exist_ok=True)
    import diffusers
    import transformers

    record("env", torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
           gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)))
    torch.backends.cuda.matmul.allow_tf32 = True
    t = time.perf_counter()
    pipe = build_fullsize_flux(guidance_embeds=False)
    record("build", build_s=round(time.perf_counter() - t, 2))
    inputs = transformer_inputs(pipe)

    torch.set_grad_enabled(False)
    if PHASE == "lossless":
        # baseline: plain pipeline, eager, default attention
        img_ref = gen_image(pipe, 1024, 4)
        arr_ref = np.asarray(img_ref)
        record("nan_check", finite=bool(np.isfinite(arr_ref).all()), mean=float(arr_ref.mean()),
               std=float(arr_ref.std()))
        record("baseline_pipe_1024_4", **timeit(lambda: gen_image(pipe, 1024, 4), 3))
        buf_t = []
        for level in (6, 1):
            t = time.perf_counter()
            for _ in range(3):
                b = io.BytesIO()
                img_ref.save(b, format="PNG", compress_level=level)
            buf_t.append((level, (time.perf_counter() - t) / 3, b.tell()))
        record("png_encode", results=buf_t)
        record("fwd_eager_native", **timeit(forward_fn(pipe, inputs), 5))
        for backend in ("_native_cudnn", "_native_flash", "_native_efficient", "flex"):
            try:
                pipe.transformer.set_attention_backend(backend)
                record(f"fwd_eager_{backend}", **timeit(forward_fn(pipe, inputs), 5))
            except Exception as exc:
                record(f"fwd_eager_{backend}", error=f"{type(exc).__name__}: {exc}"[:300])
        pipe.transformer.set_attention_backend("native")
        t_enc = timeit(lambda: pipe.encode_prompt("a photo of a red fox", "a photo of a red fox",
                                                  max_sequence_length=256), 5)
        record("text_encode", **t_enc)
        lat = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
        record("vae_decode_eager", **timeit(lambda: pipe.vae.decode(lat, return_dict=False), 5))

        pipe.transformer.fuse_qkv_projections()
        record("fwd_eager_fused", **timeit(forward_fn(pipe, inputs), 5))
        best = "_native_cudnn"
        pipe.transformer.set_attention_backend(best)
        record("fwd_eager_fused_cudnn", **timeit(forward_fn(pipe, inputs), 5))

        t = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("regional_compile_first_call", seconds=round(time.perf_counter() - t, 1))
        record("fwd_regional_fused_cudnn", **timeit(forward_fn(pipe, inputs), 10))
        pipe.transformer.set_attention_backend("native")
        t = time.perf_counter()
        forward_fn(pipe, inputs)()
        record("regional_recompile_native", seconds=round(time.perf_counter() - t, 1))
        record("fwd_regional_fused_native", **timeit(forward_fn(pipe, inputs), 10))
        pipe.transformer.set_attention_backend(best)

        pipe.vae.to(memory_format=torch.channels_last)
        record("vae_decode_channels_last", **timeit(lambda: pipe.vae.decode(lat, return_dict=False), 5))
        t = time.perf_counter()
        pipe.vae.decoder.compile(fullgraph=False, dynamic=False)
        with torch.no_grad():
            pipe.vae.decode(lat, return_dict=False)
        torch.cuda.synchronize()
        record("vae_compile_first_call", seconds=round(time.perf_counter() - t, 1))
        with torch.no_grad():
            record("vae_decode_compiled", **timeit(lambda: pipe.vae.decode(lat, return_dict=False), 5))

        img = gen_image(pipe, 1024, 4)
        p, mx = psnr(np.asarray(img), arr_ref)
        record("opt_quality_1024_4", psnr_db=round(p, 2), max_diff=mx)
        record("opt_pipe_1024_4", **timeit(lambda: gen_image(pipe, 1024, 4), 5))
        if left() > 120:
            record("opt_pipe_512_4", **timeit(lambda: gen_image(pipe, 512, 4), 3, warmup=1))
        if left() > 90:
            t = time.perf_counter()
            pipe.save_pretrained(SCRATCH / "flux-random", safe_serialization=True)
            record("save_pretrained", seconds=round(time.perf_counter() - t, 1))
            du = sum(f.stat().st_size for f in (SCRATCH / "flux-random").rglob("*") if f.is_file())
            record("saved_size", gb=round(du / 1e9, 2))

    elif PHASE == "profile":
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        record("fwd_regional_fused", **timeit(forward_fn(pipe, inputs), 10))
        profile_forward(pipe, inputs, "bf16_regional")
        attention_micro()

    elif PHASE == "coord":
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        forward_fn(pipe, inputs)()
        record("fwd_bf16_regional", **timeit(forward_fn(pipe, inputs), 10))
        import torch._inductor.config as ind

        ind.coordinate_descent_tuning = True
        torch._dynamo.reset()
        t = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("coord_compile", seconds=round(time.perf_counter() - t, 1))
        record("fwd_bf16_regional_coord", **timeit(forward_fn(pipe, inputs), 10))
        record("fwd_bf16_regional_coord_again", **timeit(forward_fn(pipe, inputs), 10))

    elif PHASE == "fp8own":
        from fluxserve.engine.device import select_device_dtype
        from fluxserve.engine.optimize import apply_optimizations
        from fluxserve.settings import Settings

        img_ref = gen_image(pipe, 1024, 4)
        arr_ref = np.asarray(img_ref)
        settings = Settings(quantize="fp8", fuse_qkv=True, compile="regional", cache_dir=SCRATCH / "fluxcache")
        t = time.perf_counter()
        names = apply_optimizations(pipe, settings, select_device_dtype("cuda"))
        record("fp8own_apply", seconds=round(time.perf_counter() - t, 1), names=names)
        t = time.perf_counter()
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("fp8own_compile_first_call", seconds=round(time.perf_counter() - t, 1))
        record("fwd_fp8own_regional", **timeit(forward_fn(pipe, inputs), 10))
        t = time.perf_counter()
        img = gen_image(pipe, 1024, 4)
        record("fp8own_first_pipe_call", seconds=round(time.perf_counter() - t, 1))
        p, mx = psnr(np.asarray(img), arr_ref)
        record("fp8own_quality_1024_4", psnr_db=round(p, 2), max_diff=mx)
        record("fp8own_pipe_1024_4", **timeit(lambda: gen_image(pipe, 1024, 4), 5))
        profile_forward(pipe, inputs, "fp8own")
        # CUDA graphs on the same blocks
        t = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False, mode="reduce-overhead")
        forward_fn(pipe, inputs)()
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("fp8own_cudagraph_compile", seconds=round(time.perf_counter() - t, 1))
        record("fwd_fp8own_regional_cudagraph", **timeit(forward_fn(pipe, inputs), 10))
        del pipe
        torch.cuda.empty_cache()
        pipe = build_fullsize_flux(guidance_embeds=False)
        inputs = transformer_inputs(pipe)
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        forward_fn(pipe, inputs)()
        record("fwd_bf16_regional", **timeit(forward_fn(pipe, inputs), 10))
        t = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False, mode="reduce-overhead")
        forward_fn(pipe, inputs)()
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("bf16_cudagraph_compile", seconds=round(time.perf_counter() - t, 1))
        record("fwd_bf16_regional_cudagraph", **timeit(forward_fn(pipe, inputs), 10))
        if left() > 150:
            import torch._inductor.config as ind
            ind.coordinate_descent_tuning = True
            t = time.perf_counter()
            pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
            forward_fn(pipe, inputs)()
            torch.cuda.synchronize()
            record("bf16_coord_compile", seconds=round(time.perf_counter() - t, 1))
            record("fwd_bf16_regional_coord", **timeit(forward_fn(pipe, inputs), 10))

    elif PHASE == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        img_ref = gen_image(pipe, 1024, 4)
        arr_ref = np.asarray(img_ref)
        pipe.transformer.fuse_qkv_projections()
        pipe.transformer.set_attention_backend("_native_cudnn")
        t = time.perf_counter()
        fused = {n for n, m in pipe.transformer.named_modules() if getattr(m, "fused_projections", False)}

        def wanted(m: torch.nn.Module, fqn: str) -> bool:
            parent, _, leaf = fqn.rpartition(".")
            if parent in fused and leaf in {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}:
                return False
            return isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0

        quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=wanted)
        record("fp8_quantize", seconds=round(time.perf_counter() - t, 1))
        record("fwd_fp8_eager", **timeit(forward_fn(pipe, inputs), 3))
        from torch import _dynamo
        _dynamo.config.recompile_limit = 64
        t = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        forward_fn(pipe, inputs)()
        torch.cuda.synchronize()
        record("fp8_regional_compile_first_call", seconds=round(time.perf_counter() - t, 1))
        record("fwd_fp8_regional", **timeit(forward_fn(pipe, inputs), 10))
        img = gen_image(pipe, 1024, 4)
        p, mx = psnr(np.asarray(img), arr_ref)
        record("fp8_quality_1024_4", psnr_db=round(p, 2), max_diff=mx)
        record("fp8_pipe_1024_4", **timeit(lambda: gen_image(pipe, 1024, 4), 5))

        profile_forward(pipe, inputs, "fp8")
        attention_micro()

    record("peak_mem", gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print("\nSUMMARY")
    for row in ROWS:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
