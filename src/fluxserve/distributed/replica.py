"""One model replica: a full fluxserve :class:`~fluxserve.runtime.Runtime` for one model on one device.

The replica runs the same engine and scheduler as the single server, so dynamic batching, the OOM
ladder, NaN checks, cancellation between steps, queue timeouts and warmup all behave the same. It
answers each :class:`~.messages.RemoteRequest` with a stream of events (see :mod:`.messages`).

No Ray import here: :mod:`.deployments` wraps this class in a Serve deployment, and tests drive it
in-process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from fluxserve.distributed.messages import FINAL_EVENTS, RemoteRequest, ReplicaInfo, deployment_name
from fluxserve.runtime import Runtime
from fluxserve.scheduler.jobs import Job, JobError, JobStatus
from fluxserve.settings import Settings

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25
"""Seconds between forwarded progress events without a partial image (the last step and every partial
image are always forwarded)."""


class ReplicaStartError(RuntimeError):
    """The model could not be loaded; Ray marks the replica failed and retries elsewhere."""


class ReplicaWorker:
    """Loads the model at construction (Ray reports the replica RUNNING only after that) and runs jobs."""

    def __init__(self, settings: Settings, replica_id: str | None = None, *,
                 start_timeout: float | None = None) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        self.key = self.runtime.default_spec.key
        self.deployment = deployment_name(self.key)
        self.replica_id = replica_id or f"{self.deployment}#local-{os.getpid()}"
        self.runtime.start(wait=False)
        if not self.runtime.wait_started(start_timeout):
            raise ReplicaStartError(f"{self.key} did not load within {start_timeout}s")
        if self.runtime.startup_error:
            raise ReplicaStartError(f"could not start {self.key}: {self.runtime.startup_error}")
        self.closed = False
        log.info("replica ready", extra={"ctx": {"replica": self.replica_id, "model": self.key,
                                                  "device": self.runtime.plans[0].device}})

    # --- description -----------------------------------------------------------------------------
    def info(self) -> ReplicaInfo:
        loaded = self.runtime.model_info(self.key)
        model = next(iter(loaded.values()), None)
        return ReplicaInfo(
            replica_id=self.replica_id, deployment=self.deployment, model=self.key, pid=os.getpid(),
            node=socket.gethostname(), plan=self.runtime.plans[0],
            load_seconds=model.load_seconds if model is not None else 0.0,
            modes=tuple(model.modes) if model is not None else (),
            warmup=dict(model.warmup) if model is not None else {},
        )

    def stats(self) -> dict[str, Any]:
        """This replica's own queue: jobs waiting and running on its scheduler."""
        return {"replica": self.replica_id, **self.runtime.scheduler.stats()}

    def health(self) -> list[str]:
        """Why this replica is unhealthy (empty when healthy): the single server's readiness reasons."""
        ok, reasons = self.runtime.readiness()
        return [] if ok else reasons

    def token_count(self, prompt: str) -> dict[str, int]:
        model = next(iter(self.runtime.model_info(self.key).values()), None)
        if model is None:
            raise JobError(f"model {self.key!r} is not loaded", code="model_not_loaded", status=409)
        return model.token_count(prompt)

    # --- generation ------------------------------------------------------------------------------
    async def run(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        """Run one request on the local scheduler; yields its events, the last one final.

        If the caller goes away (Ray cancels this generator) the local job is cancelled too.
        """
        job = Job(spec=request.spec, params=request.params, prompt=request.prompt, seeds=list(request.seeds),
                  negative_prompt=request.negative_prompt, id=request.job_id, partial_images=request.partial_images,
                  images=list(request.images), mask=request.mask)
        yield {"type": "accepted", "replica": self.info()}
        scheduler = self.runtime.scheduler
        async with job.subscribe() as events:  # the one thread → asyncio bridge, as for the HTTP routes
            try:
                scheduler.submit(job)
            except JobError as exc:
                yield _error_event("failed", exc)
                return
            last_progress = 0.0
            try:
                async for event in events:
                    kind = event["type"]
                    if kind in FINAL_EVENTS:
                        break
                    if kind == "progress" and "preview" not in event:  # partial images always go through
                        now = time.monotonic()
                        if event["step"] < event["total"] and now - last_progress < PROGRESS_INTERVAL:
                            continue
                        last_progress = now
                    yield {k: v for k, v in event.items() if k != "id"}
                if job.status is JobStatus.SUCCEEDED and job.result is not None:
                    yield {"type": "succeeded", "result": job.result}
                else:
                    error = job.error or JobError("the job did not finish", code="internal_error", status=500)
                    yield _error_event("failed" if job.status is JobStatus.EXPIRED else job.status.value, error)
            finally:
                if not job.finished:
                    scheduler.cancel(job.id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.runtime.close()


def _error_event(kind: str, error: JobError) -> dict[str, Any]:
    return {"type": kind, "code": error.code, "message": error.message, "status": error.status,
            "retry_after": error.retry_after}
