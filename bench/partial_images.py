"""What one streamed partial image costs: the same generation with 0 and with ``--partials`` partial images,
run by fluxserve's engine, and the partial's own parts (the VAE decode at full size, its PNG + base64).

    PYTHONPATH=src python bench/partial_images.py --device cuda --size 1024 --steps 4 --reps 5
    PYTHONPATH=src python bench/partial_images.py --device cpu               # tiny-flux, at its 128² default

On CUDA the model is the full-size FLUX.1 architecture with random weights (built on the GPU and written
with ``save_pretrained``, as ``fluxserve bench`` does, then loaded through fluxserve's normal path), so the
timings are those of the real checkpoint; ``--model KEY`` takes a registry model instead (downloaded or in
the cache). On CPU the tiny offline ``tiny-flux``. Prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.engine import DeviceEngine
from fluxserve.generation import GenerationParams, ImageRequest
from fluxserve.models.registry import resolve_model
from fluxserve.settings import load_settings
from fluxserve.storage.images import encode_image, to_base64


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model_name(args: argparse.Namespace, work: Path) -> str:
    if args.model:
        return str(args.model)
    if not args.device.startswith("cuda"):
        return "tiny-flux"
    from fluxbench.serving import build_fullsize_flux, save_pipeline

    path = work / "flux-schnell-random"
    pipe = build_fullsize_flux(device=args.device)
    save_pipeline(pipe, path)
    del pipe
    torch.cuda.empty_cache()
    return str(path)


def _generate(engine: DeviceEngine, model: Any, params: GenerationParams, partials: int, seed: int,
              device: str) -> tuple[float, list[np.ndarray]]:
    images: list[np.ndarray] = []

    def progress(_step: int, _total: int, partial: np.ndarray | None) -> None:
        if partial is not None:
            images.append(partial)

    request = ImageRequest("a lighthouse on a cliff at dusk", [seed], on_progress=progress, partial_images=partials)
    _sync(device)
    started = time.perf_counter()
    engine.generate(model, params, [request])
    _sync(device)
    return time.perf_counter() - started, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="registry key or directory (default: full-size random FLUX.1 on CUDA, "
                                        "tiny-flux on CPU)")
    parser.add_argument("--size", type=int, help="square side in pixels (default 1024 on CUDA, the model's own "
                                                 "default on CPU)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--partials", type=int, default=3, help="partial images per generation (1-3)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmups", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fluxserve-partials-") as tmp:
        work = Path(tmp)
        settings = load_settings(device=args.device, cache_dir=str(work / "cache") if not args.model else None,
                                 warmup_enable=False)
        engine = DeviceEngine(settings, select_device_dtype(args.device))
        spec = resolve_model(_model_name(args, work))
        model, _ = engine.load(spec)
        side = args.size or (1024 if args.device.startswith("cuda") else spec.width)
        params = GenerationParams(spec.key, side, side, args.steps, 0.0, 256)
        for i in range(args.warmups):  # compile/cudnn autotune and first-call costs, with and without partials
            _generate(engine, model, params, 0, i, args.device)
            _generate(engine, model, params, args.partials, i, args.device)
        plain, with_partials, partials = [], [], []
        for rep in range(args.reps):
            plain.append(_generate(engine, model, params, 0, rep, args.device)[0])
            seconds, images = _generate(engine, model, params, args.partials, rep, args.device)
            with_partials.append(seconds)
            partials = images
        assert len(partials) == args.partials and partials[0].shape == (side, side, 3), [p.shape for p in partials]

        # The partial's parts: the VAE decode of one (packed FLUX.1) latent at full size, then PNG + base64 (on
        # the server's encoder pool).
        pipe = model.primary
        decode = []
        if spec.family == "flux":
            tokens = (side // (pipe.vae_scale_factor * 2)) ** 2
            latents = torch.randn(1, tokens, pipe.transformer.config.in_channels, device=pipe.transformer.device,
                                  dtype=pipe.transformer.dtype)
            for _ in range(args.warmups + args.reps):
                _sync(args.device)
                started = time.perf_counter()
                with torch.inference_mode():
                    model.runner.decode(pipe, latents, side, side).float().cpu()
                _sync(args.device)
                decode.append(time.perf_counter() - started)
            decode = decode[args.warmups:]
        encode = []
        for _ in range(args.reps):
            started = time.perf_counter()
            to_base64(encode_image(partials[0], "png", png_level=settings.png_compress_level))
            encode.append(time.perf_counter() - started)

    median = statistics.median
    per_partial = (median(with_partials) - median(plain)) / args.partials
    best_per_partial = (min(with_partials) - min(plain)) / args.partials  # least disturbed by a busy machine
    result = {
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "model": args.model or (spec.key if spec.tiny else "FLUX.1 [schnell] architecture, random weights"),
        "size": f"{side}x{side}", "steps": args.steps, "partials": args.partials, "reps": args.reps,
        "generation_s": round(median(plain), 4), "generation_with_partials_s": round(median(with_partials), 4),
        "engine_cost_per_partial_s": round(per_partial, 4),
        "engine_cost_per_partial_best_s": round(best_per_partial, 4),
        "vae_decode_s": round(median(decode), 4) if decode else None,
        "vae_decode_best_s": round(min(decode), 4) if decode else None,
        "png_base64_s": round(median(encode), 4), "plain_runs_s": [round(x, 4) for x in plain],
        "partial_runs_s": [round(x, 4) for x in with_partials],
    }
    print(json.dumps(result))
    print(f"{result['size']} {args.steps} steps on {result['gpu'] or args.device}: "
          f"{result['generation_s']:.3f} s plain, {result['generation_with_partials_s']:.3f} s with "
          f"{args.partials} partial images → {per_partial * 1000:.1f} ms each in the engine (medians; "
          f"{best_per_partial * 1000:.1f} ms from the fastest runs) "
          f"(VAE decode alone {median(decode) * 1000 if decode else float('nan'):.1f} ms) + "
          f"{median(encode) * 1000:.1f} ms PNG + base64 "
          "on the encoder pool")


if __name__ == "__main__":
    main()
