"""Prometheus metrics and the rolling JSON summary.

The server runs one process (one uvicorn worker; devices are threads inside it), so a plain registry
is exact; multiprocess mode is not needed. Each app gets its own registry so tests stay independent.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("queue_wait", "model_load", "text_encode", "denoise", "vae_decode", "image_encode", "save", "total")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, window: int = 200) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fluxserve_requests_total", "HTTP requests", ["endpoint", "status", "model"],
                                registry=r)
        self.request_duration = Histogram("fluxserve_request_duration_seconds", "HTTP request latency",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("fluxserve_stage_duration_seconds", "Generation time per stage",
                                        ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("fluxserve_images_generated_total", "Images generated", ["model"], registry=r)
        self.queue_depth = Gauge("fluxserve_queue_depth", "Jobs waiting in the queue", registry=r)
        self.in_flight = Gauge("fluxserve_jobs_in_flight", "Jobs running on a device", registry=r)
        self.batch_size = Histogram("fluxserve_batch_size", "Images per pipeline call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.oom_fallbacks = Counter("fluxserve_oom_fallbacks_total", "Out-of-memory/NaN recoveries and failures",
                                     ["reason"], registry=r)
        self.cancelled = Counter("fluxserve_cancelled_total", "Jobs cancelled", registry=r)
        self.model_load = Gauge("fluxserve_model_load_seconds", "Seconds the last load of a model took",
                                ["model"], registry=r)
        self.warmup = Gauge("fluxserve_warmup_seconds", "Seconds the warmup of a model took", ["model"], registry=r)
        self.device_memory = Gauge("fluxserve_device_memory_bytes", "Device memory in use", ["device", "kind"],
                                   registry=r)
        self._window: deque[dict[str, Any]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe_generation(self, model: str, images: int, timing: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timing:
                self.stage_duration.labels(stage=stage).observe(timing[stage])
        self.images.labels(model=model).inc(images)
        with self._lock:
            self._window.append({"at": time.time(), "images": images, "timing": dict(timing)})

    def summary(self) -> dict[str, Any]:
        with self._lock:
            items = list(self._window)
        stages: dict[str, dict[str, float]] = {}
        for stage in STAGES:
            values = sorted(i["timing"][stage] for i in items if stage in i["timing"])
            if values:
                stages[stage] = {
                    "mean": statistics.fmean(values),
                    "p50": values[len(values) // 2],
                    "p95": values[min(len(values) - 1, int(len(values) * 0.95))],
                    "count": len(values),
                }
        images = sum(i["images"] for i in items)
        span = (items[-1]["at"] - items[0]["at"]) if len(items) > 1 else 0.0
        return {"window": len(items), "images": images,
                "images_per_second": images / span if span > 0 else None, "stages": stages}

    def render(self) -> bytes:
        return generate_latest(self.registry)
