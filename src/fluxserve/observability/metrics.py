"""Prometheus metrics and the rolling JSON summary.

The server runs one process (one uvicorn worker; devices are threads inside it), so a plain registry
is exact and Prometheus' multiprocess mode is not needed: scale out with more server processes, each
scraped as its own target. Each app gets its own registry so tests stay independent.

What is counted where (see docs/observability.md):

- ``fluxserve_requests_total`` / ``fluxserve_request_duration_seconds``: every HTTP request, in
  :class:`fluxserve.api.middleware.RequestContextMiddleware`, next to the access-log line.
- ``fluxserve_stage_duration_seconds``, ``fluxserve_images_generated_total``: one observation per
  succeeded generation request, next to its ``generation finished`` log line.
- ``model`` labels take only the names of models this server may serve (FLUX_MODEL, FLUX_PRELOAD_MODELS,
  FLUX_MODELS, models an admin selected); any other name is counted as ``other``, so clients naming
  made-up models cannot grow the number of series. A local pipeline directory is labelled
  ``local/<directory name>``, never with its path.
- ``fluxserve_oom_fallbacks_total{reason}``: one per generation (request or warmup) that needed the
  recovery ladder: ``reason`` is what went wrong first (``cuda_oom``, ``mps_oom``, ``cpu_oom``,
  ``nan_output``) when it recovered, ``failed`` when it ran out of rungs. Each increment has a log
  line with a ``fallback_reason``.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from pathlib import PurePath
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("queue_wait", "model_load", "text_encode", "denoise", "vae_decode", "image_encode", "save", "total")
"""The stages of a generation, in order; ``total`` is the whole request as the server handled it."""
ALIASES = {"pipeline_load": "model_load", "encode": "image_encode"}
"""Earlier server's timing names kept in responses (``generation`` is text_encode+denoise+vae_decode)."""
FALLBACK_KINDS = ("cuda_oom", "mps_oom", "cpu_oom", "nan_output")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


OTHER_MODEL = "other"
"""The ``model`` label of every model name this server does not serve."""


def model_label_of(key: str, source: str) -> str:
    """The label of an allowed model: its key, or ``local/<dir>`` when the key is a directory path."""
    if PurePath(key).is_absolute() or PurePath(source).is_absolute():
        return f"local/{PurePath(source).name}"
    return key


def fallback_label(reason: str | None, *, failed: bool = False) -> str:
    """The ``reason`` label for a fallback: its kind (``cpu_oom: cache cleanup`` → ``cpu_oom``)."""
    if failed:
        return "failed"
    kind = (reason or "").split(":", 1)[0].strip()
    return kind if kind in FALLBACK_KINDS else "other"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Metrics:
    def __init__(self, window: int = 200) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fluxserve_requests_total", "HTTP requests", ["endpoint", "status", "model"],
                                registry=r)
        self.request_duration = Histogram("fluxserve_request_duration_seconds", "HTTP request latency",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("fluxserve_stage_duration_seconds",
                                        "Generation time per stage, one observation per succeeded request",
                                        ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("fluxserve_images_generated_total", "Images generated, by model and task (generate, "
                              "img2img, inpaint, edit)", ["model", "task"], registry=r)
        self.queue_depth = Gauge("fluxserve_queue_depth", "Jobs waiting in the queue", registry=r)
        self.in_flight = Gauge("fluxserve_jobs_in_flight", "Jobs running on a device", registry=r)
        self.batch_size = Histogram("fluxserve_batch_size", "Images per pipeline call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.oom_fallbacks = Counter("fluxserve_oom_fallbacks_total",
                                     "Generations that needed the out-of-memory/NaN recovery ladder, by what "
                                     "went wrong first (reason=failed: the ladder ran out)", ["reason"], registry=r)
        self.cancelled = Counter("fluxserve_cancelled_total", "Jobs cancelled", registry=r)
        self.webhook_attempts = Counter("fluxserve_webhook_attempts_total",
                                        "Webhook delivery attempts, by event type and outcome (delivered, failed)",
                                        ["event", "outcome"], registry=r)
        self.durable_jobs = Counter("fluxserve_durable_jobs_total",
                                    "Async jobs this process recorded as ended in the job store, by state",
                                    ["state"], registry=r)
        self.model_load = Gauge("fluxserve_model_load_seconds", "Seconds the last load of a model took",
                                ["model"], registry=r)
        self.warmup = Gauge("fluxserve_warmup_seconds", "Seconds the last warmup generation of a model took",
                            ["model"], registry=r)
        self.device_memory = Gauge("fluxserve_device_memory_bytes", "Device memory by kind (allocated, "
                                   "reserved, free, total, process_rss...)", ["device", "kind"], registry=r)
        for stage in STAGES:  # every stage series exists from the start, at zero
            self.stage_duration.labels(stage=stage)
        self._model_labels: dict[str, str] = {}
        self._window: deque[dict[str, Any]] = deque(maxlen=window)
        self._lock = threading.Lock()

    # --- model labels ----------------------------------------------------------------------------
    def allow_models(self, specs: list[Any]) -> None:
        """Models whose names may appear as ``model`` labels (objects with ``key`` and ``source``)."""
        for spec in specs:
            self._model_labels[spec.key] = model_label_of(spec.key, spec.source)

    def model_label(self, name: str | None) -> str:
        """``name`` when this server serves it, ``""`` for none, else ``other``."""
        if not name:
            return ""
        return self._model_labels.get(name, OTHER_MODEL)

    # --- recording -------------------------------------------------------------------------------
    def observe_webhook(self, event: str, outcome: str) -> None:
        self.webhook_attempts.labels(event=event, outcome=outcome).inc()

    def observe_durable_end(self, state: str) -> None:
        self.durable_jobs.labels(state=state).inc()

    def observe_generation(self, model: str, images: int, timing: dict[str, float], *,
                           fallback_reason: str | None = None, task: str = "generate") -> None:
        """One succeeded generation request: stage histograms, image counter, rolling window."""
        for stage in STAGES:
            if stage in timing:
                self.stage_duration.labels(stage=stage).observe(max(0.0, timing[stage]))
        self.images.labels(model=self.model_label(model), task=task).inc(images)
        if fallback_reason:
            self.record_fallback(fallback_reason)
        now = time.monotonic()
        with self._lock:
            self._window.append({"end": now, "start": now - timing.get("total", 0.0), "images": images,
                                 "timing": {k: v for k, v in timing.items() if k in STAGES},
                                 "fallback": bool(fallback_reason)})

    def record_fallback(self, reason: str | None, *, failed: bool = False) -> None:
        self.oom_fallbacks.labels(reason=fallback_label(reason, failed=failed)).inc()

    # --- reading ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Rolling statistics over the last ``window`` succeeded generation requests."""
        with self._lock:
            items = list(self._window)
            size = self._window.maxlen
        stages: dict[str, dict[str, float]] = {}
        for stage in STAGES:
            values = sorted(i["timing"][stage] for i in items if stage in i["timing"])
            if values:
                stages[stage] = {"mean": statistics.fmean(values), "p50": percentile(values, 50),
                                 "p95": percentile(values, 95), "max": values[-1], "count": len(values)}
        images = sum(i["images"] for i in items)
        span = (max(i["end"] for i in items) - min(i["start"] for i in items)) if items else 0.0
        return {"window": len(items), "window_size": size, "requests": len(items), "images": images,
                "fallbacks": sum(1 for i in items if i["fallback"]),
                "span_seconds": span, "images_per_second": images / span if span > 0 else None,
                "stages": stages}

    def render(self) -> bytes:
        return generate_latest(self.registry)
