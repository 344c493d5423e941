"""What travels between the ingress and the model replicas (pickled by Ray; no Ray import here).

A request is a :class:`RemoteRequest`. A replica answers with a stream of event dicts that mirror
the events of a local :class:`~fluxserve.scheduler.jobs.Job`, so the ingress can replay them onto its
own ``Job`` and every route (plain, streamed, async jobs, cancel) works unchanged:

* ``{"type": "accepted", "replica": ReplicaInfo}`` — first event: a replica took the request;
* ``{"type": "queued", "queue_position": int}`` / ``{"type": "started", "batch_size": int, "device": str}``;
* ``{"type": "progress", "step": int, "total": int, "preview"?: ndarray}``;
* ``{"type": "succeeded", "result": ImageResult}`` (raw uint8 pixels: the ingress encodes them);
* ``{"type": "failed" | "cancelled", "code", "message", "status", "retry_after"}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fluxserve.generation import GenerationParams
from fluxserve.models.devices import DevicePlan
from fluxserve.models.spec import ModelSpec

FINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled", "expired"})
DEPLOYMENT_PREFIX = "FluxModel-"
INGRESS_DEPLOYMENT = "FluxIngress"


def deployment_name(model_key: str) -> str:
    """Ray Serve deployment name of a model key (one deployment per model)."""
    return DEPLOYMENT_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", model_key)


@dataclass(frozen=True)
class RemoteRequest:
    """One generation request for a model replica: what a local scheduler's ``Job`` is built from."""

    job_id: str
    spec: ModelSpec
    params: GenerationParams
    prompt: str
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    partial_images: int = 0
    attempt: int = 0
    """0 for the first try; retries after a lost replica count up."""
    images: tuple[Any, ...] = ()
    """Edits: the input images (``uint8`` arrays), as ``Job.images``."""
    mask: Any = None
    """Inpainting: the mask (``uint8`` array), as ``Job.mask``."""


@dataclass(frozen=True)
class ReplicaInfo:
    """A model replica describes itself with this (first event of each answer, and ``info()``)."""

    replica_id: str
    """``<deployment>#<unique id>``, the value of ``replica`` in responses."""
    deployment: str
    model: str
    pid: int
    node: str
    plan: DevicePlan
    load_seconds: float = 0.0
    modes: tuple[str, ...] = ()
    warmup: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """JSON-safe view for ``/v1/models``."""
        return {"id": self.replica_id, "deployment": self.deployment, "pid": self.pid, "node": self.node,
                "device": self.plan.device, "dtype": self.plan.dtype, "load_seconds": round(self.load_seconds, 3),
                "modes": list(self.modes), "warmup": self.warmup}


@dataclass(frozen=True)
class ReplicaStatus:
    """What Ray's controller says about one replica of a deployment."""

    replica_id: str
    state: str
    pid: int | None = None
    node_ip: str | None = None
