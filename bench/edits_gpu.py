"""img2img and inpainting on full-size random-weight FLUX.1 dev: plain diffusers vs fluxserve's engine.

(a) plain ``FluxImg2ImgPipeline`` / ``FluxInpaintPipeline`` (made with ``from_pipe`` from the full-size
pipeline, bf16, PIL PNG at its defaults) and (b) fluxserve's ``DeviceEngine`` with the same task, strength
and steps through the edit path (``GenerationParams.task``), in the lossless mode, PNG by the server's
encoder. One run, one machine. ``--tiny`` runs the same code on the CPU with tiny-flux (a check of the
script, not a measurement). Prints a table; JSON to ``--out``.

    PYTHONPATH=src python bench/edits_gpu.py --out edits.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fluxbench.serving import MODES, build_fullsize_flux
from fluxserve.generation import GenerationParams, ImageRequest
from fluxserve.storage.images import encode_image, to_base64

PROMPT = "a red barn in the snow"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, reps: int, device: str) -> float:
    fn()  # warm-up (and compile, for the engine)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", default="lossless")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    from fluxserve.runtime import Runtime
    from fluxserve.settings import load_settings

    device = "cpu" if args.tiny else "cuda"
    size, steps = (64, 4) if args.tiny else (args.size, args.steps)
    work = Path(tempfile.mkdtemp(prefix="edits-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        if args.tiny:
            from fluxserve.engine.loading import tiny_model_dir
            from fluxserve.engine.registry import resolve_model
            from fluxserve.engine.tiny import ensure_tiny_model

            base = load_settings(cache_dir=str(work / "cache"))
            path = ensure_tiny_model(tiny_model_dir(base, resolve_model("tiny-flux")), "flux")
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
        else:
            pipe = build_fullsize_flux(guidance_embeds=True, device=device)
            path = work / "flux-dev-random"
            pipe.save_pretrained(path, safe_serialization=True)
        pipe.set_progress_bar_config(disable=True)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 2:] = 255  # repaint the right half
        tasks = {"img2img": FluxImg2ImgPipeline.from_pipe(pipe), "inpaint": FluxInpaintPipeline.from_pipe(pipe)}
        for task, edit in tasks.items():
            edit.set_progress_bar_config(disable=True)
            kwargs: dict[str, Any] = {"prompt": PROMPT, "image": Image.fromarray(image), "strength": args.strength,
                                      "num_inference_steps": steps, "guidance_scale": 3.5, "height": size,
                                      "width": size, "max_sequence_length": 256}
            if task == "inpaint":
                kwargs["mask_image"] = Image.fromarray(mask)

            def plain(edit: Any = edit, kwargs: dict[str, Any] = kwargs) -> None:
                out = edit(**kwargs, generator=torch.Generator("cpu").manual_seed(1)).images[0]
                out.save(io.BytesIO(), format="PNG")  # PIL's defaults, as a plain script would

            seconds = _timed(plain, args.reps, device)
            rows.append({"task": task, "path": "baseline", "mode": "plain", "median_s": seconds})
        del tasks, pipe
        if device == "cuda":
            torch.cuda.empty_cache()
        for mode in args.modes.split(","):
            overrides = {k.removeprefix("FLUX_").lower(): v for k, v in MODES[mode].items()} if not args.tiny else {}
            settings = load_settings(model=str(path), device=device, warmup_enable=False, store_local=False,
                                     allow_any_model=True, cache_dir=str(work / "cache"), **overrides)
            runtime = Runtime(settings)
            engine = runtime.engines[0]
            model, _ = engine.load(runtime.default_spec)
            for task in ("img2img", "inpaint"):
                params = GenerationParams(runtime.default_spec.key, size, size, steps, 3.5, 256, task=task,
                                          strength=args.strength)
                request = ImageRequest(PROMPT, [1], images=[image], mask=mask if task == "inpaint" else None)

                level = settings.png_compress_level

                def fluxserve(params: GenerationParams = params, request: ImageRequest = request,
                              engine: Any = engine, model: Any = model, level: int = level) -> None:
                    result = engine.generate(model, params, [request])[0]
                    to_base64(encode_image(result.images[0], "png", png_level=level))

                rows.append({"task": task, "path": "engine", "mode": mode,
                             "median_s": _timed(fluxserve, args.reps, device), "modes": list(model.modes)})
            engine.release(set())
            runtime.encoder.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {r["task"]: r["median_s"] for r in rows if r["path"] == "baseline"}
    print(f"{'task':8} {'path':9} {'mode':9} {'median s':>9} {'vs (a)':>7}")
    for r in rows:
        r["ratio"] = round(base[r["task"]] / r["median_s"], 2)
        print(f"{r['task']:8} {r['path']:9} {r['mode']:9} {r['median_s']:9.3f} {r['ratio']:7.2f}")
    if args.out:
        args.out.write_text(json.dumps({"size": size, "steps": steps, "strength": args.strength, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
