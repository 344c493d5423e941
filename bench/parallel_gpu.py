"""One request over two GPUs: diffusers' context parallelism (Ulysses / ring) vs one GPU, full-size FLUX.1.

Run on a machine with two CUDA GPUs from the repo root; no torchrun, it spawns its ranks:
    PYTHONPATH=src python bench/parallel_gpu.py --out parallel.jsonl [--kind ulysses] [--sizes 1024,2048]
        [--steps 28] [--compile] [--attention _native_cudnn] [--skip-pipeline]

Full-size FLUX.1 architecture with random weights (the published config), built on rank 0's GPU and broadcast, so both
ranks hold the same weights. For each size:
1. one GPU (rank 0 alone, before parallelism is enabled): one transformer forward (median of --repeat)
   and, unless --skip-pipeline, one pipeline call (--steps steps, latents out, no VAE/PNG) — the reference
   output;
2. the same with ``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` (or
   ``ring_degree=2``) on both ranks, same inputs, same seeds; PSNR of rank 0's output vs the reference.
Rows go to --out as JSON lines as soon as they are measured. ``--compile`` adds regional compilation
(``compile_repeated_blocks``) to both the reference and the split run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TEXT_TOKENS = 256


def psnr(result: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.float()
    mse = torch.mean((result.float() - ref) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def write(out: Path, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def timed(fn: Any, repeat: int, group: bool) -> float:
    """Median wall seconds of ``fn()`` (every rank synchronized around each call when ``group``)."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        if group:
            dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if group:
            dist.barrier()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def broadcast_module(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def rank_main(rank: int, args: argparse.Namespace) -> None:
    from diffusers import ContextParallelConfig

    from fluxbench.serving import build_fullsize_flux, transformer_inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD, device_id=torch.device("cuda", rank))
    out: Path = args.out
    torch.manual_seed(0)
    started = time.perf_counter()
    pipe = build_fullsize_flux(device=f"cuda:{rank}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            broadcast_module(component)
    transformer = pipe.transformer
    if args.attention:
        transformer.set_attention_backend(args.attention)
    if rank == 0:
        write(out, {"what": "setup", "gpus": [torch.cuda.get_device_name(i) for i in range(WORLD)],
                    "torch": torch.__version__, "kind": args.kind, "compile": args.compile,
                    "attention": args.attention or "default", "build_s": time.perf_counter() - started})
    sizes = [int(s) for s in args.sizes.split(",")]

    def inputs_for(size: int) -> dict[str, Any]:
        inputs = transformer_inputs(pipe, size, size, text_tokens=TEXT_TOKENS)
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                dist.broadcast(value, src=0)
        return inputs

    def run_pipeline(size: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(0)  # the same latents on every rank
        result = pipe("a lighthouse at dusk", height=size, width=size, num_inference_steps=args.steps,
                      guidance_scale=0.0, max_sequence_length=TEXT_TOKENS, generator=generator,
                      output_type="latent")
        return result.images

    def keep(target: dict[str, torch.Tensor], key: str, size: int) -> None:
        target[key] = run_pipeline(size)

    # 1. One GPU: rank 0 alone (rank 1 waits), before parallelism is enabled.
    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    references: dict[int, dict[str, torch.Tensor]] = {}
    for size in sizes:
        inputs = inputs_for(size)
        if rank == 0:
            with torch.inference_mode():
                forward = transformer(**inputs, return_dict=False)[0]
                seconds = timed(partial(transformer, **inputs, return_dict=False), args.repeat, group=False)
                references[size] = {"forward": forward}
                row: dict[str, Any] = {"what": "forward", "gpus": 1, "size": size, "seconds": seconds}
                write(out, row)
                if not args.skip_pipeline:
                    run_pipeline(size)  # warm-up (and compile) at this size
                    pipe_seconds = timed(partial(keep, references[size], "pipeline", size), 1, group=False)
                    write(out, {"what": "pipeline", "gpus": 1, "size": size, "steps": args.steps,
                                "seconds": pipe_seconds})
        dist.barrier()

    # 2. Split over both GPUs.
    if args.compile:
        torch._dynamo.reset()  # the split forward is another graph
    degree = {"ulysses_degree": WORLD} if args.kind == "ulysses" else {"ring_degree": WORLD}
    try:
        transformer.enable_parallelism(config=ContextParallelConfig(**degree))
    except Exception as exc:
        if rank == 0:
            write(out, {"what": "enable_parallelism", "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
        dist.destroy_process_group()
        return
    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    for size in sizes:
        inputs = inputs_for(size)
        try:
            with torch.inference_mode():
                forward = transformer(**inputs, return_dict=False)[0]
                seconds = timed(partial(transformer, **inputs, return_dict=False), args.repeat, group=True)
            if rank == 0:
                reference = references[size]["forward"]
                write(out, {"what": "forward", "gpus": WORLD, "kind": args.kind, "size": size, "seconds": seconds,
                            "psnr_db_vs_1gpu": psnr(forward, reference),
                            "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
            if not args.skip_pipeline:
                run_pipeline(size)
                latents: dict[str, torch.Tensor] = {}
                pipe_seconds = timed(partial(keep, latents, "out", size), 1, group=True)
                if rank == 0:
                    write(out, {"what": "pipeline", "gpus": WORLD, "kind": args.kind, "size": size,
                                "steps": args.steps, "seconds": pipe_seconds,
                                "psnr_db_vs_1gpu": psnr(latents["out"], references[size]["pipeline"])})
        except Exception as exc:
            if rank == 0:
                write(out, {"what": "split", "size": size, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            break
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("parallel.jsonl"))
    parser.add_argument("--kind", choices=["ulysses", "ring"], default="ulysses")
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention", default=None, help="diffusers attention backend (ring needs one with LSE)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args()
    if torch.cuda.device_count() < WORLD:
        raise SystemExit(f"needs {WORLD} CUDA GPUs, found {torch.cuda.device_count()}")
    torch.set_default_dtype(torch.float32)
    mp.spawn(rank_main, args=(args,), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
