"""The job table: every job the server remembers, each with a budget.

* Live jobs (queued, running) are bounded by the queue and the slots in front of the table.
* A job that ends without a stored result (every synchronous or streamed request, and async jobs that
  failed or were cancelled) leaves the table at once; a small status record (its summary, no prompt,
  no pixels) stays among the last ``max_jobs`` tombstones so a poll still learns how it ended.
* Finished async jobs keep their encoded images for polling, within ``results_max_bytes`` in all,
  ``max_stored_per_owner`` per owner and ``ttl`` seconds; past any of those the oldest result expires
  and polling it answers 410 ``result_expired``.
* Jobs belong to their owner (a hash of the API key, or None without keys): :meth:`JobTable.get` and
  :meth:`JobTable.find` never return another owner's job, so another key sees 404.

One lock guards the table. Order: the scheduler's lock may be held when the table's is taken (a job's
terminal listener runs under it), never the reverse.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluxserve.scheduler.jobs import FINISHED, Job, JobError, JobStatus


@dataclass
class StoredResult:
    payload: Any
    size: int
    stored_at: float


@dataclass
class Tombstone:
    """What is left of a job that left the table: enough to answer a poll, nothing private."""

    owner: str | None
    summary: dict[str, Any]
    result_expired: bool = False


class JobTable:
    def __init__(self, *, max_jobs: int, ttl: float, results_max_bytes: int, max_stored_per_owner: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.results_max_bytes = results_max_bytes
        self.max_stored_per_owner = max_stored_per_owner
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._labels: dict[tuple[str | None, str], str] = {}
        """(owner, request_id) → id of the live job with that label."""
        self._results: OrderedDict[str, StoredResult] = OrderedDict()
        self._result_bytes = 0
        self._tombstones: OrderedDict[str, Tombstone] = OrderedDict()

    # --- jobs ------------------------------------------------------------------------------------
    def add(self, job: Job, *, keep_result: bool = False) -> None:
        """Register a new job. 409 when the owner already has a live job with the same ``request_id``;
        429 when the table is full of live jobs."""
        with self._lock:
            label = (job.owner, job.request_id) if job.request_id is not None else None
            if label is not None and label in self._labels:
                raise JobError(f"request_id {job.request_id!r} is already in use by a queued or running job",
                               code="duplicate_request_id", status=409)
            if len(self._jobs) >= self.max_jobs:
                self._evict_results_locked(need_slots=1)
                if len(self._jobs) >= self.max_jobs:
                    raise JobError(f"the server already holds {self.max_jobs} jobs (FLUX_MAX_JOBS); retry later",
                                   code="queue_full", status=429, retry_after=1.0)
            self._jobs[job.id] = job
            if label is not None:
                self._labels[label] = job.id
            job.metadata["keep_result"] = keep_result
        # Outside the lock: a job that is already terminal calls nothing back (add_listener says so).
        if not job.add_listener(lambda event: self._on_event(job, event)):
            self._ended(job)

    def discard(self, job: Job) -> None:
        """Forget a job that was never queued (the scheduler refused it)."""
        with self._lock:
            self._drop_locked(job, tombstone=False)

    def get(self, job_id: str, owner: str | None) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def find(self, request_id: str, owner: str | None) -> Job | None:
        """The owner's live job labelled ``request_id`` (the earlier web page cancels by it)."""
        with self._lock:
            job_id = self._labels.get((owner, request_id))
            job = self._jobs.get(job_id) if job_id is not None else None
        return job if job is not None and job.owner == owner else None

    def tombstone(self, job_id: str, owner: str | None) -> Tombstone | None:
        with self._lock:
            stone = self._tombstones.get(job_id)
        return stone if stone is not None and stone.owner == owner else None

    def live_count(self, owner: str | None) -> int:
        with self._lock:
            return sum(1 for job in self._jobs.values() if job.owner == owner and not job.finished)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _on_event(self, job: Job, event: dict[str, Any]) -> None:
        if event["type"] in {status.value for status in FINISHED}:
            self._ended(job)

    def _ended(self, job: Job) -> None:
        with self._lock:
            if job.request_id is not None and self._labels.get((job.owner, job.request_id)) == job.id:
                del self._labels[(job.owner, job.request_id)]
            if not (job.metadata.get("keep_result") and job.status is JobStatus.SUCCEEDED):
                self._drop_locked(job, tombstone=True)

    def _drop_locked(self, job: Job, *, tombstone: bool, result_expired: bool = False) -> None:
        if self._jobs.get(job.id) is not job:
            return
        del self._jobs[job.id]
        if job.request_id is not None and self._labels.get((job.owner, job.request_id)) == job.id:
            del self._labels[(job.owner, job.request_id)]
        stored = self._results.pop(job.id, None)
        if stored is not None:
            self._result_bytes -= stored.size
        if tombstone:
            self._tombstones[job.id] = Tombstone(job.owner, job.summary(), result_expired)
            while len(self._tombstones) > self.max_jobs:
                self._tombstones.popitem(last=False)

    # --- results ---------------------------------------------------------------------------------
    def store_result(self, job: Job, payload: Any, size: int) -> bool:
        """Keep an async job's encoded result for polling; evicts older results to stay within budget.
        False when the result alone is over the budget (it expires at once)."""
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return False
            if size > self.results_max_bytes:
                self._drop_locked(job, tombstone=True, result_expired=True)
                return False
            self._results[job.id] = StoredResult(payload, size, self._clock())
            self._result_bytes += size
            self._evict_results_locked(owner=job.owner)
            return job.id in self._results

    def result(self, job: Job) -> StoredResult | None:
        with self._lock:
            return self._results.get(job.id)

    def result_failed(self, job: Job, error: JobError) -> None:
        """Encoding an async job's result failed: it ends as a failed job, not a job 'running' forever."""
        with self._lock:
            if self._jobs.get(job.id) is job:
                self._drop_locked(job, tombstone=True)
                stone = self._tombstones[job.id]
                stone.summary["status"] = JobStatus.FAILED.value
                stone.summary["error"] = {"message": error.message, "code": error.code}

    @property
    def result_bytes(self) -> int:
        with self._lock:
            return self._result_bytes

    def _evict_results_locked(self, *, owner: str | None = None, need_slots: int = 0) -> None:
        def over() -> bool:
            return self._result_bytes > self.results_max_bytes or len(self._jobs) + need_slots > self.max_jobs

        while self._results and over():
            oldest = next(iter(self._results))
            self._drop_locked(self._jobs[oldest], tombstone=True, result_expired=True)
        if owner is not None and self.max_stored_per_owner > 0:
            mine = [jid for jid in self._results if self._jobs[jid].owner == owner]
            for jid in mine[:max(0, len(mine) - self.max_stored_per_owner)]:
                self._drop_locked(self._jobs[jid], tombstone=True, result_expired=True)

    # --- housekeeping ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Expire results older than the TTL and forget finished jobs nobody can poll any more."""
        now = self._clock()
        with self._lock:
            for job in list(self._jobs.values()):
                stored = self._results.get(job.id)
                if stored is not None and now - stored.stored_at > self.ttl:
                    self._drop_locked(job, tombstone=True, result_expired=True)
                elif (stored is None and job.status in FINISHED and job.finished_at is not None
                      and now - job.finished_at > self.ttl):
                    self._drop_locked(job, tombstone=True)  # an async result that never arrived
