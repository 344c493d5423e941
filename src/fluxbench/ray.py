"""Throughput of fluxserve on Ray Serve: replicas and batching strategies, through the full HTTP stack.

    python -m fluxbench.ray --replicas 1,2 --batching engine,serve,none
    python -m fluxbench.ray --model /path/to/flux-schnell --device cuda --gpus 1 --replicas 1 \
        --size 1024x1024 --steps 4 --concurrency 8 --single      # Ray's overhead on one GPU

With ``--single``, the same load first runs against one plain ``fluxserve serve`` on the same device and
settings, and each Ray row gets its ratio to it (requests/s and p50 latency), measured in the same run.

Each configuration is deployed fresh on one local Ray cluster (CPU replicas of tiny-flux, one CPU
each), warmed up, then driven by the official openai client from ``--concurrency`` threads. Batching:

* ``engine`` — the engine's dynamic batching (the default): each replica's scheduler merges queued
  compatible requests into one pipeline call, up to FLUX_MAX_BATCH images;
* ``serve`` — Ray Serve's ``@serve.batch`` in front of the engine (:class:`ServeBatchedModel`), up to
  FLUX_MAX_BATCH requests or ``--batch-wait-ms``;
* ``none`` — FLUX_MAX_BATCH=1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fluxserve.distributed.messages import RemoteRequest
from fluxserve.settings import Settings


def _serve_batched_model(batch_wait_s: float, max_batch: int) -> Any:
    """The ``@serve.batch`` variant of the model deployment (benchmark only)."""
    from ray import serve

    from fluxserve.distributed.deployments import _configure_logging, _replica_id
    from fluxserve.distributed.replica import ReplicaWorker
    from fluxserve.generation import ImageRequest, ImageResult
    from fluxserve.scheduler.jobs import JobError

    @serve.deployment
    class ServeBatchedModel:
        """Ray groups concurrent requests (``@serve.batch``); each group of compatible requests is one
        ``engine.generate`` call. Bypasses the replica's scheduler (no queue timeout, cancellation or
        progress events): only for comparing batching strategies."""

        def __init__(self, settings: Settings) -> None:
            _configure_logging(settings.observability)
            self.worker = ReplicaWorker(settings, _replica_id())
            self.engine = self.worker.runtime.engines[0]

        async def generate(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
            yield {"type": "accepted", "replica": self.worker.info()}
            outcome = await self.run_batch(request)
            if isinstance(outcome, JobError):
                yield {"type": "failed", "code": outcome.code, "message": outcome.message,
                       "status": outcome.status, "retry_after": None}
            else:
                yield {"type": "started", "batch_size": outcome.batch_size, "device": self.engine.device}
                yield {"type": "succeeded", "result": outcome}

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def run_batch(self, requests: list[RemoteRequest]) -> list[ImageResult | JobError]:
            model = self.engine.get(self.worker.key)
            assert model is not None, "the replica loaded its model at start-up"
            groups: dict[Any, list[int]] = {}
            for index, request in enumerate(requests):
                groups.setdefault(request.params, []).append(index)
            outcomes: list[ImageResult | JobError] = [JobError("not run", code="internal_error", status=500)] * len(
                requests)
            for params, indices in groups.items():
                batch = [ImageRequest(requests[i].prompt, list(requests[i].seeds), requests[i].negative_prompt)
                         for i in indices]
                try:
                    results = await asyncio.to_thread(self.engine.generate, model, params, batch)
                except Exception as exc:
                    for i in indices:
                        outcomes[i] = JobError(f"generation failed ({type(exc).__name__})", code="internal_error",
                                               status=500)
                    continue
                for i, result in zip(indices, results, strict=True):
                    outcomes[i] = result
            return outcomes

    return ServeBatchedModel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drive(base_url: str, requests: int, concurrency: int, size: str, steps: int, offset: int,
           model: str = "tiny-flux") -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def one(i: int) -> tuple[float, str, int]:
        started = time.perf_counter()
        response = client.images.generate(model=model, prompt=f"bench {offset + i}", size=size,
                                          extra_body={"seed": offset + i, "num_inference_steps": steps})
        assert response.data, "an answer without images"
        extra = response.data[0].model_extra or {}
        return time.perf_counter() - started, str(extra.get("replica")), int(extra.get("batch_size", 1))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    latencies = sorted(r[0] for r in rows)
    return {"images_per_s": round(requests / elapsed, 2), "seconds": round(elapsed, 2),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))], 3),
            "mean_batch": round(statistics.fmean(r[2] for r in rows), 2),
            "per_replica": dict(Counter(r[1].split("#")[-1] for r in rows))}


def _single_server(args: argparse.Namespace) -> dict[str, Any]:
    """The same load against one plain ``fluxserve serve`` (same model, device, batching), stopped afterwards."""
    import tempfile

    from fluxbench.serving import ServerProcess
    from fluxserve.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="fluxbench-ray-"))
    cache_dir = args.cache_dir if args.cache_dir is not None else Path(load_settings().cache_dir)
    server = ServerProcess(args.model, args.device, "plain", cache_dir, work / "single-server.log", [args.size],
                           env={"FLUX_MAX_BATCH": str(args.max_batch), "FLUX_JOB_STORE": "memory",
                                "FLUX_STATE_DIR": str(work / "state")})
    try:
        ready_s = server.start()
        _drive(server.base_url, 2 * args.concurrency, args.concurrency, args.size, args.steps, 10_000, args.model)
        row = {"replicas": 0, "batching": "single server", "deploy_s": round(ready_s, 1),
               **_drive(server.base_url, args.requests, args.concurrency, args.size, args.steps, 0, args.model)}
        print(json.dumps(row), flush=True)
        return row
    finally:
        server.stop()


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far, per kind of process: model replicas, the ingress, the
    Serve proxy, other Ray processes, and this benchmark (the clients)."""
    import psutil

    totals: dict[str, float] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["pid"] == me:
            kind = "clients (this process)"
        elif "FluxModel" in title:
            kind = "model replicas"
        elif "FluxIngress" in title:
            kind = "ingress"
        elif "ProxyActor" in title:
            kind = "serve proxy"
        elif title.startswith(("ray::", "/")) and ("ray" in title):
            kind = "other ray processes"
        else:
            kind = "rest of the machine"
        totals[kind] = totals.get(kind, 0.0) + times.user + times.system
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxbench.ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default 1,2)")
    parser.add_argument("--batching", default="engine", help="comma-separated: engine, serve, none")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4, help="FLUX_MAX_BATCH (and @serve.batch's size)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="@serve.batch's batch_wait_timeout")
    parser.add_argument("--cpus", type=float, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--cache-dir", type=Path, help="FLUX_CACHE_DIR with the tiny model (built if missing)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cpu", action="store_true", help="also report the cores each kind of process used")
    parser.add_argument("--model", default="tiny-flux", help="model key or local checkpoint (default tiny-flux)")
    parser.add_argument("--device", default="cpu", help="device of the replicas (cpu, cuda)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica (FLUX_RAY_NUM_GPUS)")
    parser.add_argument("--single", action="store_true",
                        help="first run the same load against one plain server on the same device, for the ratio")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import httpx
    import ray
    from ray import serve

    from fluxserve.distributed.ray_serve import APP_NAME, build_app

    single = _single_server(args) if args.single else None  # before Ray takes the device
    ray.init(address="local", num_cpus=args.cpus, num_gpus=max(1, int(args.gpus)) if args.gpus else 0,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    results: list[dict[str, Any]] = []
    try:
        for batching in args.batching.split(","):
            for replicas in (int(r) for r in args.replicas.split(",")):
                overrides: dict[str, Any] = {
                    "model": args.model, "device": args.device, "store_local": False, "warmup_sizes": [args.size],
                    "ray_num_gpus": args.gpus, "ray_num_cpus": 1, "ray_min_replicas": replicas,
                    "ray_max_replicas": replicas, "job_store": "memory",
                    "max_batch": 1 if batching == "none" else args.max_batch, "_env_file": None}
                if args.cache_dir is not None:
                    overrides["cache_dir"] = args.cache_dir
                settings = Settings(**overrides)
                model_cls = (_serve_batched_model(args.batch_wait_ms / 1000, args.max_batch)
                             if batching == "serve" else None)
                started = time.perf_counter()
                serve.run(build_app(settings, model_deployment=model_cls), name=APP_NAME, route_prefix="/")
                deadline = time.monotonic() + 900
                while httpx.get(base_url + "/ready", timeout=10).status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                deploy_s = time.perf_counter() - started
                _drive(base_url, 2 * args.concurrency, args.concurrency, args.size, args.steps, 10_000,
                       args.model)  # warm
                before = _cpu_seconds() if args.cpu else {}
                row = {"replicas": replicas, "batching": batching, "deploy_s": round(deploy_s, 1),
                       **_drive(base_url, args.requests, args.concurrency, args.size, args.steps, 0, args.model)}
                if single is not None:
                    row["vs_single_rps"] = round(row["images_per_s"] / single["images_per_s"], 3)
                    row["vs_single_p50"] = round(row["p50_s"] / single["p50_s"], 3)
                if args.cpu:  # average cores busy during the measured run, per kind of process
                    after = _cpu_seconds()
                    row["cores"] = {k: round((after[k] - before.get(k, 0.0)) / row["seconds"], 2)
                                    for k in sorted(after) if after[k] - before.get(k, 0.0) > 0.01}
                results.append(row)
                print(json.dumps(row), flush=True)
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    if single is not None:
        results.insert(0, single)
    command = "python -m fluxbench.ray " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command}\n{args.requests} requests, {args.concurrency} concurrent, {args.size}, {args.steps} steps, "
          f"{args.model} on {args.device} ({args.gpus:g} GPU, 1 CPU per replica), {os.cpu_count()} cores\n")
    print("| replicas | batching | images/s | p50 s | p95 s | mean batch | per replica | vs single (rps, p50) |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for r in results:
        versus = f"{r['vs_single_rps']}×, {r['vs_single_p50']}×" if "vs_single_rps" in r else ""
        print(f"| {r['replicas']} | {r['batching']} | {r['images_per_s']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['mean_batch']} | {r['per_replica']} | {versus} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
