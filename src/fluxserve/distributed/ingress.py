"""The HTTP side on Ray Serve: fluxserve's own app, serving the models of the deployments' replicas.

The ingress serves :func:`fluxserve.api.app.create_app` unchanged (same routes, protocol models,
errors, auth, metrics) on a :class:`~fluxserve.runtime.Runtime` composed of two parts of its own: a
:class:`RemoteCatalog` (which models are deployed, their replicas from Ray's table, readiness) and a
:class:`~.remote_queue.RemoteScheduler` (the job queue that dispatches to the replicas). Nothing is
subclassed: the serving layer encodes the pixels exactly as on a single server and each image says which
``replica`` made it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.catalog import ModelNames
from fluxserve.distributed.messages import RemoteRequest, ReplicaInfo, ReplicaStatus, deployment_name
from fluxserve.distributed.remote_queue import Backpressure, ModelClient, RemoteScheduler, ReplicaLost
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.devices import BackendProbe, DevicePlan, resolve_plan
from fluxserve.models.handle import ModelHandle, WarmupRuns
from fluxserve.models.registry import UnknownModelError, family_descriptor
from fluxserve.models.spec import ModelSpec
from fluxserve.runtime import Runtime
from fluxserve.scheduler.scheduler import Hook
from fluxserve.settings import Settings

__all__ = ["Backpressure", "LocalModelClient", "ModelClient", "RemoteCatalog", "ReplicaLost", "StatusSource",
           "build_ingress_app"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0
"""Seconds between polls of Ray's replica table (readiness and ``/v1/models``)."""

StatusSource = Callable[[], Awaitable[dict[str, list[ReplicaStatus]]]]
"""Returns Ray's replica table: model key → replicas (with state)."""


RAY_LORAS_UNAVAILABLE = ("adapters load on the Ray Serve replicas with the first request that names them in "
                         "'loras'; /v1/loras/load and /v1/loras/unload are not available on Ray Serve")


@dataclass
class RemoteModel:
    """A model on one Ray Serve replica, as the routes see it: the Ray
    :class:`~fluxserve.models.handle.ModelHandle`. Token counts ask a replica of the model (Ray picks which);
    prompt-cache figures and adapters stay on the replicas."""

    spec: ModelSpec
    info: ReplicaInfo
    client: ModelClient
    loaded_at: float = 0.0

    @property
    def warmup(self) -> WarmupRuns:
        return self.info.warmup

    @property
    def descriptor(self) -> FamilyDescriptor:
        return family_descriptor(self.spec.family)

    @property
    def plan(self) -> DevicePlan:
        return self.info.plan

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.info.plan.device,)

    @property
    def modes(self) -> list[str]:
        return list(self.info.modes)

    @property
    def load_seconds(self) -> float:
        return self.info.load_seconds

    def prompt_cache_stats(self) -> None:
        return None

    def token_count(self, prompt: str) -> dict[str, int]:
        return self.client.token_count(prompt)

    @property
    def loras(self) -> None:
        return None

    @property
    def loras_unavailable(self) -> str:
        return RAY_LORAS_UNAVAILABLE


class RemoteCatalog:
    """The ingress's :class:`~fluxserve.scheduler.protocols.ModelCatalog`: the deployed models, their replicas
    from Ray's table, and readiness from it. Loading is the replicas' business (Ray starts them)."""

    def __init__(self, settings: Settings, clients: Mapping[str, ModelClient], queue: RemoteScheduler,
                 status: StatusSource | None = None) -> None:
        self.settings = settings
        self.clients = dict(clients)
        self.queue = queue
        self.names = ModelNames(settings)
        # The ingress's own plan until a replica answers with the one it resolved: the ingress computes on the CPU
        # only (image encoding), so it resolves a CPU plan without asking torch what the machine has.
        self.plans: list[DevicePlan] = [resolve_plan("cpu", "auto", "cpu", BackendProbe())]
        self.status_source = status
        self.replica_table: dict[str, list[ReplicaStatus]] = {}
        self.status_error: str | None = None
        self._status_seen = status is None
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        missing = [key for key in self.names.configured if key not in self.clients]
        if missing:
            raise ValueError(f"no model deployment for {missing}; deployed: {sorted(self.clients)}")

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Call on the app's event loop (the lifespan does)."""
        log.info("ingress started", extra={"ctx": {"models": {k: deployment_name(k) for k in self.clients},
                                                     "settings": self.settings.redacted(), "version": __version__}})
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    def wait_started(self, timeout: float | None = None) -> bool:
        return True  # nothing loads here

    def close(self) -> None:
        self._closing = True
        if self._poller is not None:
            self._poller.get_loop().call_soon_threadsafe(self._poller.cancel)

    async def _poll(self) -> None:
        while not self._closing:
            if self.status_source is not None:
                try:
                    self._apply(await self.status_source())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = type(exc).__name__
                    if error != self.status_error:
                        log.warning("could not read the replica table: %s: %s", error, exc)
                    self.status_error = error
            self.queue.housekeeping()
            await asyncio.sleep(STATUS_INTERVAL)

    def _apply(self, table: dict[str, list[ReplicaStatus]]) -> None:
        """Take in Ray's replica table: running counts, replicas that are gone, the replicas' plans."""
        queue = self.queue
        self.replica_table = table
        queue.running_replicas = {key: sum(1 for r in table.get(key, []) if r.state == "RUNNING")
                                  for key in self.clients}
        listed = {r.replica_id for rows in table.values() for r in rows}
        for replica_id in [rid for rid in queue.replica_infos if rid not in listed]:
            del queue.replica_infos[replica_id]  # replaced or scaled down
            queue.served.pop(replica_id, None)
        self.status_error = None
        self._status_seen = True
        plans: list[DevicePlan] = []
        for info in queue.replica_infos.values():  # /v1/models's device/dtype: the replicas', once one answered
            if info.plan not in plans:
                plans.append(info.plan)
        if plans:
            self.plans = plans

    def readiness_problems(self) -> list[str]:
        reasons = []
        if not self._status_seen:
            reasons.append("waiting for the first replica status from Ray Serve")
        elif self.status_source is not None:
            for key in self.clients:
                if self.queue.running_replicas.get(key, 0) == 0:
                    reasons.append(f"model {key} has no running replica ({deployment_name(key)})")
        if self.status_error:
            reasons.append(f"replica status unavailable ({self.status_error})")
        return reasons

    # --- models ----------------------------------------------------------------------------------
    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec:
        # the deployed models are this application's allowlist: one check, answering 404 for the others
        spec = self.names.resolve(name, from_request=from_request, operator=True)
        if spec.key not in self.clients:
            raise UnknownModelError(f"model {name!r} is not served by this Ray Serve application; deployed: "
                                    f"{', '.join(self.clients)} (add it to FLUX_PRELOAD_MODELS)")
        return spec

    def known_models(self) -> list[ModelSpec]:
        return [self.names.configured[key] for key in self.clients if key in self.names.configured]

    def select(self, name: str) -> ModelSpec:
        spec = self.resolve(name)  # every deployed model is loaded on its replicas
        self.names.activate(spec)
        return spec

    def memory(self) -> list[dict[str, Any]]:
        return []  # the replicas report their own

    def unload(self, key: str) -> tuple[list[str], int]:
        return [], 0  # Ray owns the replicas' lifetime (scale the deployment instead)

    def release(self, keep: set[str]) -> tuple[list[str], int]:
        return [], 0

    def model_info(self, key: str) -> dict[str, ModelHandle]:
        """Replica id → :class:`RemoteModel` for the replicas of ``key`` that answered at least once."""
        client = self.clients.get(key)
        if client is None:
            return {}
        alive = {r.replica_id for r in self.replica_table.get(key, []) if r.state == "RUNNING"}
        spec = self.names.configured[key]
        return {rid: RemoteModel(spec, info, client) for rid, info in self.queue.replica_infos.items()
                if info.model == key and (not self.replica_table or rid in alive)}

    def replicas(self, key: str) -> list[dict[str, Any]] | None:
        """The replicas of ``key``'s deployment for ``/v1/models``: Ray's table joined with what each
        replica said about itself (device, dtype, load time) and how many requests it served here."""
        rows: list[dict[str, Any]] = []
        for status in self.replica_table.get(key, []):
            row: dict[str, Any] = {"id": status.replica_id, "state": status.state, "pid": status.pid,
                                   "node_ip": status.node_ip}
            info = self.queue.replica_infos.get(status.replica_id)
            if info is not None:
                row.update({k: v for k, v in info.public().items() if k not in row or row[k] is None})
            row["served"] = self.queue.served.get(status.replica_id, 0)
            rows.append(row)
        return rows


def ingress_backend(clients: Mapping[str, ModelClient], status: StatusSource | None = None, *,
                    max_retries: int = 2) -> Callable[[Settings, Hook], tuple[RemoteCatalog, RemoteScheduler]]:
    """The :data:`fluxserve.runtime.Backend` of the ingress: a remote queue and the catalog over it."""

    def build(settings: Settings, hook: Hook) -> tuple[RemoteCatalog, RemoteScheduler]:
        queue = RemoteScheduler(settings, clients, hook=hook, max_retries=max_retries)
        return RemoteCatalog(settings, clients, queue, status), queue

    return build


def build_ingress_app(settings: Settings, clients: Mapping[str, ModelClient], status: StatusSource | None = None,
                      *, max_retries: int = 2) -> FastAPI:
    """fluxserve's app (``create_app``) on a runtime of the ingress's catalog and queue; its lifespan starts
    and stops it."""
    from fluxserve.api.app import create_app

    runtime = Runtime(settings, backend=ingress_backend(clients, status, max_retries=max_retries))
    return create_app(settings, runtime, manage_runtime=True)


# --- in-process model client (tests, and a Ray-free way to try the ingress) --------------------------
class LocalModelClient:
    """A :class:`ModelClient` over in-process :class:`~.replica.ReplicaWorker` objects (round robin)."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = list(workers)
        self._next = 0

    def _pick(self) -> Any:
        if not self.workers:
            raise ReplicaLost("no replica is running")
        worker = self.workers[self._next % len(self.workers)]
        self._next += 1
        return worker

    async def stream(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        worker = self._pick()
        async for event in worker.run(request):
            yield event

    def token_count(self, prompt: str) -> dict[str, int]:
        counts: dict[str, int] = self._pick().token_count(prompt)
        return counts
