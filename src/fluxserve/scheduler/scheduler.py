"""The scheduler: a bounded queue in front of one worker per device, with dynamic batching.

Requests become :class:`Job` objects in one shared FIFO. Each device has a :class:`DeviceEngine` and
``FLUX_MAX_CONCURRENT`` slot threads; an idle slot takes the oldest job whose model is loaded on its
device, plus any compatible queued jobs (same model and parameters) up to ``FLUX_MAX_BATCH`` images,
and runs them as one pipeline call. Whichever device is free first takes the next job, so work goes
to the least-loaded worker without a separate dispatcher.

Models load on loader threads, never on slot threads: a job whose model is not loaded waits in the
queue while other models keep generating. Jobs that waited past ``FLUX_QUEUE_TIMEOUT`` fail with 504.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fluxserve.engine.device import DevicePlan
from fluxserve.engine.engine import (
    BadOutput,
    DeviceEngine,
    GenerationCancelled,
    ImageRequest,
    ModelLockTimeout,
    OutOfMemory,
)
from fluxserve.engine.faults import FaultInjector
from fluxserve.engine.loading import LoadedModel, ModelLoadError
from fluxserve.engine.registry import ModelSpec
from fluxserve.scheduler.jobs import FINISHED, Job, JobError, JobStatus, queue_full
from fluxserve.settings import Settings

log = logging.getLogger(__name__)

Hook = Callable[[str, dict[str, Any]], None]


class Scheduler:
    """Queue, workers, batching, cancellation and model loading across devices."""

    def __init__(self, settings: Settings, plans: list[DevicePlan], faults: FaultInjector | None = None,
                 hook: Hook | None = None) -> None:
        self.settings = settings
        self.faults = faults or FaultInjector(settings.fault_injection, settings.faults)
        self.engines = [DeviceEngine(settings, plan, self.faults) for plan in plans]
        self._hook = hook or (lambda _name, _data: None)
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._running: dict[str, Job] = {}
        self._jobs: dict[str, Job] = {}
        self._loading: dict[tuple[int, str], threading.Thread] = {}
        self._load_errors: dict[str, JobError] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._accepting = True
        self._busy_slots = 0
        self._recent_durations: list[float] = []

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for index, engine in enumerate(self.engines):
            for slot in range(self.settings.max_concurrent):
                thread = threading.Thread(target=self._slot_loop, args=(index,),
                                          name=f"worker-{engine.device}-{slot}", daemon=True)
                thread.start()
                self._threads.append(thread)
        reaper = threading.Thread(target=self._reaper_loop, name="job-reaper", daemon=True)
        reaper.start()
        self._threads.append(reaper)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for queued and running jobs; cancel what is left. Returns jobs cancelled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._running) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            leftovers = list(self._pending) + list(self._running.values())
            self._pending.clear()
        error = JobError("the server is shutting down; the job was cancelled", code="shutting_down", status=503)
        for job in leftovers:
            job.request_cancel()
            if job.finish(JobStatus.CANCELLED, error=error):
                self._hook("job_cancelled", {"job": job})
        return len(leftovers)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- models ----------------------------------------------------------------------------------
    def ensure_loaded(self, spec: ModelSpec, wait: bool = True, timeout: float | None = None) -> list[LoadedModel]:
        """Start loading ``spec`` on every device where it is missing; optionally wait for all loads."""
        threads = [self._start_load(index, spec) for index in range(len(self.engines))]
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in threads:
                if thread is not None:
                    thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            error = self._load_errors.get(spec.key)
            loaded = [m for e in self.engines if (m := e.get(spec.key)) is not None]
            if error is not None and not loaded:
                raise error
            return loaded
        return []

    def is_loaded(self, key: str) -> bool:
        return all(engine.get(key) is not None for engine in self.engines)

    def _start_load(self, index: int, spec: ModelSpec) -> threading.Thread | None:
        engine = self.engines[index]
        if engine.get(spec.key) is not None:
            return None
        with self._cond:
            thread = self._loading.get((index, spec.key))
            if thread is not None and thread.is_alive():
                return thread
            self._load_errors.pop(spec.key, None)
            thread = threading.Thread(target=self._load, args=(index, spec), name=f"load-{spec.key}",
                                      daemon=True)
            self._loading[(index, spec.key)] = thread
            thread.start()
            return thread

    def _load(self, index: int, spec: ModelSpec) -> None:
        engine = self.engines[index]
        error: JobError | None = None
        try:
            model, loaded_now = engine.load(spec)
            if loaded_now:
                self._hook("model_loaded", {"model": spec.key, "seconds": model.load_seconds,
                                            "device": engine.device})
        except ModelLoadError as exc:
            error = JobError(str(exc), code="model_unavailable", status=503)
        except ModelLockTimeout as exc:
            error = JobError(str(exc), code="model_lock_timeout", status=503)
        except Exception as exc:  # a broken model must fail its jobs, not the loader thread silently
            log.exception("unexpected error loading %s", spec.key)
            error = JobError(f"could not load {spec.key}: {type(exc).__name__}", code="model_unavailable",
                             status=503)
        with self._cond:
            self._loading.pop((index, spec.key), None)
            if error is not None:
                self._load_errors[spec.key] = error
                if not any(e.get(spec.key) for e in self.engines) and not any(
                        k[1] == spec.key for k in self._loading):
                    failed = [j for j in self._pending if j.spec.key == spec.key]
                    for job in failed:
                        self._pending.remove(job)
                else:
                    failed = []
            else:
                failed = []
            self._cond.notify_all()
        for job in failed:
            if job.finish(JobStatus.FAILED, error=error):
                self._hook("job_failed", {"job": job})

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` or refuse at once (429 ``queue_full``, 503 ``shutting_down``)."""
        with self._cond:
            if not self._accepting:
                raise JobError("the server is shutting down", code="shutting_down", status=503)
            if len(self._pending) >= self.settings.max_queue:
                raise queue_full(
                    f"the queue is full ({self.settings.max_queue} waiting); retry later", self._retry_after())
            job.enqueued_at = time.monotonic()  # queue_wait counts from here, not from when the Job was built
            self._pending.append(job)
            self._jobs[job.id] = job
            job.queue_position = len(self._pending)
            job.total_steps = job.params.steps
            self._cond.notify_all()
        self._hook("job_queued", {"job": job})
        job.emit({"type": "queued", "queue_position": job.queue_position})
        if not any(e.get(job.spec.key) for e in self.engines):
            for index in range(len(self.engines)):
                self._start_load(index, job.spec)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job. None if unknown or already finished."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return None
            job.request_cancel()
            was_queued = job in self._pending
            if was_queued:
                self._pending.remove(job)
                self._update_positions()
            self._cond.notify_all()
        if was_queued:
            self._finish_cancelled(job, "cancelled while queued")
        return job

    def _finish_cancelled(self, job: Job, why: str) -> None:
        if job.finish(JobStatus.CANCELLED, error=JobError(f"the job was {why}", code="cancelled", status=499)):
            self._hook("job_cancelled", {"job": job})

    def stats(self) -> dict[str, Any]:
        with self._cond:
            in_flight = sum(1 for job in self._running.values() if not job.done)  # finished ones leave soon
            return {"queue_depth": len(self._pending), "jobs_in_flight": in_flight,
                    "max_queue": self.settings.max_queue, "busy_slots": self._busy_slots,
                    "slots": len(self.engines) * self.settings.max_concurrent}

    def _retry_after(self) -> float:
        recent = self._recent_durations[-20:]
        per_job = sum(recent) / len(recent) if recent else 1.0
        slots = len(self.engines) * self.settings.max_concurrent
        return max(1.0, round(per_job * max(1, len(self._pending)) / slots, 1))

    def _update_positions(self) -> None:
        for position, job in enumerate(self._pending, start=1):
            if job.queue_position != position:
                job.queue_position = position
                job.emit({"type": "queued", "queue_position": position})

    # --- workers ---------------------------------------------------------------------------------
    def _take_batch(self, engine: DeviceEngine) -> tuple[LoadedModel, list[Job]] | None:
        """Under the lock: the oldest runnable job on this engine and its compatible company."""
        for job in self._pending:
            model = engine.get(job.spec.key)
            if model is None:
                continue
            batch = [job]
            images = job.n
            for other in self._pending:
                if other is job or other.params != job.params or other.spec.key != job.spec.key:
                    continue
                if images + other.n > self.settings.max_batch:
                    continue
                batch.append(other)
                images += other.n
            return model, batch
        return None

    def _expire_queued(self) -> list[Job]:
        now = time.monotonic()
        expired = [j for j in self._pending if now - j.enqueued_at > self.settings.queue_timeout]
        for job in expired:
            self._pending.remove(job)
        if expired:
            self._update_positions()
        return expired

    def _slot_loop(self, index: int) -> None:
        engine = self.engines[index]
        while True:
            with self._cond:
                taken = None
                while not self._stopping and taken is None:
                    taken = self._take_batch(engine)
                    if taken is None:
                        self._cond.wait(timeout=0.5)
                if taken is None:  # stopping
                    return
                model, batch = taken
                batch = self._wait_for_company(engine, model, batch)
                for job in batch:
                    self._pending.remove(job)
                    self._running[job.id] = job
                self._busy_slots += 1
                self._update_positions()
            try:
                self._run_batch(engine, model, batch)
            finally:
                with self._cond:
                    for job in batch:
                        self._running.pop(job.id, None)
                    self._busy_slots -= 1
                    self._cond.notify_all()

    def _wait_for_company(self, engine: DeviceEngine, model: LoadedModel, batch: list[Job]) -> list[Job]:
        """Under the lock: wait up to FLUX_BATCH_WAIT_MS for compatible jobs to fill the batch."""
        wait = self.settings.batch_wait_ms / 1000
        if wait <= 0 or self.settings.max_batch <= 1:
            return batch
        deadline = time.monotonic() + wait
        first = batch[0]
        while sum(j.n for j in batch) < self.settings.max_batch and time.monotonic() < deadline:
            self._cond.wait(max(0.0, deadline - time.monotonic()))
            if first not in self._pending:  # cancelled meanwhile
                return [j for j in batch if j in self._pending] or batch
            taken = self._take_batch(engine)
            if taken is not None and taken[1][0] is first:
                batch = taken[1]
        return [j for j in batch if j in self._pending]

    def _run_batch(self, engine: DeviceEngine, model: LoadedModel, batch: list[Job]) -> None:
        started = time.monotonic()
        batch = [j for j in batch if not j.cancel_requested]
        if not batch:
            return
        images = sum(j.n for j in batch)
        for job in batch:
            job.status = JobStatus.RUNNING
            job.started_at = started
            job.batch_size = images
            job.device = engine.device
            job.emit({"type": "started", "batch_size": images, "device": engine.device})
        self._hook("batch_started", {"size": images, "model": model.spec.key})

        requests = [
            ImageRequest(
                prompt=job.prompt, seeds=job.seeds, negative_prompt=job.negative_prompt,
                is_cancelled=self._cancel_check(job),
                on_progress=self._progress_callback(job), want_previews=job.want_previews,
                images=job.images, mask=job.mask,
            )
            for job in batch
        ]
        try:
            results = engine.generate(model, batch[0].params, requests)
        except GenerationCancelled:
            for job in batch:
                self._finish_cancelled(job, "cancelled while running")
            return
        except OutOfMemory as exc:
            self._hook("oom_failure", {"reason": exc.reason, "model": model.spec.key})
            error = JobError(f"out of memory: {exc.reason}", code="out_of_memory", status=503)
            self._fail_all(batch, error)
            return
        except BadOutput as exc:
            self._fail_all(batch, JobError(str(exc), code="bad_output", status=503))
            return
        except Exception as exc:  # anything unexpected fails this batch, never the worker
            log.exception("generation failed", extra={"ctx": {"model": model.spec.key, "jobs": [j.id for j in batch]}})
            self._fail_all(batch, JobError(f"generation failed ({type(exc).__name__})", code="internal_error",
                                           status=500))
            return
        self._recent_durations = ([*self._recent_durations, time.monotonic() - started])[-50:]
        for job, result in zip(batch, results, strict=True):
            if job.cancel_requested:
                self._finish_cancelled(job, "cancelled while running")
                continue
            job.finish(JobStatus.SUCCEEDED, result=result)
            self._hook("job_succeeded", {"job": job})

    def _fail_all(self, batch: list[Job], error: JobError) -> None:
        for job in batch:
            if job.finish(JobStatus.FAILED, error=error):
                self._hook("job_failed", {"job": job})

    @staticmethod
    def _cancel_check(job: Job) -> Callable[[], bool]:
        return lambda: job.cancel_requested

    @staticmethod
    def _progress_callback(job: Job) -> Callable[[int, int, Any], None]:
        def progress(step: int, total: int, preview: Any) -> None:
            job.step = step
            job.total_steps = total
            event: dict[str, Any] = {"type": "progress", "step": step, "total": total}
            if preview is not None:
                event["preview"] = preview
            job.emit(event)
        return progress

    # --- housekeeping ----------------------------------------------------------------------------
    def _reaper_loop(self) -> None:
        """Fail jobs that waited past FLUX_QUEUE_TIMEOUT (even while every slot is busy) and forget
        finished jobs after FLUX_JOB_TTL."""
        last_sweep = 0.0
        while not self._stopping:
            time.sleep(0.1)
            now = time.monotonic()
            with self._cond:
                expired = self._expire_queued()
                if now - last_sweep > 1.0:
                    last_sweep = now
                    stale = [jid for jid, job in self._jobs.items()
                             if job.finished_at is not None and now - job.finished_at > self.settings.job_ttl]
                    for jid in stale:
                        del self._jobs[jid]
            for job in expired:
                if job.finish(JobStatus.FAILED, error=JobError(
                        f"the job waited longer than FLUX_QUEUE_TIMEOUT ({self.settings.queue_timeout:g}s) "
                        "in the queue", code="queue_timeout", status=504)):
                    self._hook("job_failed", {"job": job})

    @property
    def consecutive_oom_failures(self) -> int:
        return max(e.consecutive_oom_failures for e in self.engines)
