"""The job table: every job the server remembers, each with a budget.

* Live jobs (queued, running) are bounded by the queue and the slots in front of the table.
* A job that ends without a stored result (every synchronous or streamed request, and async jobs that
  failed or were cancelled) leaves the table at once; a small status record (its summary, no prompt,
  no pixels) stays among the last ``max_jobs`` tombstones so a poll still learns how it ended.
* Finished async jobs keep their encoded images for polling, within ``results_max_bytes`` in all,
  ``results_max_bytes_per_owner`` and ``max_stored_per_owner`` per owner and ``ttl`` seconds. An owner over
  its own caps loses its own oldest result; over the global cap, the owner furthest over its budget does
  (the rule of :mod:`fluxserve.storage.budgets`), so one key's results never expire another's early. An
  expired result answers 410 ``result_expired``; a result refused because every other key is within its
  budget ends its job failed with ``results_store_full``.
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
from fluxserve.storage.budgets import OwnerBudget, plan_expiry


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
                 results_max_bytes_per_owner: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.results_max_bytes = results_max_bytes
        self.max_stored_per_owner = max_stored_per_owner
        self._budget = OwnerBudget(results_max_bytes, results_max_bytes_per_owner)
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._labels: dict[tuple[str | None, str], str] = {}
        """(owner, request_id) → id of the live job with that label."""
        self._results: OrderedDict[str, StoredResult] = OrderedDict()
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
            self._budget.remove(job.owner, stored.size)
        if tombstone:
            self._tombstones[job.id] = Tombstone(job.owner, job.summary(), result_expired)
            while len(self._tombstones) > self.max_jobs:
                self._tombstones.popitem(last=False)

    # --- results ---------------------------------------------------------------------------------
    def store_result(self, job: Job, payload: Any, size: int) -> bool:
        """Keep an async job's encoded result for polling; evicts older results to stay within budget.
        False when the result alone is over a budget (it expires at once) or when keeping it would take
        results of keys within their budgets (the job then ends failed, ``results_store_full``)."""
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return False
            if not self._budget.fits_alone(size):
                self._drop_locked(job, tombstone=True, result_expired=True)
                return False
            self._results[job.id] = StoredResult(payload, size, self._clock())
            self._budget.add(job.owner, size)
            self._evict_results_locked(owner=job.owner, new=job.id)
            if job.id in self._results:
                return True
            stone = self._tombstones.get(job.id)
            if stone is not None and stone.summary.get("status") == JobStatus.SUCCEEDED.value \
                    and not stone.result_expired:  # refused by rule 4, not expired: say so
                stone.summary["status"] = JobStatus.FAILED.value
                stone.summary["error"] = {"message": "the stored-results budget is full of other keys' results, each "
                                                     "within its budget (FLUX_RESULTS_MAX_BYTES); retry later",
                                          "code": "results_store_full"}
            return False

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
            return self._budget.total

    def _evict_results_locked(self, *, owner: str | None = None, new: str | None = None,
                              need_slots: int = 0) -> None:
        """Expire results by the rule of :mod:`fluxserve.storage.budgets`. ``new``: the id of ``owner``'s
        result just stored; that owner, when over its own caps, loses its own oldest. Over the byte cap, the
        owner furthest over its budget loses its oldest; with none over, ``new`` is refused (dropped without
        expiring anyone else's). Short of job slots, the owner holding the most results loses its oldest."""
        if new is not None:
            plan = self._plan_for(new, owner)
            if plan is None:  # refused: nobody else pays, nor the owner's older results
                self._drop_locked(self._jobs[new], tombstone=True)
                return
            for jid in plan:
                self._expire_locked(jid)
        while self._results and self._budget.total > self.results_max_bytes:  # cannot happen after a plan
            found, victim = self._budget.global_victim()
            if not found:
                break
            self._expire_locked(self._oldest_result_of(victim))
        while self._results and len(self._jobs) + need_slots > self.max_jobs:
            counts: dict[str | None, int] = {}
            for jid in self._results:
                counts[self._jobs[jid].owner] = counts.get(self._jobs[jid].owner, 0) + 1
            self._expire_locked(self._oldest_result_of(max(counts, key=lambda holder: counts[holder])))

    def _plan_for(self, new: str, owner: str | None) -> list[str] | None:
        """The results to expire so that ``owner``'s just-stored result ``new`` fits, by the rule of
        :mod:`fluxserve.storage.budgets`, or None when it is refused (rule 4: nobody over its budget and the total
        still over the cap). Worked out before anything expires, so a refused result costs nothing that was kept.
        Anonymous results (no API key) have no count cap here."""
        entries = [(jid, self._jobs[jid].owner, stored.size) for jid, stored in self._results.items()]
        doomed, refused = plan_expiry(entries, self.results_max_bytes, self._budget.max_bytes_per_owner,
                                      max_count_per_owner=self.max_stored_per_owner,
                                      count_capped=lambda holder: holder is not None, new=new)
        return None if refused else doomed

    def _oldest_result_of(self, owner: str | None) -> str:
        return next(jid for jid in self._results if self._jobs[jid].owner == owner)

    def _expire_locked(self, job_id: str) -> None:
        self._drop_locked(self._jobs[job_id], tombstone=True, result_expired=True)

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
