"""Throughput of one worker vs one worker per GPU (FLUX_DEVICES), full-size FLUX.1-schnell random weights.

Run on a machine with two CUDA GPUs from the repo root:
    PYTHONPATH=src python bench/multi_gpu.py --out results.json
Each configuration starts a real `fluxserve serve`, waits for /ready and drives it with
`fluxserve.loadtest.run_load` (concurrent HTTP clients on loopback). Batching is off (FLUX_MAX_BATCH=1)
so the figure isolates the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from fluxbench.serving import build_fullsize_flux
from fluxserve.loadtest import run_load


def serve(model: str, devices: str, port: int, log: Path, size: str,
          worker_processes: bool = False) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FLUX_MODEL=model, FLUX_DEVICES=devices, FLUX_PORT=str(port), FLUX_MAX_BATCH="1",
               FLUX_WARMUP_SIZES=size, FLUX_STORE_LOCAL="0", FLUX_MAX_QUEUE="256",
               FLUX_WORKER_PROCESSES="1" if worker_processes else "0")
    return subprocess.Popen([sys.executable, "-m", "fluxserve", "serve"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--worker-processes", action="store_true",
                        help="FLUX_WORKER_PROCESSES=1: each device's engine in its own process")
    args = parser.parse_args()
    results: dict[str, object] = {"worker_processes": args.worker_processes}
    results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    results["torch"] = torch.__version__
    path = Path(tempfile.gettempdir()) / "flux-schnell-random"
    started = time.perf_counter()
    pipe = build_fullsize_flux(device="cuda:0")
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    results["prepare_s"] = time.perf_counter() - started
    body = {"prompt": "a lighthouse", "size": args.size, "num_inference_steps": 4}
    for devices in ("cuda:0", "cuda:0,cuda:1"):
        port = 8100 + len(devices)
        log = args.out.parent / f"serve-{devices.replace(':', '').replace(',', '-')}.log"
        proc = serve(str(path), devices, port, log, args.size, args.worker_processes)
        t0 = time.perf_counter()
        url = f"http://127.0.0.1:{port}"
        while time.perf_counter() - t0 < 240:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        load = asyncio.run(run_load(url, clients=args.clients, requests=args.requests, body=body, max_seconds=120))
        results[devices] = {"ready_s": ready_s, **load.summary()}
        args.out.write_text(json.dumps(results, indent=2))
        proc.terminate()
        proc.wait(60)
    one, two = results["cuda:0"], results["cuda:0,cuda:1"]
    print(json.dumps({"one_worker_img_s": one["images_per_second"], "two_workers_img_s": two["images_per_second"],  # type: ignore[index]
                      "ratio": two["images_per_second"] / max(1e-9, one["images_per_second"])}))  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
