"""The ingress's job queue: each job goes to the replicas of its model's deployment.

:class:`RemoteScheduler` is a :class:`~fluxserve.scheduler.protocols.JobQueue` like the local scheduler: it
shares the job table, the job state machine and the Retry-After estimate with it, so the routes cannot tell
the two apart. It replays each replica's events onto the local job.

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
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from fluxserve.config import DistributedConfig, SchedulerConfig
from fluxserve.distributed.config import slots_per_replica
from fluxserve.distributed.messages import FINAL_EVENTS, RemoteRequest, ReplicaInfo
from fluxserve.scheduler.jobs import Job, JobError, JobStatus, cancelled_error, queue_full
from fluxserve.scheduler.pacing import Pacing
from fluxserve.scheduler.scheduler import SHUTTING_DOWN, Hook
from fluxserve.scheduler.table import JobTable

log = logging.getLogger(__name__)


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


@dataclass
class _Dispatch:
    job: Job
    key: str
    accepted: bool = False
    task: asyncio.Task[None] | Future[None] | None = None


class RemoteScheduler:
    """A :class:`~fluxserve.scheduler.protocols.JobQueue` with no local devices: jobs run on the model
    deployments' replicas. It shares the job table, the job state machine and the Retry-After estimate
    with the local scheduler, so the serving layer and the routes cannot tell the difference.
    """

    def __init__(self, settings: SchedulerConfig, distributed: DistributedConfig, clients: Mapping[str, ModelClient],
                 *, hook: Hook | None = None, max_retries: int = 2, retry_backoff: float = 0.2,
                 table: JobTable | None = None) -> None:
        self.settings = settings
        self.table = table or JobTable(max_jobs=settings.max_jobs, ttl=settings.job_ttl,
                                       results_max_bytes=settings.results_max_bytes,
                                       max_stored_per_owner=settings.max_stored_per_key,
                                       results_max_bytes_per_owner=settings.results_max_bytes_per_key)
        self._hook = hook or (lambda _name, _data: None)
        self._accepting = True
        self.clients = dict(clients)
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_queued = distributed.ray_max_queued_requests
        self.slots_per_replica = slots_per_replica(settings)
        self.running_replicas: dict[str, int] = {key: 1 for key in self.clients}
        self.replica_infos: dict[str, ReplicaInfo] = {}
        self.served: dict[str, int] = {}
        self.retries = 0
        self._lock = threading.Lock()
        self._dispatches: dict[str, _Dispatch] = {}
        self._pacing: dict[str, Pacing] = {}
        self._pacing_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Call on the event loop that will run the dispatch tasks (the app's)."""
        self._loop = asyncio.get_running_loop()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    def readiness_problems(self) -> list[str]:
        return []  # the ingress's catalog reports replicas; dispatch tasks cannot die silently (see _dispatch)

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
        error = JobError(f"{SHUTTING_DOWN}; the job was cancelled", code="shutting_down", status=503)
        for dispatch in leftovers:
            dispatch.job.request_cancel()
            if dispatch.job.transition(JobStatus.CANCELLED, error=error):
                self._hook("job_cancelled", {"job": dispatch.job})
            self._cancel_task(dispatch)
        return len(leftovers)

    def shutdown(self) -> None:
        with self._lock:
            leftovers = list(self._dispatches.values())
        for dispatch in leftovers:
            self._cancel_task(dispatch)

    @property
    def consecutive_oom_failures(self) -> int:
        return 0  # each replica's own health check reports (and Ray replaces) replicas failing OOM

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Dispatch ``job`` to its model's replicas, or refuse at once (429 ``queue_full``, 503)."""
        if not self.accepting:
            raise JobError(SHUTTING_DOWN, code="shutting_down", status=503)
        client = self.clients.get(job.spec.key)
        if client is None:
            raise JobError(f"model {job.spec.key!r} has no deployment on this Ray Serve application",
                           code="model_unavailable", status=503)
        self.table.add(job, keep_result=bool(job.metadata.get("keep_result")))
        with self._lock:
            waiting = sum(1 for d in self._dispatches.values() if d.key == job.spec.key and not d.accepted)
            if 0 <= self.max_queued <= waiting:
                self.table.discard(job)
                raise queue_full(f"the queue of {job.spec.key} is full ({self.max_queued} waiting for a replica; "
                                 "FLUX_RAY_MAX_QUEUED_REQUESTS); retry later",
                                 self._estimate_retry_after(job.spec.key, waiting))
            dispatch = _Dispatch(job, job.spec.key)
            self._dispatches[job.id] = dispatch
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

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a dispatched job: it is cancelled here at once, and on its replica right after."""
        with self._lock:
            dispatch = self._dispatches.get(job_id)
        if dispatch is None or dispatch.job.finished:
            return None
        job = dispatch.job
        job.request_cancel()
        state = "running" if job.status is JobStatus.RUNNING else "queued"
        if job.transition(JobStatus.CANCELLED, error=cancelled_error(f"cancelled while {state}")):
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

    def housekeeping(self) -> None:
        """The job table's TTL (the local scheduler's reaper does the same)."""
        self.table.sweep()

    def unload(self, key: str) -> list[str]:
        return []  # models live on their deployments' replicas

    def unload_done(self) -> None:
        pass

    # --- dispatch --------------------------------------------------------------------------------
    async def _dispatch(self, dispatch: _Dispatch, client: ModelClient) -> None:
        job = dispatch.job
        started = time.monotonic()
        attempt = 0
        try:
            while not job.finished:
                request = RemoteRequest(job_id=job.id, spec=job.spec, params=job.params, prompt=job.prompt,
                                        seeds=tuple(job.seeds), negative_prompt=job.negative_prompt,
                                        partial_images=job.partial_images, attempt=attempt,
                                        images=tuple(job.images), mask=job.mask)
                try:
                    await self._consume(dispatch, client.stream(request))
                    if not job.finished:
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
            if job.transition(JobStatus.CANCELLED, error=cancelled_error("cancelled")):
                self._hook("job_cancelled", {"job": job})
        except Exception as exc:  # a bug must fail this job, not leave its client waiting
            log.exception("dispatch failed", extra={"ctx": {"request_id": job.id, "model": dispatch.key}})
            self._fail(job, JobError(f"dispatch to the model replica failed ({type(exc).__name__})",
                                     code="internal_error", status=500))

    def _forget(self, dispatch: _Dispatch) -> None:
        """The dispatch is over: the job leaves the in-flight table (kept for polling until FLUX_JOB_TTL)."""
        job = dispatch.job
        if job.transition(JobStatus.CANCELLED, error=cancelled_error("cancelled")):
            self._hook("job_cancelled", {"job": job})
        with self._lock:
            if self._dispatches.get(job.id) is dispatch:
                del self._dispatches[job.id]

    async def _consume(self, dispatch: _Dispatch, events: AsyncIterator[dict[str, Any]]) -> None:
        job = dispatch.job
        try:
            async for event in events:
                if job.finished:  # cancelled here meanwhile
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
            if job.status is JobStatus.QUEUED:
                job.transition(JobStatus.RUNNING, batch_size=event.get("batch_size"), device=event.get("device"))
            else:  # a retry on another replica after the first one was lost: still the same running job
                job.emit(dict(event))
        elif kind == "progress":
            job.step = event["step"]
            job.total_steps = event["total"]
            job.emit(dict(event))
        elif kind == "succeeded":
            replica = job.metadata.get("replica")
            if replica is not None:
                self.served[replica] = self.served.get(replica, 0) + 1
            if job.status is JobStatus.QUEUED:  # the replica's "started" never reached us
                job.transition(JobStatus.RUNNING)
            if job.transition(JobStatus.SUCCEEDED, result=event["result"]):
                self._hook("job_succeeded", {"job": job})
        elif kind in ("failed", "cancelled"):
            error = JobError(event["message"], code=event["code"], status=event["status"],
                             retry_after=event.get("retry_after"))
            if job.transition(JobStatus.CANCELLED if kind == "cancelled" else JobStatus.FAILED, error=error):
                self._hook("job_cancelled" if kind == "cancelled" else "job_failed", {"job": job})

    def _requeue(self, dispatch: _Dispatch) -> None:
        """Retry on another replica. The job keeps its state (a running job stays running: the state machine
        has no way back to queued); clients see a ``queued`` event with ``retry``."""
        job = dispatch.job
        dispatch.accepted = False
        job.step = 0
        job.metadata.pop("replica", None)
        job.emit({"type": "queued", "queue_position": 1, "retry": True})

    def _fail(self, job: Job, error: JobError) -> None:
        if job.transition(JobStatus.FAILED, error=error):
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

    def _pacing_of(self, key: str) -> Pacing:
        with self._pacing_lock:  # its own lock: submit asks for an estimate while holding self._lock
            return self._pacing.setdefault(key, Pacing())

    def _record_duration(self, key: str, seconds: float) -> None:
        self._pacing_of(key).record(seconds)

    def _estimate_retry_after(self, key: str, waiting: int) -> float:
        slots = max(1, self.running_replicas.get(key, 1)) * self.slots_per_replica
        return self._pacing_of(key).retry_after(waiting, slots)
