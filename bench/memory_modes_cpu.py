"""Memory modes on tiny-flux on the CPU (the CPU figures in docs/memory.md).

Usage: ``python bench/memory_modes_cpu.py`` (REPS=9 by default; tiny models from FLUX_TEST_CACHE_DIR or
.cache/test, which the test suite builds). Timing: all modes loaded in one process and their runs
interleaved, so a fluctuating machine load hits every mode alike. Peak RSS: one fresh process per mode,
RSS sampled every 2 ms during one 1024x1024 n=2 generation (``ru_maxrss`` is useless for this: Linux
carries it across fork/exec).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("FLUX_TEST_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache" / "test"))
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "offload=model": {"offload": "model"},
    "vae_slicing+tiling(tile 256)": {"vae_slicing": True, "vae_tiling": True, "vae_tile_size": 256},
    "attention_slicing=max": {"attention_slicing": "max"},
}
CASES = ((64, 1, 2), (256, 1, 4), (1024, 2, 1))  # size, images, steps


def setup(name: str) -> tuple[Any, Any, float]:
    from fluxserve.engine.device import select_device_dtype
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.memory import check_memory_modes
    from fluxserve.models.registry import BUILTIN_MODELS
    from fluxserve.settings import Settings

    settings = Settings(model="tiny-flux", cache_dir=CACHE, device="cpu", _env_file=None,  # type: ignore[call-arg]
                        **MODES[name])
    plan = select_device_dtype("cpu")
    check_memory_modes(settings, plan)
    engine = DeviceEngine(settings, plan)
    started = time.perf_counter()
    model, _ = engine.load(BUILTIN_MODELS["tiny-flux"])
    return engine, model, time.perf_counter() - started


def generate(engine: Any, model: Any, size: int, n: int, steps: int) -> tuple[float, Any]:
    from fluxserve.generation import GenerationParams, ImageRequest

    started = time.perf_counter()
    params = GenerationParams("tiny-flux", size, size, steps, 0.0, 64)
    result = engine.generate(model, params, [ImageRequest("a", list(range(n)))])[0]
    return time.perf_counter() - started, result


def peak(name: str) -> None:
    import psutil

    from fluxserve.engine.memory import empty_cache

    engine, model, _ = setup(name)
    generate(engine, model, 64, 1, 1)
    empty_cache("cpu")
    proc = psutil.Process()
    base = proc.memory_info().rss
    top = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            top[0] = max(top[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    seconds, result = generate(engine, model, 1024, 2, 1)
    done.set()
    sampler.join()
    print(json.dumps({"mode": name, "peak_rss_growth_mib": round((top[0] - base) / 2**20, 1),
                      "decode_s": round(result.timings["vae_decode"], 2), "total_s": round(seconds, 2)}))


def timing(reps: int) -> None:
    engines = {name: setup(name) for name in MODES}
    weights = sum(p.numel() * p.element_size() for c in engines["none"][1].primary.components.values()
                  if hasattr(c, "parameters") for p in c.parameters())
    print(json.dumps({"weights_mib": round(weights / 2**20, 3), "modes": {k: v[1].modes for k, v in engines.items()}}))
    for size, n, steps in CASES:
        times: dict[str, list[float]] = {k: [] for k in MODES}
        for engine, model, _ in engines.values():
            generate(engine, model, size, n, steps)  # warm
        for _ in range(reps if size < 1024 else 3):
            for name, (engine, model, _) in engines.items():
                times[name].append(generate(engine, model, size, n, steps)[0])
        print(json.dumps({"case": f"{size}x{size} n={n} steps={steps}",
                          **{k: round(1000 * statistics.median(v), 1) for k, v in times.items()}}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--peak":
        peak(sys.argv[2])
        return
    import torch

    print("load average", os.getloadavg(), "torch threads", torch.get_num_threads())
    timing(int(os.environ.get("REPS", "9")))
    for name in MODES:
        done = subprocess.run([sys.executable, __file__, "--peak", name], capture_output=True, text=True, check=False)
        print(next((line for line in done.stdout.splitlines() if line.startswith("{")), done.stderr[-1500:]))
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
