"""Settings → Ray Serve deployment options. Pure functions, no Ray import (unit-tested without Ray).

Replicas and autoscaling come from ``FLUX_RAY_*``:

* ``FLUX_RAY_MIN_REPLICAS == FLUX_RAY_MAX_REPLICAS`` → a fixed ``num_replicas``; otherwise an
  ``autoscaling_config`` with ``FLUX_RAY_TARGET_ONGOING_REQUESTS`` (``initial_replicas`` is at least 1
  so a fresh deployment answers at once even with ``min_replicas = 0``);
* ``FLUX_RAY_NUM_GPUS`` / ``FLUX_RAY_NUM_CPUS`` → ``ray_actor_options`` (one replica per GPU with the
  default 1; 0 GPUs gives CPU replicas);
* ``FLUX_RAY_MAX_QUEUED_REQUESTS`` → ``max_queued_requests`` (requests waiting in front of the
  replicas, per caller); the ingress enforces the same bound itself so a full queue is the single
  server's 429 ``queue_full`` with ``Retry-After``.

``max_ongoing_requests`` (requests a replica holds at once) is twice what its engine runs at once
with dynamic batching, ``2 × FLUX_MAX_BATCH × FLUX_MAX_CONCURRENT`` (at least the autoscaling
target): one batch running, the next one already waiting on the replica.
"""

from __future__ import annotations

import math
from typing import Any

from fluxserve.models.registry import resolve_model
from fluxserve.settings import Settings

INGRESS_MAX_ONGOING_REQUESTS = 1000
"""HTTP requests one ingress replica holds at once; they only wait on the model replicas (async)."""


def model_keys(settings: Settings) -> list[str]:
    """The models served: FLUX_MODEL first, then FLUX_PRELOAD_MODELS (one deployment each)."""
    keys: list[str] = []
    for name in [settings.model, *settings.preload_models]:
        key = resolve_model(name).key
        if key not in keys:
            keys.append(key)
    return keys


def slots_per_replica(settings: Settings) -> int:
    """Requests one replica can run at once: FLUX_MAX_CONCURRENT slots × FLUX_MAX_BATCH images."""
    return max(1, settings.max_concurrent * settings.max_batch)


def max_ongoing_requests(settings: Settings) -> int:
    """Requests Ray hands one replica at once: a full batch running and a full batch queued behind it,
    so the engine never idles waiting for the next requests to travel from the ingress."""
    return max(2 * slots_per_replica(settings), math.ceil(settings.ray_target_ongoing_requests))


def replica_device(settings: Settings) -> str:
    """The device a replica runs on: Ray sets CUDA_VISIBLE_DEVICES, so a GPU replica sees ``cuda``."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if settings.ray_num_gpus > 0 else "cpu"


def replica_settings(settings: Settings, key: str) -> Settings:
    """Settings of one model replica: that model only, Ray's device, a queue that never refuses what
    Ray routes to it (Ray holds at most ``max_ongoing_requests`` per replica)."""
    return settings.model_copy(update={
        "model": key, "preload_models": [], "devices": [], "device": replica_device(settings),
        "max_queue": max(settings.max_queue, max_ongoing_requests(settings)),
    })


def ingress_settings(settings: Settings) -> Settings:
    """Settings of the HTTP ingress: it never touches a GPU (it encodes images on the CPU)."""
    return settings.model_copy(update={"device": "cpu", "devices": []})


def model_deployment_options(settings: Settings) -> dict[str, Any]:
    """``Deployment.options(...)`` of each model deployment."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": settings.ray_num_gpus, "num_cpus": settings.ray_num_cpus},
        "max_ongoing_requests": max_ongoing_requests(settings),
        "max_queued_requests": settings.ray_max_queued_requests,
        "backpressure_config": {"status_code": 429},
        "graceful_shutdown_timeout_s": max(1.0, settings.shutdown_timeout),
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "max_constructor_retry_count": 3,  # a model that cannot load fails the same way each time
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        options["num_replicas"] = settings.ray_max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "initial_replicas": max(1, settings.ray_min_replicas),
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        }
    return options


def ingress_deployment_options(settings: Settings) -> dict[str, Any]:
    """``Deployment.options(...)`` of the HTTP ingress: one replica, no CPU reserved (it is I/O-bound;
    give it CPUs and replicas in the Serve config YAML for heavy image encoding)."""
    return {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
        "graceful_shutdown_timeout_s": max(1.0, settings.shutdown_timeout),
    }
