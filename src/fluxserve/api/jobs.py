"""Async jobs (``/v1/images/jobs``, ``/v1/images/edits/jobs``): what the server promises a client that
does not wait, behind one small protocol with two implementations.

* :class:`DurableJobs` (the default): every async job lives in the job store (SQLite, or PostgreSQL shared by
  any number of processes) and its images in the result store (a local directory, or S3-compatible object
  storage). Any process of the deployment answers polls, streams, cancels and result downloads of any job;
  jobs queued through any process run on whichever one claims them; a restart resumes them (see
  docs/durability.md). Terminal transitions put the job's signed webhook in the store's outbox.
* :class:`MemoryJobs` (``FLUX_JOB_STORE=memory``): the scheduler's in-process table, lost on restart.

Routes call only the :class:`AsyncJobs` methods; neither implementation imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fluxserve.api.errors import APIError, sanitize
from fluxserve.api.protocol import ImageEditRequest, ImageGenerationRequest, public_model_source
from fluxserve.api.serving import FILES_PREFIX, OUTPUTS_PREFIX, ImageService, OutputOptions, until_gone
from fluxserve.observability.events import stored_job_cancelled
from fluxserve.scheduler.jobs import TERMINAL_EVENTS, Job, JobError, JobStatus, Subscription
from fluxserve.storage.budgets import files_over_budget
from fluxserve.storage.images import MEDIA_TYPES
from fluxserve.storage.jobstore import (
    DuplicateRequestId,
    JobRecord,
    JobState,
    JobStore,
    JobStoreConfig,
    JobStoreError,
    JobStoreUnavailable,
    NewJob,
    ResultRef,
    open_job_store,
)
from fluxserve.storage.jobstore.protocol import new_worker_id
from fluxserve.storage.results import (
    ResultMissing,
    ResultStore,
    ResultStoreConfig,
    ResultStoreUnavailable,
    open_result_store,
)
from fluxserve.storage.results.protocol import ObjectListing
from fluxserve.webhooks.delivery import WebhookConfig, WebhookDispatcher
from fluxserve.webhooks.urls import AllowedHosts, WebhookURLError, validate_webhook_url

if TYPE_CHECKING:
    from fluxserve.api.editing import EditService, Upload

log = logging.getLogger(__name__)

T = TypeVar("T")

KIND_GENERATION = "generation"
KIND_EDIT = "edit"
_NOT_STORED = frozenset({"image", "images", "mask", "webhook_url", "stream", "partial_images", "stream_progress"})
"""Request fields a durable job does not keep: pixels (kept as input objects), and what only a live
connection uses."""
_INPUT_MEDIA = "application/octet-stream"
_HOUSEKEEPING = 10.0
"""Seconds between sweeps of the durable store (expired results, leases of dead processes); at most half of
FLUX_JOB_LEASE, so a dead process's job is taken up again soon after its lease ends."""


def public_job(data: dict[str, Any]) -> dict[str, Any]:
    """A job's status or event as clients see it: error messages without paths or addresses (the log keeps
    them), model sources without local paths."""
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        data["error"] = {**error, "message": sanitize(error["message"])}
    if isinstance(data.get("message"), str):
        data["message"] = sanitize(data["message"])
    if isinstance(data.get("model"), str):
        data["model"] = public_model_source(data["model"])
    return data


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"no job with id {job_id[:64]!r} (unknown, or expired after FLUX_JOB_TTL)",
                    param="id", code="job_not_found")


def _expired(job_id: str) -> APIError:
    return APIError(410, f"the result of job {job_id!r} has expired (FLUX_JOB_TTL / FLUX_RESULTS_MAX_BYTES)",
                    param="id", code="result_expired")


@dataclass
class Submission:
    """An async job as a route hands it over: the validated job, its output options, the request as the
    client sent it (without pixels), and an edit's input files."""

    job: Job
    options: OutputOptions
    body: ImageGenerationRequest
    kind: str = KIND_GENERATION
    inputs: list[Upload] = field(default_factory=list)
    mask: Upload | None = None
    webhook_url: str | None = None


class AsyncJobs(Protocol):
    """What the async-job routes need."""

    def open(self) -> None:
        """Open the stores (blocking); raises with the reason when they cannot be used."""
        ...

    def close(self) -> None:
        """Close the stores (blocking; closing twice is harmless)."""
        ...

    async def start(self) -> None: ...

    def stop_claiming(self) -> None:
        """Shutdown begins: take no more work (what runs finishes, or is drained)."""
        ...

    async def stop(self) -> None: ...

    async def submit(self, submission: Submission) -> dict[str, Any]:
        """Queue the job; its public status (202)."""
        ...

    async def status(self, job_id: str, owner: str | None, base_url: str) -> dict[str, Any]:
        """Status, and once succeeded the result (404 unknown, 410 expired)."""
        ...

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """Cancel a queued or running job and return its status (404 unknown, 409 already finished)."""
        ...

    async def cancel_by_label(self, request_id: str, owner: str | None) -> dict[str, Any]:
        """Cancel the owner's queued or running job labelled ``request_id`` (or with that id)."""
        ...

    async def events(self, job_id: str, owner: str | None, after: int) -> AsyncIterator[dict[str, Any]]:
        """The job's events after event ``after`` (404 before anything is sent); ends after the terminal one."""
        ...

    async def result_file(self, job_id: str, name: str, owner: str | None) -> tuple[bytes, str]:
        """One result image of a job (for ``url`` results kept in a local result store)."""
        ...

    def problems(self) -> list[str]:
        """What /ready reports about the job store (as warnings: synchronous requests still work)."""
        ...


# --- in memory ----------------------------------------------------------------------------------------
async def _settled(job: Job, timeout: float = 5.0) -> None:
    """Wait (bounded) for a cancelled job to end: at once when queued, within one step when running."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.done(), timeout)


async def cancel_live(service: ImageService, request_id: str, owner: str | None, *,
                      skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """Cancel the owner's live job of this process labelled ``request_id`` (or with that id): a synchronous or
    streamed request, or an in-memory async job. None when there is none."""
    table = service.runtime.scheduler.table
    job: Job | None = table.find(request_id, owner) or table.get(request_id, owner)
    if job is None or job.id in skip or service.runtime.scheduler.cancel(job.id) is None:
        return None
    await _settled(job)
    return {"job_id": job.id, "status": job.status.value}


class MemoryJobs:
    """Async jobs in the scheduler's in-process table (``FLUX_JOB_STORE=memory``): lost on restart."""

    def __init__(self, service: ImageService) -> None:
        self.service = service

    @property
    def _table(self) -> Any:
        return self.service.runtime.scheduler.table

    def open(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def start(self) -> None:
        return None

    def stop_claiming(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def problems(self) -> list[str]:
        return []

    async def submit(self, submission: Submission) -> dict[str, Any]:
        if submission.webhook_url is not None:
            raise APIError(400, "webhook_url needs a durable job store (FLUX_JOB_STORE is memory on this server)",
                           param="webhook_url", code="webhooks_unavailable")
        job = submission.job
        job.metadata["keep_result"] = True
        self.service.submit(job)
        self.service.finalize_in_background(job, submission.options)
        return public_job(job.summary())

    def _job(self, job_id: str, owner: str | None) -> Job:
        job: Job | None = self._table.get(job_id, owner)
        if job is None:
            raise _not_found(job_id)
        return job

    async def status(self, job_id: str, owner: str | None, base_url: str) -> dict[str, Any]:
        job: Job | None = self._table.get(job_id, owner)
        if job is None:
            stone = self._table.tombstone(job_id, owner)
            if stone is None:
                raise _not_found(job_id)
            if stone.result_expired:
                raise _expired(job_id)
            return public_job(dict(stone.summary))
        data = public_job(job.summary())
        if job.status is JobStatus.SUCCEEDED:
            stored = self._table.result(job)
            if stored is not None:
                data["result"] = stored.payload
            else:
                data["status"] = "running"  # images are still being encoded
        return data

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        job = self._job(job_id, owner)
        if job.finished:
            raise APIError(409, f"job {job_id!r} already {job.status.value}", param="id", code="job_finished")
        self.service.runtime.scheduler.cancel(job_id)
        await _settled(job)
        return public_job(job.summary())

    async def cancel_by_label(self, request_id: str, owner: str | None) -> dict[str, Any]:
        live = await cancel_live(self.service, request_id, owner)
        if live is None:
            raise APIError(404, f"no queued or running job with request_id {request_id!r}", param="request_id",
                           code="job_not_found")
        return live

    async def events(self, job_id: str, owner: str | None, after: int) -> AsyncIterator[dict[str, Any]]:
        job: Job | None = self._table.get(job_id, owner)
        if job is None:
            stone = self._table.tombstone(job_id, owner)
            if stone is None:
                raise _not_found(job_id)
            return self._ended(dict(stone.summary))  # it has ended: its status is all there is to tell
        return self._follow(job)

    async def _ended(self, summary: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "status", **public_job(summary)}

    async def _follow(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "status", **public_job(job.summary())}
        async with job.subscribe() as subscription:
            # Never set: the response ends when the client leaves (the server cancels the generator).
            forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            async with contextlib.aclosing(until_gone(subscription, forever)) as followed:
                async for event in followed:  # ends after the terminal event
                    yield public_job({k: v for k, v in event.items() if k != "preview"})

    async def result_file(self, job_id: str, name: str, owner: str | None) -> tuple[bytes, str]:
        raise APIError(404, "no such file", param="name", code="file_not_found")


# --- durable ------------------------------------------------------------------------------------------
@dataclass
class _Local:
    """A durable job this process runs."""

    job: Job
    record: JobRecord
    cancel_asked: bool = False
    task: asyncio.Task[None] | None = None


class DurableJobs:
    """Async jobs in the job store and the result store; see the module doc and docs/durability.md."""

    def __init__(self, service: ImageService, edits: EditService) -> None:
        self.service = service
        self.edits = edits
        settings = service.runtime.settings
        self.storage = settings.storage
        self.worker = new_worker_id()
        self.poll_interval = self.storage.job_poll_interval
        self.claim_limit = max(1, settings.scheduler.max_batch) * max(1, len(service.runtime.plans))
        """Durable jobs this process holds at once: a full batch per device. Claiming more would only move
        jobs from the shared queue into this process's, where no other replica can take them."""
        self.max_jobs = settings.scheduler.max_jobs
        self.max_queued_per_key = settings.scheduler.max_queued_per_key
        self.allowed_hosts = AllowedHosts.parse(settings.webhooks.webhook_allowed_hosts)
        self.webhook_config = WebhookConfig.from_settings(settings.webhooks)
        self.store: JobStore | None = None
        self.results: ResultStore | None = None
        self.dispatcher: WebhookDispatcher | None = None
        self._io = ThreadPoolExecutor(4, thread_name_prefix="jobstore")
        self._live = MemoryJobs(service)
        """Synchronous and streamed requests are not stored, but their status, events and cancel are served
        by the process that runs them (the earlier web client follows its own request by id)."""
        self._local: dict[str, _Local] = {}
        self._pending: list[JobRecord] = []
        """Claimed jobs the scheduler had no room for yet (their leases are renewed like running ones)."""
        self._wake: asyncio.Event | None = None
        """Set to make the runner look at the store now (on the runner's loop: use :meth:`_poke`)."""
        self._runner: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._started = threading.Event()
        self._changed: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        """Job id → readers waiting for its next change, each on its own loop."""
        self._changed_lock = threading.Lock()
        self._stopping = False
        self._starts = 0
        self._problem: str | None = None
        self._last_housekeeping = 0.0

    # --- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the stores (blocking). Raises :class:`JobStoreError` / ValueError with the reason: a server
        that cannot keep its promises does not start."""
        if self.store is not None:
            return
        self.results = open_result_store(ResultStoreConfig.from_settings(self.storage))
        if isinstance(self.results, ObjectListing):  # object storage: url images of synchronous requests go there
            self.service.object_files = self.results
        self.store = open_job_store(JobStoreConfig.from_settings(self.storage))
        recovered = self.store.recover()
        if recovered.requeued or recovered.failed:
            log.info("resumed jobs of a process that stopped", extra={"ctx": {
                "requeued": recovered.requeued, "failed_interrupted": recovered.failed}})
        if self.webhook_config is not None:
            self.dispatcher = WebhookDispatcher(self.store, self.webhook_config, worker=self.worker,
                                                on_attempt=self._webhook_attempted)
            self.dispatcher.start()

    async def start(self) -> None:
        self._starts += 1  # one app may be started by several lifespans at once (test clients): the last stop stops
        if self.store is None:  # a new start of the same app (after a stop): the runner starts again too
            self._stopping = False
            self._thread = None
            self._started.clear()
        await asyncio.get_running_loop().run_in_executor(self._io, self.open)
        self._ensure_running()

    def _ensure_running(self) -> None:
        """Start the runner: a thread with its own event loop that claims, runs and records jobs. It does not
        share the serving loop, so it works under any ASGI server (and an app whose lifespan never ran starts it
        with the first request)."""
        with self._thread_lock:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="fluxserve-jobs",
                                            daemon=True)
            self._thread.start()
        self._started.wait(30)

    async def _main(self) -> None:
        self._runner = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started.set()
        await self._run()
        # The drain ends what runs here; record each end before the stores close.
        tasks = [local.task for local in list(self._local.values()) if local.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.service.runtime.settings.shutdown_timeout + 10)

    def _poke(self) -> None:
        """Wake the runner (from any thread)."""
        runner, wake = self._runner, self._wake
        if runner is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended
                runner.call_soon_threadsafe(wake.set)

    def stop_claiming(self) -> None:
        if self._starts > 1:
            return
        self._stopping = True
        self._poke()

    async def stop(self) -> None:
        """After the drain: jobs it cancelled are left as they are in the store (running), so a restart runs
        them again (same seeds); then the stores close."""
        self._starts = max(0, self._starts - 1)
        if self._starts:
            return
        self.stop_claiming()
        thread = self._thread
        loop = asyncio.get_running_loop()
        if thread is not None:
            await loop.run_in_executor(None, thread.join, self.service.runtime.settings.shutdown_timeout + 30)
        await loop.run_in_executor(self._io, self.close)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop(timeout=self.webhook_config.timeout + 5 if self.webhook_config else 5)
            self.dispatcher = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._io.shutdown(wait=False)
        self._io = ThreadPoolExecutor(4, thread_name_prefix="jobstore")  # threads start only when used again

    def problems(self) -> list[str]:
        # The reason (with the store's address) goes to the log, not to whoever asks /ready.
        return ["the job store is unreachable: async jobs answer 503 until it is back"] if self._problem else []

    # --- helpers -------------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], T]) -> T:
        """Run a blocking store call off the event loop; an unreachable store is 503 for the client."""
        if self.store is None:
            await asyncio.get_running_loop().run_in_executor(self._io, self.open)
        self._ensure_running()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._io, fn)
        except JobStoreUnavailable as exc:
            if self._problem is None:
                log.warning("job store unavailable: %s", exc)
            self._problem = str(exc)
            raise APIError(503, "the job store is unavailable; retry later (synchronous requests still work)",
                           code="job_store_unavailable", headers={"Retry-After": "5"}) from None
        except ResultStoreUnavailable:
            raise APIError(503, "the result store is unavailable; retry later", code="result_store_unavailable",
                           headers={"Retry-After": "5"}) from None
        self._problem = None
        return result

    def _db(self) -> JobStore:
        assert self.store is not None
        return self.store

    def _objects(self) -> ResultStore:
        assert self.results is not None
        return self.results

    def _signal(self, job_id: str) -> None:
        """The job changed: wake its readers (any thread, any loop)."""
        with self._changed_lock:
            waiting = self._changed.pop(job_id, [])
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # that reader's loop has ended
                loop.call_soon_threadsafe(event.set)

    async def _changed_or_timeout(self, job_id: str, timeout: float) -> None:
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._changed_lock:
            self._changed.setdefault(job_id, []).append(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            with self._changed_lock:
                waiting = self._changed.get(job_id)
                if waiting is not None and entry in waiting:
                    waiting.remove(entry)
                    if not waiting:
                        del self._changed[job_id]

    def _webhook_attempted(self, delivery: Any, attempt: Any) -> None:
        outcome = "delivered" if attempt.delivered else "failed"
        self.service.runtime.metrics.observe_webhook(delivery.event_type, outcome)

    def _notify_webhooks(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.notify()

    # --- submit --------------------------------------------------------------------------------------
    async def submit(self, submission: Submission) -> dict[str, Any]:
        job = submission.job
        if self.service.runtime.shutting_down or self._stopping:
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down",
                           headers={"Retry-After": "5"})
        webhook_url = None
        if submission.webhook_url is not None:
            webhook_url = await asyncio.get_running_loop().run_in_executor(
                self._io, self._check_webhook, submission.webhook_url)
        document = self._request_document(submission)
        new = NewJob(id=job.id, owner=job.owner, model=job.spec.key, request=document, seeds=list(job.seeds),
                     request_id=job.request_id, webhook_url=webhook_url)

        def create() -> JobRecord:
            store, objects = self._db(), self._objects()
            unfinished = store.unfinished()
            if len(unfinished) >= self.max_jobs:
                raise JobError(f"the server already holds {self.max_jobs} unfinished jobs (FLUX_MAX_JOBS); retry "
                               "later", code="queue_full", status=429, retry_after=1.0)
            if self.max_queued_per_key and job.owner is not None and \
                    sum(1 for r in unfinished if r.owner == job.owner) >= self.max_queued_per_key:
                raise JobError(f"this key already has {self.max_queued_per_key} unfinished jobs "
                               "(FLUX_MAX_QUEUED_PER_KEY); retry later", code="queue_full", status=429,
                               retry_after=1.0)
            for index, upload in enumerate(submission.inputs):
                objects.put(job.id, f"input-{index}", upload.data, _INPUT_MEDIA)
            if submission.mask is not None:
                objects.put(job.id, "input-mask", submission.mask.data, _INPUT_MEDIA)
            try:
                return store.create(new)
            except BaseException:
                if submission.inputs or submission.mask is not None:
                    objects.delete_job(job.id)
                raise

        try:
            record = await self._call(create)
        except DuplicateRequestId:
            raise APIError(409, f"request_id {job.request_id!r} is already in use by a queued or running job",
                           param="request_id", code="duplicate_request_id") from None
        except ValueError as exc:
            raise APIError(400, f"the request is too large to keep as a job: {exc}", param="prompt",
                           code="request_too_large") from None
        self._poke()
        return self._public(record)

    def _check_webhook(self, url: str) -> str:
        if self.webhook_config is None or self.allowed_hosts.empty:
            raise APIError(400, "webhooks are off on this server (set FLUX_WEBHOOK_SECRET and "
                                "FLUX_WEBHOOK_ALLOWED_HOSTS)", param="webhook_url", code="webhooks_unavailable")
        try:
            return validate_webhook_url(url, self.allowed_hosts).url
        except WebhookURLError as exc:
            raise APIError(400, f"invalid 'webhook_url': {exc}", param="webhook_url",
                           code="invalid_webhook_url") from None

    def _request_document(self, submission: Submission) -> dict[str, Any]:
        """The request as kept with the job: no pixels, the first seed fixed (a rerun makes the same images),
        the resolved response format, and the kind of job."""
        body = submission.body
        document = body.model_dump(mode="json", exclude_none=True, exclude=set(_NOT_STORED))
        document["seed"] = submission.job.seeds[0]
        document["response_format"] = submission.options.response_format
        document["store_local"] = submission.options.store_local
        return {"kind": submission.kind, "body": document, "inputs": len(submission.inputs),
                "mask": submission.mask is not None, "variation": submission.options.event_prefix == "image_variation"}

    # --- running -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            try:
                await self._tick()
            except (JobStoreError, ResultStoreUnavailable) as exc:
                if self._problem is None:
                    log.warning("job store unavailable: %s", exc)
                self._problem = str(exc)
            except Exception:
                log.exception("durable job loop failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        store = self._db()
        now = time.monotonic()
        if now - self._last_housekeeping >= min(_HOUSEKEEPING, self.storage.job_lease / 2):
            self._last_housekeeping = now
            await loop.run_in_executor(self._io, self._housekeeping)
        if self._local or self._pending:
            asked = await loop.run_in_executor(self._io, store.renew_leases, self.worker)
            for job_id in asked:
                local = self._local.get(job_id)
                if local is not None and not local.cancel_asked:
                    local.cancel_asked = True
                    self.service.runtime.scheduler.cancel(job_id)
            for waiting in [r for r in self._pending if r.id in asked]:
                self._pending.remove(waiting)
                if await loop.run_in_executor(self._io, functools.partial(store.mark_cancelled, waiting.id,
                                                                            worker=self.worker)):
                    # claimed, but never in the scheduler
                    stored_job_cancelled(self.service.runtime.metrics, waiting,
                                         log_prompts=self.service.settings.log_prompts)
                self._signal(waiting.id)
                self._notify_webhooks()
        self._problem = None
        while self._pending and not self._stopping and self.service.runtime.scheduler.accepting:
            if not await self._launch(self._pending[0]):
                break
            self._pending.pop(0)
        while (not self._pending and not self._stopping and len(self._local) < self.claim_limit
               and self.service.runtime.scheduler.accepting):
            claimed: JobRecord | None = await loop.run_in_executor(
                self._io, functools.partial(store.claim_next, self.worker, models=self._servable()))
            record = claimed
            if record is None:
                break
            if record.id in self._local:  # our own job, re-queued while a stall kept its lease from renewing
                continue
            self._signal(record.id)
            if not await self._launch(record):
                self._pending.append(record)
                break

    def _servable(self) -> list[str] | None:
        """The models whose jobs this process takes (replicas serving other models leave theirs in the queue);
        None: any (FLUX_ALLOW_ANY_MODEL)."""
        runtime = self.service.runtime
        if runtime.settings.allow_any_model:
            return None
        names = runtime.models.names
        return sorted({*names.configured, *names.allowed, names.active_key})

    def _housekeeping(self) -> None:
        store, objects = self._db(), self._objects()
        store.recover()
        store.sweep()
        if self.service.object_files is not None:
            listing = self.service.object_files
            assert isinstance(listing, ObjectListing)
            self._sweep_files(listing)
            self.service.object_outputs_used = sum(obj.size for obj in listing.objects(OUTPUTS_PREFIX))
        while garbage := store.take_garbage(100):
            for job_id in garbage:
                try:
                    objects.delete_job(job_id)
                except ResultStoreUnavailable as exc:
                    log.warning("could not delete a job's results now: %s", exc)
                    return
            store.garbage_collected(garbage)

    def _sweep_files(self, listing: ObjectListing) -> None:
        """Budgets of the ``url`` images of synchronous requests in object storage, kept from a listing that
        every replica sees the same (:func:`~fluxserve.storage.budgets.files_over_budget`)."""
        doomed = files_over_budget(listing.objects(FILES_PREFIX), now=time.time(), ttl=self.storage.file_ttl,
                                   max_bytes=self.storage.files_max_bytes,
                                   max_bytes_per_owner=self.storage.files_max_bytes_per_key)
        if doomed:
            listing.delete(doomed)

    async def _launch(self, record: JobRecord) -> bool:
        """Run a claimed job here. False when the scheduler has no room now (the job stays claimed)."""
        try:
            job, options = await self._rebuild(record)
        except APIError as exc:  # the server's settings changed since it was queued (model, adapter...)
            await self._finish(record.id, JobStatus.FAILED, code=exc.code or "invalid_request", message=exc.message)
            return True
        except (ResultMissing, ResultStoreUnavailable) as exc:
            await self._finish(record.id, JobStatus.FAILED, code="inputs_unavailable",
                               message=f"the job's input images could not be read ({type(exc).__name__})")
            return True
        local = _Local(job, record, cancel_asked=record.cancel_requested)
        subscription = job.subscribe()  # before submit: no event can be missed
        try:
            self.service.submit(job)
        except JobError as exc:
            subscription.close()
            if exc.code == "queue_full" or exc.status == 503:
                return False
            await self._finish(record.id, JobStatus.FAILED, code=exc.code, message=exc.message)
            return True
        self._local[record.id] = local
        local.task = asyncio.get_running_loop().create_task(self._follow(local, subscription, options))
        return True

    async def _rebuild(self, record: JobRecord) -> tuple[Job, OutputOptions]:
        """The scheduler job of a stored request: validated again, the same seeds, the same id."""
        stored = record.request
        kind = stored.get("kind", KIND_GENERATION)
        base_url = self.service.settings.public_url or ""
        if kind == KIND_EDIT:
            from fluxserve.api.editing import Upload

            edit_body = ImageEditRequest.model_validate(stored["body"])
            objects = self._objects()

            def read_inputs() -> tuple[list[Upload], Upload | None]:
                names = [f"input-{i}" for i in range(int(stored.get("inputs", 0)))]
                uploads = [Upload("image" if i == 0 else f"image[{i}]", objects.get(f"{record.id}/{name}"))
                           for i, name in enumerate(names)]
                mask = Upload("mask", objects.get(f"{record.id}/input-mask")) if stored.get("mask") else None
                return uploads, mask

            uploads, mask = await asyncio.get_running_loop().run_in_executor(self._io, read_inputs)
            variation = bool(stored.get("variation"))
            job = await asyncio.get_running_loop().run_in_executor(
                self.service.runtime.encoder, lambda: self.edits.build_job(
                    edit_body, uploads, mask, record.request_id, variation=variation, owner=record.owner))
            options = self.service.output_options(edit_body, base_url)
        else:
            body = ImageGenerationRequest.model_validate(stored["body"])
            job = self.service.build_job(body, request_id=record.request_id, owner=record.owner)
            options = self.service.output_options(body, base_url)
        if list(job.seeds) != list(record.seeds):
            raise APIError(400, "the job's seeds cannot be reproduced", code="invalid_request")
        job.id = record.id
        job.metadata["keep_result"] = False
        job.metadata["trace_id"] = record.id
        options.deliver = False
        return job, options

    async def _follow(self, local: _Local, subscription: Subscription, options: OutputOptions) -> None:
        job = local.job
        loop = asyncio.get_running_loop()
        store = self._db()
        try:
            async with subscription:
                async for event in subscription:
                    kind = event.get("type")
                    if kind == "progress":
                        data = {"step": event.get("step"), "total": event.get("total")}
                        with contextlib.suppress(JobStoreError):
                            await loop.run_in_executor(self._io, functools.partial(
                                store.append_event, job.id, {"type": "progress", **data}, coalesce=True))
                        self._signal(job.id)
                    elif kind in TERMINAL_EVENTS:
                        break
            await job.done()
            await self._ended(local, options)
        except Exception:
            log.exception("durable job follow-up failed", extra={"ctx": {"job_id": job.id}})
        finally:
            self._local.pop(job.id, None)
            self._signal(job.id)
            self._poke()

    async def _ended(self, local: _Local, options: OutputOptions) -> None:
        job = local.job
        status = job.status
        if status is JobStatus.SUCCEEDED:
            try:
                response, images = await self.service.render(job, options)
            except APIError as exc:
                await self._finish(job.id, JobStatus.FAILED, code=exc.code or "internal_error", message=exc.message)
                return
            ext = "jpg" if options.output_format == "jpeg" else options.output_format
            media = MEDIA_TYPES[options.output_format]
            objects = self._objects()

            def keep() -> list[ResultRef]:
                return [objects.put(job.id, f"image-{index}.{ext}", data, media) for index, data in enumerate(images)]

            try:
                refs = await asyncio.get_running_loop().run_in_executor(self._io, keep)
            except ResultStoreUnavailable as exc:
                await self._finish(job.id, JobStatus.FAILED, code="result_store_unavailable",
                                   message=f"the images could not be stored ({exc})")
                return
            meta = response.model_dump(exclude_none=True)
            timings = {k: float(v) for k, v in (meta["data"][0].get("timing") or {}).items()} if meta["data"] else {}
            await self._finish(job.id, JobStatus.SUCCEEDED, refs=refs, meta=meta, timings=timings)
        elif status is JobStatus.CANCELLED:
            if self._stopping and not local.cancel_asked:
                return  # the drain stopped it: the store keeps it running, and a restart runs it again
            await self._finish(job.id, JobStatus.CANCELLED,
                               message=job.error.message if job.error else "the job was cancelled")
        else:
            error = job.error or JobError("the job did not finish", code="internal_error", status=500)
            await self._finish(job.id, status, code=error.code, message=error.message)

    async def _finish(self, job_id: str, status: JobStatus, *, code: str = "", message: str = "",
                      refs: list[ResultRef] | None = None, meta: dict[str, Any] | None = None,
                      timings: dict[str, float] | None = None) -> None:
        """The store's terminal transition (with its webhook), retried while the database is away: a job
        that ran is never forgotten because the database blinked."""
        store = self._db()

        def write() -> bool:
            if status is JobStatus.SUCCEEDED:
                return store.mark_succeeded(job_id, results=refs or [], result_meta=meta, timings=timings,
                                            worker=self.worker)
            if status is JobStatus.CANCELLED:
                return store.mark_cancelled(job_id, message=message, worker=self.worker)
            state = JobState.EXPIRED if status is JobStatus.EXPIRED else JobState.FAILED
            return store.mark_failed(job_id, code=code, message=message, timings=timings, worker=self.worker,
                                     state=state)

        delay = 0.5
        while True:
            try:
                written = await asyncio.get_running_loop().run_in_executor(self._io, write)
                break
            except JobStoreError as exc:
                self._problem = str(exc)
                if self._stopping and delay > 8:
                    log.warning("could not record a job's end before shutdown; it runs again after a restart",
                                extra={"ctx": {"job_id": job_id}})
                    return
                await asyncio.sleep(delay)  # the database is away: try again (bounded back-off)
                delay = min(delay * 2, 10.0)
        if written:
            self.service.runtime.metrics.observe_durable_end(status.value)
        if not written and refs:  # it was cancelled meanwhile: its images are nobody's
            with contextlib.suppress(ResultStoreUnavailable):
                await asyncio.get_running_loop().run_in_executor(self._io, self._objects().delete_job, job_id)
        self._signal(job_id)
        self._notify_webhooks()

    # --- reading -------------------------------------------------------------------------------------
    def _public(self, record: JobRecord, *, with_progress: bool = True) -> dict[str, Any]:
        data = record.public()
        data.setdefault("queue_position", None)
        data.setdefault("progress", {"step": 0, "total": record.request.get("body", {}).get("num_inference_steps")})
        local = self._local.get(record.id)
        if local is not None and with_progress:
            job = local.job
            data["queue_position"] = job.queue_position
            data["progress"] = {"step": job.step, "total": job.total_steps or job.params.steps}
            data["batch_size"] = job.batch_size
            if job.cancel_step is not None:
                data["cancel_step"] = job.cancel_step
        return public_job(data)

    async def _record(self, job_id: str, owner: str | None) -> JobRecord:
        def get() -> JobRecord | None:
            try:
                return self._db().get(job_id, owner=owner)
            except ValueError:  # not a job id at all
                return None

        record = await self._call(get)
        if record is None:
            raise _not_found(job_id)
        return record

    def _live_job(self, job_id: str, owner: str | None) -> Job | None:
        """A synchronous or streamed request running in this process (never one of the stored jobs)."""
        if job_id in self._local:
            return None
        job: Job | None = self.service.runtime.scheduler.table.get(job_id, owner)
        return job

    async def _stored_or_none(self, job_id: str, owner: str | None) -> JobRecord | None:
        """The stored job, or None when this process answers for it instead: a synchronous or streamed request
        it runs, or ran (its status stays among the table's records)."""
        if self._live_job(job_id, owner) is not None:
            return None
        try:
            return await self._record(job_id, owner)
        except APIError as exc:
            if exc.status == 404 and (self._live_job(job_id, owner) is not None
                                      or self.service.runtime.scheduler.table.tombstone(job_id, owner) is not None):
                return None
            raise

    async def status(self, job_id: str, owner: str | None, base_url: str) -> dict[str, Any]:
        record = await self._stored_or_none(job_id, owner)
        if record is None:
            return await self._live.status(job_id, owner, base_url)
        data = self._public(record)
        if record.state is not JobState.SUCCEEDED:
            if record.state is JobState.RUNNING and "progress" not in data:
                events = await self._call(lambda: self._db().events(job_id))
                steps = [e for e in events if e.type == "progress"]
                if steps:
                    data["progress"] = {"step": steps[-1].data.get("step"), "total": steps[-1].data.get("total")}
            return data
        if record.result_expired:
            raise _expired(job_id)
        data["result"] = await self._result(record, base_url)
        return data

    async def _result(self, record: JobRecord, base_url: str) -> dict[str, Any]:
        result = dict(record.result_meta or {})
        items = [dict(item) for item in result.get("data", [])]
        url_format = record.request.get("body", {}).get("response_format") == "url"
        objects = self._objects()
        base = (self.service.settings.public_url or base_url).rstrip("/")

        def fill() -> None:
            for item, ref in zip(items, record.results, strict=False):
                if url_format:
                    item["url"] = objects.url(ref.key) or f"{base}/v1/images/jobs/{record.id}/files/" \
                                                          f"{ref.key.rsplit('/', 1)[-1]}"
                else:
                    item["b64_json"] = base64.b64encode(objects.get(ref.key)).decode("ascii")

        try:
            await self._call(fill)
        except APIError:
            raise
        except ResultMissing:
            raise _expired(record.id) from None
        result["data"] = items
        return result

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        record = await self._stored_or_none(job_id, owner)
        if record is None:
            return await self._live.cancel(job_id, owner)
        if record.finished:
            raise APIError(409, f"job {job_id!r} already {record.state.value}", param="id", code="job_finished")
        record = await self._cancel(record, owner)
        return self._public(record)

    async def _cancel(self, record: JobRecord, owner: str | None) -> JobRecord:
        job_id = record.id
        updated = await self._call(lambda: self._db().request_cancel(job_id, owner=owner))
        if updated is None:
            raise _not_found(job_id)
        if updated.finished:  # it was still queued in the store: no process ran it, so it is counted here
            if updated.state is JobState.CANCELLED and not record.finished:
                stored_job_cancelled(self.service.runtime.metrics, updated,
                                     log_prompts=self.service.settings.log_prompts)
            self._signal(job_id)
            self._notify_webhooks()
            return updated
        local = self._local.get(job_id)
        if local is not None:
            local.cancel_asked = True
            self.service.runtime.scheduler.cancel(job_id)
        deadline = time.monotonic() + 5.0  # running elsewhere: its process sees the flag at its next look
        while not updated.finished and time.monotonic() < deadline:
            await self._changed_or_timeout(job_id, min(self.poll_interval, 0.25))
            updated = await self._record(job_id, owner)
        return updated

    async def cancel_by_label(self, request_id: str, owner: str | None) -> dict[str, Any]:
        live = await cancel_live(self.service, request_id, owner, skip=set(self._local))
        if live is not None:
            return live

        def find() -> JobRecord | None:
            store = self._db()
            record = store.find(request_id, owner=owner)
            if record is None:
                with contextlib.suppress(ValueError):
                    record = store.get(request_id, owner=owner)
            return record

        record = await self._call(find)
        if record is None or record.finished:
            raise APIError(404, f"no queued or running job with request_id {request_id!r}", param="request_id",
                           code="job_not_found")
        record = await self._cancel(record, owner)
        return {"job_id": record.id, "status": record.state.value}

    async def events(self, job_id: str, owner: str | None, after: int) -> AsyncIterator[dict[str, Any]]:
        record = await self._stored_or_none(job_id, owner)
        if record is None:
            return await self._live.events(job_id, owner, after)
        return self._replay(record, owner, after)

    async def _replay(self, record: JobRecord, owner: str | None, after: int) -> AsyncIterator[dict[str, Any]]:
        job_id = record.id
        yield {"type": "status", **self._public(record)}
        while True:
            events = await self._call(functools.partial(self._db().events, job_id, after=after))
            for stored in events:
                after = stored.seq
                event = public_job({"type": stored.type, "job_id": job_id, **stored.data})
                event["_id"] = stored.seq
                yield event
                if stored.type in TERMINAL_EVENTS:
                    return
            await self._changed_or_timeout(job_id, self.poll_interval)

    async def result_file(self, job_id: str, name: str, owner: str | None) -> tuple[bytes, str]:
        record = await self._record(job_id, owner)
        ref = next((r for r in record.results if r.key.rsplit("/", 1)[-1] == name), None)
        if ref is None or record.result_expired:
            raise APIError(404, "no such file (unknown, or expired after FLUX_JOB_TTL)", param="name",
                           code="file_not_found")
        try:
            data = await self._call(lambda: self._objects().get(ref.key))
        except ResultMissing:
            raise APIError(404, "no such file (expired)", param="name", code="file_not_found") from None
        return data, ref.media_type


def build_async_jobs(service: ImageService, edits: EditService) -> AsyncJobs:
    """The implementation FLUX_JOB_STORE names."""
    if service.runtime.settings.storage.job_store == "memory":
        return MemoryJobs(service)
    return DurableJobs(service, edits)
