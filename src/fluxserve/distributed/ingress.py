"""The HTTP side on Ray Serve: fluxserve's own app with a scheduler that dispatches to model replicas.

The ingress serves :func:`fluxserve.api.app.create_app` unchanged (same routes, protocol models,
errors, auth, metrics). Only its runtime differs: :class:`IngressRuntime` loads no model and its
scheduler, :class:`RemoteScheduler`, sends each :class:`~fluxserve.scheduler.jobs.Job` to the model
deployment named by the request's ``model`` and replays the replica's events onto the job. The
serving layer then encodes the pixels exactly as on a single server and each image says which
``replica`` made it.

Failure handling:

* the queue in front of a model's replicas is bounded by ``FLUX_RAY_MAX_QUEUED_REQUESTS``: a full
  queue answers 429 ``queue_full`` with ``Retry-After`` at once (Ray's own back-pressure error maps
  to the same answer);
* a replica that dies with requests on it (:class:`ReplicaLost`) — those requests are retried on
  another replica, up to ``max_retries`` times (same seeds, so the same images), then fail with
  503 ``replica_unavailable``; Ray starts a replacement replica meanwhile;
* a cancelled job (client gone, ``DELETE /v1/images/jobs/{id}``, ``/v1/images/cancel``) cancels the
  remote call, which cancels the job on the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI

from fluxserve import __version__
from fluxserve.distributed.config import slots_per_replica
from fluxserve.distributed.messages import (
    FINAL_EVENTS,
    RemoteRequest,
    ReplicaInfo,
    ReplicaStatus,
    deployment_name,
)
from fluxserve.engine.device import DevicePlan
from fluxserve.engine.loading import LoadedModel
from fluxserve.engine.registry import ModelSpec, UnknownModelError
from fluxserve.runtime import Runtime
from fluxserve.scheduler.jobs import FINISHED, Job, JobError, JobStatus, queue_full
from fluxserve.scheduler.scheduler import Hook, Scheduler
from fluxserve.settings import Settings

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0
"""Seconds between polls of Ray's replica table (readiness and ``/v1/models``)."""


class ReplicaLost(RuntimeError):
    """The replica running a request died or became unreachable; the request may be retried."""


class Backpressure(RuntimeError):
    """Ray refused the request: the deployment's queue (``max_queued_requests``) is full."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelClient(Protocol):
    """How the ingress reaches one model deployment (Ray handle in production, in-process in tests)."""

    def stream(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        """The replica's events for ``request``; raises :class:`ReplicaLost` or :class:`Backpressure`.
        Closing the iterator early cancels the remote call."""
        ...

    def token_count(self, prompt: str) -> dict[str, int]:
        """Blocking (called from a worker thread): the prompt's token counts on a replica."""
        ...


StatusSource = Callable[[], Awaitable[dict[str, list[ReplicaStatus]]]]
"""Returns Ray's replica table: model key → replicas (with state)."""


@dataclass
class _Dispatch:
    job: Job
    key: str
    accepted: bool = False
    task: asyncio.Task[None] | Future[None] | None = None


class RemoteScheduler(Scheduler):
    """A :class:`Scheduler` with no local devices: jobs run on the model deployments' replicas.

    ``submit``/``get``/``cancel``/``stats``/``drain`` keep the local scheduler's contract, so the
    serving layer and the routes cannot tell the difference.
    """

    def __init__(self, settings: Settings, clients: Mapping[str, ModelClient], *, hook: Hook | None = None,
                 max_retries: int = 2, retry_backoff: float = 0.2) -> None:
        super().__init__(settings, [], hook=hook)
        self.clients = dict(clients)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_queued = settings.ray_max_queued_requests
        self.slots_per_replica = slots_per_replica(settings)
        self.running_replicas: dict[str, int] = {key: 1 for key in self.clients}
        self.replica_infos: dict[str, ReplicaInfo] = {}
        self.served: dict[str, int] = {}
        self.retries = 0
        self._lock = threading.Lock()
        self._dispatches: dict[str, _Dispatch] = {}
        self._finished: dict[str, Job] = {}
        self._durations: dict[str, deque[float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Call on the event loop that will run the dispatch tasks (the app's)."""
        self._loop = asyncio.get_running_loop()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for dispatched jobs; cancel the rest. Call from a worker thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._dispatches:
                    return 0
            time.sleep(0.05)
        with self._lock:
            leftovers = list(self._dispatches.values())
        error = JobError("the server is shutting down; the job was cancelled", code="shutting_down", status=503)
        for dispatch in leftovers:
            dispatch.job.request_cancel()
            if dispatch.job.finish(JobStatus.CANCELLED, error=error):
                self._hook("job_cancelled", {"job": dispatch.job})
            self._cancel_task(dispatch)
        return len(leftovers)

    def shutdown(self) -> None:
        with self._lock:
            leftovers = list(self._dispatches.values())
        for dispatch in leftovers:
            self._cancel_task(dispatch)

    # --- models ----------------------------------------------------------------------------------
    def ensure_loaded(self, spec: ModelSpec, wait: bool = True, timeout: float | None = None) -> list[LoadedModel]:
        """Models live on their deployments' replicas; only check that ``spec`` has one."""
        if spec.key not in self.clients:
            raise JobError(f"model {spec.key!r} has no deployment on this Ray Serve application",
                           code="model_unavailable", status=503)
        return []

    def is_loaded(self, key: str) -> bool:
        return key in self.clients and self.running_replicas.get(key, 0) > 0

    @property
    def consecutive_oom_failures(self) -> int:
        return 0  # each replica's own health check reports (and Ray replaces) replicas failing OOM

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Dispatch ``job`` to its model's replicas, or refuse at once (429 ``queue_full``, 503)."""
        if not self.accepting:
            raise JobError("the server is shutting down", code="shutting_down", status=503)
        client = self.clients.get(job.spec.key)
        if client is None:
            raise JobError(f"model {job.spec.key!r} has no deployment on this Ray Serve application",
                           code="model_unavailable", status=503)
        with self._lock:
            waiting = sum(1 for d in self._dispatches.values() if d.key == job.spec.key and not d.accepted)
            if 0 <= self.max_queued <= waiting:
                raise queue_full(f"the queue of {job.spec.key} is full ({self.max_queued} waiting for a replica; "
                                 "FLUX_RAY_MAX_QUEUED_REQUESTS); retry later",
                                 self._estimate_retry_after(job.spec.key, waiting))
            dispatch = _Dispatch(job, job.spec.key)
            self._dispatches[job.id] = dispatch
            self._finished.pop(job.id, None)
        job.queue_position = waiting + 1
        job.total_steps = job.params.steps
        self._hook("job_queued", {"job": job})
        job.emit({"type": "queued", "queue_position": job.queue_position})
        coro = self._dispatch(dispatch, client)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called from a worker thread: run on the app's loop
            if self._loop is None:
                coro.close()
                self._forget(dispatch)
                raise RuntimeError("RemoteScheduler.start() was not called on the app's event loop") from None
            dispatch.task = asyncio.run_coroutine_threadsafe(coro, self._loop)
        else:
            dispatch.task = loop.create_task(coro)
        # A task cancelled before its first step never runs its body: clean up in a callback.
        dispatch.task.add_done_callback(lambda _task: self._forget(dispatch))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            dispatch = self._dispatches.get(job_id)
            return dispatch.job if dispatch is not None else self._finished.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a dispatched job: it is cancelled here at once, and on its replica right after."""
        with self._lock:
            dispatch = self._dispatches.get(job_id)
        if dispatch is None or dispatch.job.status in FINISHED:
            return None
        job = dispatch.job
        job.request_cancel()
        state = "running" if job.status is JobStatus.RUNNING else "queued"
        if job.finish(JobStatus.CANCELLED, error=JobError(f"the job was cancelled while {state}", code="cancelled",
                                                         status=499)):
            self._hook("job_cancelled", {"job": job})
        self._cancel_task(dispatch)
        return job

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = sum(1 for d in self._dispatches.values() if not d.accepted)
            running = len(self._dispatches) - waiting
        replicas = sum(self.running_replicas.values())
        return {"queue_depth": waiting, "jobs_in_flight": running, "max_queue": self.max_queued,
                "busy_slots": running, "slots": replicas * self.slots_per_replica, "replicas": replicas,
                "retries": self.retries}

    def forget_finished(self) -> None:
        """Drop finished jobs older than FLUX_JOB_TTL (the local scheduler's reaper)."""
        now = time.monotonic()
        with self._lock:
            stale = [jid for jid, job in self._finished.items()
                     if job.finished_at is not None and now - job.finished_at > self.settings.job_ttl]
            for jid in stale:
                del self._finished[jid]

    # --- dispatch --------------------------------------------------------------------------------
    async def _dispatch(self, dispatch: _Dispatch, client: ModelClient) -> None:
        job = dispatch.job
        started = time.monotonic()
        attempt = 0
        try:
            while not job.done:
                request = RemoteRequest(job_id=job.id, spec=job.spec, params=job.params, prompt=job.prompt,
                                        seeds=tuple(job.seeds), negative_prompt=job.negative_prompt,
                                        want_previews=job.want_previews, attempt=attempt,
                                        images=tuple(job.images), mask=job.mask)
                try:
                    await self._consume(dispatch, client.stream(request))
                    if not job.done:
                        raise ReplicaLost("the replica ended its answer without a result")
                except ReplicaLost as exc:
                    attempt += 1
                    lost = job.metadata.get("replica")
                    if attempt > self.max_retries:
                        self._fail(job, JobError(
                            f"the replica running this request was lost and {self.max_retries} retries failed "
                            f"({exc}); retry later", code="replica_unavailable", status=503))
                        return
                    self.retries += 1
                    log.warning("replica lost; retrying the request on another replica", extra={"ctx": {
                        "request_id": job.id, "model": dispatch.key, "replica": lost, "attempt": attempt,
                        "error": str(exc)[:300]}})
                    self._requeue(dispatch)
                    await asyncio.sleep(self.retry_backoff * attempt)
                    continue
                except Backpressure as exc:
                    with self._lock:
                        waiting = sum(1 for d in self._dispatches.values() if d.key == dispatch.key and not d.accepted)
                    retry = exc.retry_after or self._estimate_retry_after(dispatch.key, waiting)
                    self._fail(job, queue_full(f"the queue of {dispatch.key} is full ({exc}); retry later", retry))
                    return
            if job.status is JobStatus.SUCCEEDED:
                self._record_duration(dispatch.key, time.monotonic() - started)
        except asyncio.CancelledError:
            if job.finish(JobStatus.CANCELLED, error=JobError("the job was cancelled", code="cancelled", status=499)):
                self._hook("job_cancelled", {"job": job})
        except Exception as exc:  # a bug must fail this job, not leave its client waiting
            log.exception("dispatch failed", extra={"ctx": {"request_id": job.id, "model": dispatch.key}})
            self._fail(job, JobError(f"dispatch to the model replica failed ({type(exc).__name__})",
                                     code="internal_error", status=500))

    def _forget(self, dispatch: _Dispatch) -> None:
        """The dispatch is over: the job leaves the in-flight table (kept for polling until FLUX_JOB_TTL)."""
        job = dispatch.job
        if job.finish(JobStatus.CANCELLED, error=JobError("the job was cancelled", code="cancelled", status=499)):
            self._hook("job_cancelled", {"job": job})
        with self._lock:
            if self._dispatches.get(job.id) is dispatch:
                del self._dispatches[job.id]
            self._finished[job.id] = job

    async def _consume(self, dispatch: _Dispatch, events: AsyncIterator[dict[str, Any]]) -> None:
        job = dispatch.job
        try:
            async for event in events:
                if job.done:  # cancelled here meanwhile
                    return
                self._relay(dispatch, event)
                if event["type"] in FINAL_EVENTS:
                    return
        finally:
            closer = getattr(events, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()

    def _relay(self, dispatch: _Dispatch, event: dict[str, Any]) -> None:
        """Replay one replica event onto the local job (the fields a local scheduler would set)."""
        job = dispatch.job
        kind = event["type"]
        if kind == "accepted":
            info: ReplicaInfo = event["replica"]
            dispatch.accepted = True
            job.metadata["replica"] = info.replica_id
            job.metadata["device_plan"] = info.plan
            self.replica_infos[info.replica_id] = info
        elif kind == "queued":
            job.queue_position = event.get("queue_position")
            job.emit({"type": "queued", "queue_position": job.queue_position})
        elif kind == "started":
            job.status = JobStatus.RUNNING
            job.started_at = time.monotonic()
            job.batch_size = event.get("batch_size")
            job.device = event.get("device")
            job.queue_position = 0
            job.emit(dict(event))
        elif kind == "progress":
            job.step = event["step"]
            job.total_steps = event["total"]
            job.emit(dict(event))
        elif kind == "succeeded":
            replica = job.metadata.get("replica")
            if replica is not None:
                self.served[replica] = self.served.get(replica, 0) + 1
            if job.finish(JobStatus.SUCCEEDED, result=event["result"]):
                self._hook("job_succeeded", {"job": job})
        elif kind in ("failed", "cancelled"):
            error = JobError(event["message"], code=event["code"], status=event["status"],
                             retry_after=event.get("retry_after"))
            if job.finish(JobStatus.CANCELLED if kind == "cancelled" else JobStatus.FAILED, error=error):
                self._hook("job_cancelled" if kind == "cancelled" else "job_failed", {"job": job})

    def _requeue(self, dispatch: _Dispatch) -> None:
        job = dispatch.job
        dispatch.accepted = False
        job.status = JobStatus.QUEUED
        job.started_at = None
        job.step = 0
        job.metadata.pop("replica", None)
        job.emit({"type": "queued", "queue_position": 1, "retry": True})

    def _fail(self, job: Job, error: JobError) -> None:
        if job.finish(JobStatus.FAILED, error=error):
            self._hook("job_failed", {"job": job})

    def _cancel_task(self, dispatch: _Dispatch) -> None:
        task = dispatch.task
        if task is None or task.done():
            return
        if isinstance(task, asyncio.Task):
            loop = task.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)
        else:
            task.cancel()

    def _record_duration(self, key: str, seconds: float) -> None:
        with self._lock:
            self._durations.setdefault(key, deque(maxlen=50)).append(seconds)

    def _estimate_retry_after(self, key: str, waiting: int) -> float:
        recent = list(self._durations.get(key, ()))[-20:]
        per_job = sum(recent) / len(recent) if recent else 1.0
        slots = max(1, self.running_replicas.get(key, 1)) * self.slots_per_replica
        return max(1.0, round(per_job * max(1, waiting) / slots, 1))


@dataclass
class RemoteModel:
    """What ``Runtime.model_info`` gives the routes for a model served by a replica (duck-types the
    fields of :class:`~fluxserve.engine.loading.LoadedModel` that the routes read)."""

    spec: ModelSpec
    info: ReplicaInfo
    client: ModelClient
    loaded_at: float = 0.0

    @property
    def modes(self) -> list[str]:
        return list(self.info.modes)

    @property
    def load_seconds(self) -> float:
        return self.info.load_seconds

    @property
    def warmup(self) -> dict[str, Any]:
        return self.info.warmup

    @property
    def adapter(self) -> RemoteModel:
        return self  # ``model.adapter.token_count(model.primary, prompt)`` in /v1/tokenize

    @property
    def primary(self) -> None:
        return None

    def token_count(self, _primary: None, prompt: str) -> dict[str, int]:
        return self.client.token_count(prompt)


class IngressRuntime(Runtime):
    """The ingress's runtime: settings, metrics, file registry and encoder pool of a normal runtime,
    a :class:`RemoteScheduler` instead of local engines, readiness from Ray's replica table."""

    def __init__(self, settings: Settings, clients: Mapping[str, ModelClient], status: StatusSource | None = None,
                 *, max_retries: int = 2) -> None:
        super().__init__(settings)
        self.clients = dict(clients)
        self.remote = RemoteScheduler(settings, self.clients, hook=self._on_event, max_retries=max_retries)
        self.scheduler = self.remote
        self.status_source = status
        self.replica_table: dict[str, list[ReplicaStatus]] = {}
        self.status_error: str | None = None
        self._status_seen = status is None
        self._poller: asyncio.Task[None] | None = None
        missing = [key for key in self._configured if key not in self.clients]
        if missing:
            raise ValueError(f"no model deployment for {missing}; deployed: {sorted(self.clients)}")

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait: bool = False) -> None:
        """Call on the app's event loop (the lifespan does)."""
        log.info("ingress started", extra={"ctx": {"models": {k: deployment_name(k) for k in self.clients},
                                                     "settings": self.settings.redacted(), "version": __version__}})
        self.scheduler.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while not self.shutting_down:
            if self.status_source is not None:
                try:
                    self._apply(await self.status_source())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    if error != self.status_error:
                        log.warning("could not read the replica table: %s", error)
                    self.status_error = error
            self.remote.forget_finished()
            await asyncio.sleep(STATUS_INTERVAL)

    def _apply(self, table: dict[str, list[ReplicaStatus]]) -> None:
        """Take in Ray's replica table: running counts, replicas that are gone, the replicas' plans."""
        remote = self.remote
        self.replica_table = table
        remote.running_replicas = {key: sum(1 for r in table.get(key, []) if r.state == "RUNNING")
                                   for key in self.clients}
        listed = {r.replica_id for rows in table.values() for r in rows}
        for replica_id in [rid for rid in remote.replica_infos if rid not in listed]:
            del remote.replica_infos[replica_id]  # replaced or scaled down
            remote.served.pop(replica_id, None)
        self.status_error = None
        self._status_seen = True
        self._refresh_plans()

    def _refresh_plans(self) -> None:
        """``/v1/models``'s top-level device/dtype: those of the replicas, once one has answered."""
        plans: list[DevicePlan] = []
        for info in self.remote.replica_infos.values():
            if info.plan not in plans:
                plans.append(info.plan)
        if plans:
            self.plans = plans

    def close(self, timeout: float | None = None) -> int:
        cancelled = super().close(timeout)
        if self._poller is not None:
            self._poller.get_loop().call_soon_threadsafe(self._poller.cancel)
        return cancelled

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if not self._status_seen:
            reasons.append("waiting for the first replica status from Ray Serve")
        elif self.status_source is not None:
            for key in self.clients:
                if self.remote.running_replicas.get(key, 0) == 0:
                    reasons.append(f"model {key} has no running replica ({deployment_name(key)})")
        if self.status_error:
            reasons.append(f"replica status unavailable: {self.status_error}")
        return not reasons, reasons

    # --- models ----------------------------------------------------------------------------------
    def resolve(self, name: str | None, *, from_request: bool = True) -> ModelSpec:
        spec = super().resolve(name, from_request=from_request)
        if spec.key not in self.clients:
            raise UnknownModelError(f"model {name!r} is not served by this Ray Serve application; deployed: "
                                    f"{', '.join(self.clients)} (add it to FLUX_PRELOAD_MODELS)")
        return spec

    def known_models(self) -> list[ModelSpec]:
        return [self._configured[key] for key in self.clients if key in self._configured]

    def model_info(self, key: str) -> dict[str, Any]:
        """Replica id → :class:`RemoteModel` for the replicas of ``key`` that answered at least once."""
        client = self.clients.get(key)
        if client is None:
            return {}
        alive = {r.replica_id for r in self.replica_table.get(key, []) if r.state == "RUNNING"}
        spec = self._configured[key]
        return {rid: RemoteModel(spec, info, client) for rid, info in self.remote.replica_infos.items()
                if info.model == key and (not self.replica_table or rid in alive)}

    def replicas(self, key: str) -> list[dict[str, Any]] | None:
        """The replicas of ``key``'s deployment for ``/v1/models``: Ray's table joined with what each
        replica said about itself (device, dtype, load time) and how many requests it served here."""
        rows: list[dict[str, Any]] = []
        for status in self.replica_table.get(key, []):
            row: dict[str, Any] = {"id": status.replica_id, "state": status.state, "pid": status.pid,
                                   "node_ip": status.node_ip}
            info = self.remote.replica_infos.get(status.replica_id)
            if info is not None:
                row.update({k: v for k, v in info.public().items() if k not in row or row[k] is None})
            row["served"] = self.remote.served.get(status.replica_id, 0)
            rows.append(row)
        return rows


def build_ingress_app(settings: Settings, clients: Mapping[str, ModelClient], status: StatusSource | None = None,
                      *, max_retries: int = 2) -> FastAPI:
    """fluxserve's app (``create_app``) on an :class:`IngressRuntime`; its lifespan starts/stops it."""
    from fluxserve.api.app import create_app

    runtime = IngressRuntime(settings, clients, status, max_retries=max_retries)
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
