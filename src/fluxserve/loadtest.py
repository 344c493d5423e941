"""``fluxserve loadtest``: N concurrent clients against a running server, bounded in count and time.

Prints p50/p95/p99 latency, images/s, counts per status and the slowest /health answer seen while
the load ran. Loopback only by default: it refuses other hosts unless ``--allow-remote`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    images: int = 0
    invalid_images: int = 0
    retry_after_missing: int = 0
    health_checks: int = 0
    health_failures: int = 0
    health_max_latency: float = 0.0
    wall: float = 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": self.errors,
            "images": self.images, "invalid_images": self.invalid_images,
            "images_per_second": self.images / self.wall if self.wall else 0.0,
            "latency_s": {"p50": self.percentile(0.5), "p95": self.percentile(0.95), "p99": self.percentile(0.99)},
            "retry_after_missing": self.retry_after_missing,
            "health": {"checks": self.health_checks, "failures": self.health_failures,
                       "max_latency_s": self.health_max_latency},
            "wall_s": self.wall,
        }


def _valid_png(b64: str) -> bool:
    try:
        data = base64.b64decode(b64, validate=True)
    except ValueError:
        return False
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip().endswith(b"IEND\xaeB`\x82")


async def run_load(base_url: str, *, clients: int, requests: int, body: dict[str, Any], timeout: float = 300,
                   max_seconds: float = 600, api_key: str | None = None) -> LoadResult:
    """Send ``requests`` generations from ``clients`` concurrent clients; stop early after ``max_seconds``."""
    result = LoadResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    remaining = requests
    deadline = time.monotonic() + max_seconds
    stop_health = asyncio.Event()

    async def client_loop(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            started = time.perf_counter()
            try:
                response = await http.post("/v1/images/generations", json=body, headers=headers)
            except httpx.HTTPError as exc:
                result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
                continue
            result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                result.latencies.append(time.perf_counter() - started)
                for item in response.json().get("data", []):
                    result.images += 1
                    if body.get("output_format", "png") == "png" and not _valid_png(item.get("b64_json", "")):
                        result.invalid_images += 1
            elif response.status_code == 429 and "retry-after" not in response.headers:
                result.retry_after_missing += 1

    async def health_loop(http: httpx.AsyncClient) -> None:
        while not stop_health.is_set():
            started = time.perf_counter()
            try:
                response = await http.get("/health", timeout=5)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            result.health_checks += 1
            result.health_failures += 0 if ok else 1
            result.health_max_latency = max(result.health_max_latency, time.perf_counter() - started)
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as http:
        started = time.perf_counter()
        health = asyncio.create_task(health_loop(http))
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        result.wall = time.perf_counter() - started
        stop_health.set()
        await health
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxserve loadtest", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--model")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--api-key")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname or ""
    if host not in _LOOPBACK and not args.allow_remote:
        print(f"refusing to load-test {host!r}: loopback only unless --allow-remote", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"prompt": args.prompt, "size": args.size}
    if args.model:
        body["model"] = args.model
    if args.steps:
        body["num_inference_steps"] = args.steps
    result = asyncio.run(run_load(args.url, clients=args.clients, requests=args.requests, body=body,
                                  max_seconds=args.max_seconds, api_key=args.api_key))
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat = summary["latency_s"]
        fmt = (lambda v: f"{v:.3f}s" if v is not None else "-")  # noqa: E731
        print(f"requests={summary['requests']} clients={args.clients} wall={result.wall:.1f}s "
              f"images/s={summary['images_per_second']:.2f}")
        print(f"latency p50={fmt(lat['p50'])} p95={fmt(lat['p95'])} p99={fmt(lat['p99'])}")
        print("statuses " + " ".join(f"{k}={v}" for k, v in summary["statuses"].items())
              + (f" errors={summary['transport_errors']}" if summary["transport_errors"] else ""))
        print(f"health checks={result.health_checks} failures={result.health_failures} "
              f"max={result.health_max_latency * 1000:.0f}ms")
    ok = not result.errors and result.invalid_images == 0 and result.health_failures == 0
    return 0 if ok else 1
