"""The scheduler: a bounded queue in front of supervised slot threads, with dynamic batching.

Requests become :class:`Job` objects in one shared FIFO. Each device has an :class:`Engine` and
``FLUX_MAX_CONCURRENT`` slot threads; an idle slot takes the oldest job whose model is loaded on its
device, plus compatible queued jobs (same model and parameters) up to ``FLUX_MAX_BATCH`` images, and
runs them as one pipeline call. Whichever device is free first takes the next job.

Invariants (the randomized interleaving tests check them):

* A job is in ``_pending`` exactly while its state is ``queued``; it leaves ``_pending`` and becomes
  ``running`` (or terminal) in one step under ``_cond``. So a cancel, an expiry or a failed load of a
  queued job, and a slot taking it, can never both happen.
* Every job reaches exactly one terminal state: cancelled at once when queued, within one denoising
  step when running (the engine polls :attr:`Job.cancel_requested`), expired (504) when it waited past
  ``FLUX_QUEUE_TIMEOUT``, failed (503) when its model cannot load.
* A slot never dies: an exception anywhere in its loop fails that batch's jobs with 500 and the slot
  serves on. A batch that fails unexpectedly is retried job by job, so only the job that caused it fails.
* Models load on loader threads. A queued job whose model is not loaded (never loaded, unloaded,
  released) starts its load; a model that cannot load fails its queued jobs with 503 at once.
* Models in use are counted. A batch holds its model from the moment it is taken (under ``_cond``,
  together with its jobs becoming ``running``) until its slot is done with it; the warm-up holds it
  the same way (:meth:`Scheduler.using`). An unload or a release first *retires* its models
  (:meth:`Scheduler.retiring`): from then on no batch starts on them and no load of them starts; it
  waits until the batches holding them and loads of them in flight end, drops them, and only then
  lets queued jobs load them again, once. So a batch never runs on a model that is being dropped, and
  no model is ever resident twice on one engine.

Lock order: ``Scheduler._cond`` → a job's lock (inside :meth:`Job.transition`) → the job table's lock
(the table's terminal listener). Listeners never call back into the scheduler. Engines take their own
locks only on slot and loader threads, never while ``_cond`` is held — except :meth:`Engine.get`, whose
lock guards only the engine's model table. Engines drop models (``unload``, ``release``) with ``_cond``
released, inside a retirement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fluxserve.config import SchedulerConfig
from fluxserve.generation import (
    AdapterError,
    BadOutput,
    GenerationCancelled,
    ModelLoadError,
    ModelLockTimeout,
    OutOfMemory,
    WorkerUnresponsive,
)
from fluxserve.models.spec import ModelSpec
from fluxserve.scheduler.jobs import Job, JobError, JobStatus, cancelled_error, queue_full
from fluxserve.scheduler.pacing import Pacing
from fluxserve.scheduler.protocols import Engine
from fluxserve.scheduler.table import JobTable

log = logging.getLogger(__name__)

Hook = Callable[[str, dict[str, Any]], None]

SHUTTING_DOWN = "the server is shutting down"


@dataclass
class Slot:
    """One worker thread of one engine, and what the supervisor knows about it."""

    name: str
    engine: int
    thread: threading.Thread | None = None
    batch: list[Job] = field(default_factory=list)
    busy_since: float | None = None
    last_progress: float = 0.0
    crashes: int = 0
    model_key: str | None = None
    """The model its batch holds (see :meth:`Scheduler.using`), None between batches."""


@dataclass(frozen=True)
class _Retirement:
    """Models on their way out of every engine: ``key`` (an unload) or, with ``keep``, every model not in
    ``keep`` (a release)."""

    key: str | None = None
    keep: frozenset[str] | None = None

    def covers(self, key: str) -> bool:
        return key not in self.keep if self.keep is not None else key == self.key


class Scheduler:
    """Queue, workers, batching, cancellation and model loading across engines."""

    def __init__(self, settings: SchedulerConfig, engines: Sequence[Engine], *, table: JobTable | None = None,
                 hook: Hook | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.engines = list(engines)
        self.table = table or JobTable(max_jobs=settings.max_jobs, ttl=settings.job_ttl,
                                       results_max_bytes=settings.results_max_bytes,
                                       max_stored_per_owner=settings.max_stored_per_key,
                                       results_max_bytes_per_owner=settings.results_max_bytes_per_key)
        self.pacing = Pacing()
        self._hook = hook or (lambda _name, _data: None)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, Job] = {}
        self._loading: dict[tuple[int, str], threading.Thread] = {}
        self._load_errors: dict[str, JobError] = {}
        self._users: dict[tuple[int, str], int] = {}
        """(engine index, model key) → batches and warm-ups holding that model now."""
        self._retirements: list[_Retirement] = []
        self._slots = [Slot(f"worker-{engine.device}-{n}", index)
                       for index, engine in enumerate(self.engines) for n in range(settings.max_concurrent)]
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._accepting = True

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._slot_loop, args=(slot,), name=slot.name, daemon=True)
            slot.thread.start()
            self._threads.append(slot.thread)
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
        deadline = self._clock() + timeout
        error = JobError(f"{SHUTTING_DOWN}; the job was cancelled", code="shutting_down", status=503)
        with self._cond:
            while (self._pending or self._running_jobs()) and self._clock() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - self._clock())))
            leftovers = list(self._pending.values()) + self._running_jobs()
            self._pending.clear()
            for job in leftovers:
                job.request_cancel()
                if job.transition(JobStatus.CANCELLED, error=error):
                    self._hook("job_cancelled", {"job": job})
            self._cond.notify_all()
        return len(leftovers)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- models ----------------------------------------------------------------------------------
    def ensure_loaded(self, spec: ModelSpec, wait: bool = True, timeout: float | None = None) -> list[Any]:
        """Start loading ``spec`` on every engine where it is missing; optionally wait for all loads.
        An unload or release of it under way finishes first: the load comes after it, never beside it."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            self._cond.wait_for(lambda: not self._retiring(spec.key), timeout)
        threads = [self._start_load(index, spec) for index in range(len(self.engines))]
        if not wait:
            return []
        for thread in threads:
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - self._clock()))
        loaded = [m for e in self.engines if (m := e.get(spec.key)) is not None]
        with self._cond:
            error = self._load_errors.get(spec.key)
        if error is not None and not loaded:
            raise error
        return loaded

    def is_loaded(self, key: str) -> bool:
        return all(engine.get(key) is not None for engine in self.engines)

    def unload(self, key: str) -> list[str]:
        """Drop ``key`` from every engine once no batch uses it (blocking: call off the event loop).
        Returns the devices it was dropped from. Queued jobs for it load it again afterwards."""
        with self.retiring(key=key):
            return [engine.device for engine in self.engines if engine.unload(key)]

    def release(self, keep: set[str]) -> list[str]:
        """Drop every model not in ``keep`` from every engine once no batch uses it, and free caches
        (blocking). Returns the keys dropped. Queued jobs for them load them again afterwards."""
        with self.retiring(keep=keep):
            return sorted({key for engine in self.engines for key in engine.release(keep)})

    @contextmanager
    def retiring(self, *, key: str | None = None, keep: set[str] | None = None) -> Iterator[None]:
        """Take ``key`` (or every model not in ``keep``) out of service on every engine while the caller
        drops it: from the start no batch starts on it and no load of it starts; the body runs once the
        batches holding it and its loads in flight have ended. Afterwards queued jobs load it again."""
        retirement = _Retirement(key, frozenset(keep) if keep is not None else None)
        with self._cond:
            self._retirements.append(retirement)
            busy = sorted({k for (_i, k), users in self._users.items() if users and retirement.covers(k)})
            if busy:
                log.info("dropping models waits for the batches using them", extra={"ctx": {"models": busy}})
                self._hook("unload_waiting", {"models": busy})
            self._cond.wait_for(lambda: self._quiet(retirement))
        try:
            yield
        finally:
            with self._cond:
                self._retirements.remove(retirement)
                self._cond.notify_all()
            self._kick_loads()

    @contextmanager
    def using(self, index: int, key: str) -> Iterator[Any | None]:
        """Hold model ``key`` of engine ``index`` as a batch does (an unload waits for the holder); yields
        the model, or None when it is not loaded or is being dropped (the warm-up uses this)."""
        with self._cond:
            model = None if self._retiring(key) else self.engines[index].get(key)
            held = model is not None
            if held:
                self._users[(index, key)] = self._users.get((index, key), 0) + 1
        try:
            yield model
        finally:
            model = None
            if held:
                with self._cond:
                    self._let_go(index, key)

    def holding(self, key: str) -> Iterator[tuple[int, Any]]:
        """(engine index, model) for each engine that has ``key`` loaded, held (:meth:`using`) until the
        next item is asked for."""
        for index in range(len(self.engines)):
            with self.using(index, key) as model:
                if model is not None:
                    yield index, model

    def users(self, key: str) -> int:
        """Batches and warm-ups holding ``key`` now, on all engines."""
        with self._cond:
            return sum(users for (_index, k), users in self._users.items() if k == key)

    def _retiring(self, key: str) -> bool:
        return any(retirement.covers(key) for retirement in self._retirements)

    def _quiet(self, retirement: _Retirement) -> bool:
        """Under the lock: nothing holds or is loading a model of ``retirement``."""
        return not any(users and retirement.covers(key) for (_index, key), users in self._users.items()) and \
            not any(retirement.covers(key) and thread.is_alive() for (_index, key), thread in self._loading.items())

    def _let_go(self, index: int, key: str) -> None:
        """Under the lock: one holder of ``key`` on engine ``index`` is done with it."""
        left = self._users.get((index, key), 0) - 1
        if left > 0:
            self._users[(index, key)] = left
        else:
            self._users.pop((index, key), None)
        self._cond.notify_all()

    def _start_load(self, index: int, spec: ModelSpec) -> threading.Thread | None:
        engine = self.engines[index]
        if engine.get(spec.key) is not None:
            return None
        with self._cond:
            if self._retiring(spec.key):  # the retirement's end loads it again if queued jobs want it
                return None
            thread = self._loading.get((index, spec.key))
            if thread is not None and thread.is_alive():
                return thread
            self._load_errors.pop(spec.key, None)
            thread = threading.Thread(target=self._load, args=(index, spec), name=f"load-{spec.key}", daemon=True)
            self._loading[(index, spec.key)] = thread
            thread.start()
            return thread

    def _kick_loads(self) -> None:
        """Start loading every model that queued jobs wait for and no engine has or is loading."""
        with self._cond:
            wanted = {job.spec.key: job.spec for job in self._pending.values()}
            busy = {key for (_index, key), thread in self._loading.items() if thread.is_alive()}
        for key, spec in wanted.items():
            if key not in busy and not any(engine.get(key) is not None for engine in self.engines):
                # _start_load skips a model being dropped: its retirement calls this again at its end
                for index in range(len(self.engines)):
                    self._start_load(index, spec)

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
            error = JobError(f"could not load {spec.key} ({type(exc).__name__})", code="model_unavailable",
                             status=503)
        with self._cond:
            self._loading.pop((index, spec.key), None)
            if error is not None:
                self._load_errors[spec.key] = error
                still_possible = any(e.get(spec.key) for e in self.engines) or any(
                    key == spec.key for (_i, key) in self._loading)
                if not still_possible:
                    for job in [j for j in self._pending.values() if j.spec.key == spec.key]:
                        del self._pending[job.id]
                        if job.transition(JobStatus.FAILED, error=error):
                            self._hook("job_failed", {"job": job})
                    self._update_positions()
            self._cond.notify_all()

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` or refuse at once (429 ``queue_full``, 503 ``shutting_down``, 409 duplicate label).

        ``FLUX_MAX_QUEUE`` counts jobs waiting beyond those that idle slots can start now, so a server with
        ``FLUX_MAX_QUEUE=0`` still runs one job per idle slot."""
        self.table.add(job, keep_result=bool(job.metadata.get("keep_result")))
        try:
            with self._cond:
                if not self._accepting:
                    raise JobError(SHUTTING_DOWN, code="shutting_down", status=503)
                idle = sum(1 for slot in self._slots if slot.busy_since is None)
                if len(self._pending) >= self.settings.max_queue + idle:
                    raise queue_full(f"the queue is full ({self.settings.max_queue} waiting); retry later",
                                     self.pacing.retry_after(len(self._pending), len(self._slots)))
                per_key = self.settings.max_queued_per_key
                if per_key and job.owner is not None and self.table.live_count(job.owner) > per_key:
                    raise queue_full(f"this API key already has {per_key} jobs queued or running "
                                     "(FLUX_MAX_QUEUED_PER_KEY); retry later",
                                     self.pacing.retry_after(len(self._pending), len(self._slots)))
                job.enqueued_at = self._clock()  # queue_wait counts from here, not from when the Job was built
                job.total_steps = job.params.steps
                self._pending[job.id] = job
                job.queue_position = len(self._pending)
                # Under the lock: no slot can start the job before its listeners have "queued".
                job.emit({"type": "queued", "queue_position": job.queue_position})
                self._cond.notify_all()
        except JobError:
            self.table.discard(job)
            raise
        self._hook("job_queued", {"job": job})
        self._kick_loads()
        return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued (at once) or running (within a step) job. None if unknown or already over."""
        with self._cond:
            job = self._pending.get(job_id) or next(
                (j for j in self._running_jobs() if j.id == job_id), None)
            if job is None or job.finished:
                return None
            job.request_cancel()
            if job_id in self._pending:
                del self._pending[job_id]
                if job.transition(JobStatus.CANCELLED, error=cancelled_error("cancelled while queued")):
                    self._hook("job_cancelled", {"job": job})
                self._update_positions()
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, Any]:
        with self._cond:
            busy = sum(1 for slot in self._slots if slot.busy_since is not None)
            return {"queue_depth": len(self._pending), "jobs_in_flight": len(self._running_jobs()),
                    "max_queue": self.settings.max_queue, "busy_slots": busy, "slots": len(self._slots),
                    "jobs_kept": len(self.table), "result_bytes": self.table.result_bytes}

    def readiness_problems(self) -> list[str]:
        problems = []
        now = self._clock()
        with self._cond:
            stopping = self._stopping
            for slot in self._slots:
                if slot.thread is not None and not slot.thread.is_alive() and not stopping:
                    problems.append(f"{slot.name} is not running")
                elif slot.busy_since is not None and now - slot.last_progress > self.settings.stall_timeout:
                    problems.append(f"{slot.name} has made no progress for {now - slot.last_progress:.0f}s "
                                    "(FLUX_STALL_TIMEOUT)")
        return problems

    @property
    def consecutive_oom_failures(self) -> int:
        return max((e.consecutive_oom_failures for e in self.engines), default=0)

    def _running_jobs(self) -> list[Job]:
        return [job for slot in self._slots for job in slot.batch if not job.finished]

    def _update_positions(self) -> None:
        for position, job in enumerate(self._pending.values(), start=1):
            if job.queue_position != position:
                job.queue_position = position
                job.emit({"type": "queued", "queue_position": position})

    # --- workers ---------------------------------------------------------------------------------
    def _take_batch(self, index: int, first: Job | None = None) -> list[Job] | None:
        """Under the lock: the oldest job runnable on engine ``index`` (or ``first``) and its compatible
        company. Runnable: its model is loaded there and not being dropped."""
        engine = self.engines[index]
        candidates = [first] if first is not None else list(self._pending.values())
        for job in candidates:
            if self._retiring(job.spec.key) or engine.get(job.spec.key) is None:
                continue
            batch = [job]
            images = job.n
            if job.batchable:
                for other in self._pending.values():
                    if other is job or not other.batchable or other.batch_key != job.batch_key:
                        continue
                    if images + other.n > self.settings.max_batch:
                        continue
                    batch.append(other)
                    images += other.n
            return batch
        return None

    def _next_batch(self, slot: Slot) -> tuple[Any, list[Job]] | None:
        """Block until this slot has a batch (marked running, recorded on the slot, holding its model);
        None when stopping."""
        engine = self.engines[slot.engine]
        with self._cond:
            while True:
                if self._stopping:
                    return None
                batch = self._take_batch(slot.engine)
                if batch is None:
                    self._cond.wait(timeout=1.0)
                    continue
                batch = self._wait_for_company(slot.engine, batch)
                if not batch:
                    continue
                # The lock was released while the batch formed: the model may be leaving, or gone.
                key = batch[0].spec.key
                model = None if self._retiring(key) else engine.get(key)
                if model is None:
                    continue  # its jobs stay queued and run once the model is back
                images = sum(job.n for job in batch)
                # Recorded on the slot first: drain and cancel find the jobs from the moment they are running.
                now = self._clock()
                slot.batch, slot.busy_since, slot.last_progress = batch, now, now
                slot.model_key = key
                self._users[(slot.engine, key)] = self._users.get((slot.engine, key), 0) + 1
                for job in batch:
                    del self._pending[job.id]
                    job.transition(JobStatus.RUNNING, batch_size=images, device=engine.device)
                started = [job for job in batch if job.status is JobStatus.RUNNING]
                slot.batch = started
                self._update_positions()
                self._hook("batch_taken", {"jobs": started, "slot": slot.name})
                return model, started

    def _wait_for_company(self, index: int, batch: list[Job]) -> list[Job]:
        """Under the lock: wait up to FLUX_BATCH_WAIT_MS for compatible jobs; returns the batch's jobs that
        are still queued (empty when all of them were cancelled or taken meanwhile)."""
        wait = self.settings.batch_wait_ms / 1000
        if wait > 0 and self.settings.max_batch > 1 and batch[0].batchable:
            deadline = self._clock() + wait
            self._hook("batch_waiting", {"job": batch[0]})
            while (sum(j.n for j in batch) < self.settings.max_batch and self._clock() < deadline
                   and not self._stopping):
                self._cond.wait(max(0.0, deadline - self._clock()))
                first = batch[0]
                if first.id not in self._pending:  # cancelled or taken by another slot meanwhile
                    break
                taken = self._take_batch(index, first)
                if taken is not None:
                    batch = taken
        return [job for job in batch if self._pending.get(job.id) is job]

    def _slot_loop(self, slot: Slot) -> None:
        """Supervised: nothing that goes wrong with one batch ends the slot."""
        while True:
            taken = None
            try:
                taken = self._next_batch(slot)
                if taken is None:
                    return
                self._run_batch(slot, taken[0], taken[1])
            except Exception as exc:
                slot.crashes += 1
                ids = [job.id for job in slot.batch]
                log.exception("worker error; its batch failed and the worker carries on",
                              extra={"ctx": {"worker": slot.name, "jobs": ids}})
                self._fail_all(slot.batch, _internal_error(exc))
            finally:
                taken = None  # no reference to the model outlives its batch: an unload frees its memory
                with self._cond:
                    if slot.model_key is not None:
                        self._let_go(slot.engine, slot.model_key)
                        slot.model_key = None
                    slot.batch, slot.busy_since = [], None
                    self._cond.notify_all()

    def _run_batch(self, slot: Slot, model: Any, batch: list[Job]) -> None:
        live = []
        for job in batch:  # cancelled between being taken and starting: ends now, never left 'running'
            if job.cancel_requested:
                self._finish_cancelled(job)
            else:
                live.append(job)
        if not live:
            return
        self._hook("batch_started", {"size": sum(j.n for j in live), "model": model.spec.key})
        started = self._clock()
        try:
            self._generate(slot, model, live)
        except Exception as exc:
            if len(live) == 1:
                raise
            # Isolation: one job's bad input must not fail the others. Run each alone; only the culprit fails.
            log.warning("batch failed (%s); retrying its %d jobs one by one", type(exc).__name__, len(live),
                        extra={"ctx": {"jobs": [job.id for job in live]}})
            for job in live:
                try:
                    self._generate(slot, model, [job])
                except Exception as single:
                    log.exception("generation failed", extra={"ctx": {"model": model.spec.key, "jobs": [job.id]}})
                    self._fail_all([job], _internal_error(single))
        self.pacing.record(self._clock() - started)

    def _generate(self, slot: Slot, model: Any, jobs: list[Job]) -> None:
        """One engine call for ``jobs``; maps the engine's expected errors to job outcomes. Anything else
        propagates (a bug or a bad input) for the caller to isolate."""
        engine = self.engines[slot.engine]
        requests = [job.engine_request(self._cancel_check(job), self._progress_callback(slot, job)) for job in jobs]
        try:
            results = engine.generate(model, jobs[0].params, requests)
        except GenerationCancelled:
            for job in jobs:
                self._finish_cancelled(job)
            return
        except OutOfMemory as exc:
            self._hook("oom_failure", {"reason": exc.reason, "model": model.spec.key})
            self._fail_all(jobs, JobError(f"out of memory: {exc.reason}", code="out_of_memory", status=503))
            return
        except BadOutput as exc:
            self._fail_all(jobs, JobError(str(exc), code="bad_output", status=503))
            return
        except AdapterError as exc:  # the adapter, not the batch: every job named it
            self._fail_all(jobs, JobError(f"invalid 'loras': {exc}", code="lora_unavailable", status=400))
            return
        except WorkerUnresponsive as exc:  # the worker was replaced: a cancel that could not cross ends the job
            for job in jobs:
                if job.cancel_requested:
                    self._finish_cancelled(job)
                else:
                    self._fail_all([job], JobError(str(exc), code="worker_unresponsive", status=503))
            return
        for job, result in zip(jobs, results, strict=True):
            if job.cancel_requested:
                self._finish_cancelled(job)
            elif job.transition(JobStatus.SUCCEEDED, result=result):
                self._hook("job_succeeded", {"job": job})

    def _finish_cancelled(self, job: Job) -> None:
        if job.transition(JobStatus.CANCELLED, error=cancelled_error("cancelled while running")):
            self._hook("job_cancelled", {"job": job})

    def _fail_all(self, jobs: list[Job], error: JobError) -> None:
        for job in jobs:
            if job.transition(JobStatus.FAILED, error=error):
                self._hook("job_failed", {"job": job})

    @staticmethod
    def _cancel_check(job: Job) -> Callable[[], bool]:
        return lambda: job.cancel_requested

    def _progress_callback(self, slot: Slot, job: Job) -> Callable[[int, int, Any], None]:
        def progress(step: int, total: int, preview: Any) -> None:
            slot.last_progress = self._clock()
            job.step = step
            job.total_steps = total
            event: dict[str, Any] = {"type": "progress", "step": step, "total": total}
            if preview is not None:
                event["preview"] = preview
            job.emit(event)
        return progress

    # --- housekeeping ----------------------------------------------------------------------------
    def expire_queued(self) -> int:
        """End queued jobs that waited past FLUX_QUEUE_TIMEOUT with 504 (the reaper calls this)."""
        now = self._clock()
        limit = self.settings.queue_timeout
        error = JobError(f"the job waited longer than FLUX_QUEUE_TIMEOUT ({limit:g}s) in the queue",
                         code="queue_timeout", status=504)
        with self._cond:
            expired = [job for job in self._pending.values() if now - job.enqueued_at > limit]
            for job in expired:
                del self._pending[job.id]
                if job.transition(JobStatus.EXPIRED, error=error):
                    self._hook("job_failed", {"job": job})
            if expired:
                self._update_positions()
                self._cond.notify_all()
        return len(expired)

    def housekeeping(self) -> None:
        """One round of the reaper: expiries, loads queued jobs wait for, the job table's TTL."""
        self.expire_queued()
        self._kick_loads()
        self.table.sweep()

    def _reaper_loop(self) -> None:
        """Expire queued jobs on time even while every slot is busy; forget stale results."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(timeout=0.1)
                if self._stopping:
                    return
            try:
                self.housekeeping()
            except Exception:  # the reaper must outlive any one bad round
                log.exception("job reaper round failed")


def _internal_error(exc: BaseException) -> JobError:
    return JobError(f"generation failed ({type(exc).__name__}); the request id is in the server log",
                    code="internal_error", status=500)
