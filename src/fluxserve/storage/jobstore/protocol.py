"""The job store: what the scheduler keeps of each async job so that it outlives the process.

One small protocol, :class:`JobStore`, with two implementations: :mod:`.sqlite` (the embedded default,
one file, one server process) and :mod:`.postgres` (several processes or ingress replicas share it).
``tests/storage/test_jobstore_contract.py`` runs the same contract against both.

A job's state changes only through the store's transitions, each one transaction::

    create ──▶ queued ──▶ running ──▶ succeeded | failed | cancelled
                 ▲    └──────────────▶ failed | cancelled | expired
                 └── running (its process died; attempts left) ── else ──▶ failed (interrupted)

* Terminal transitions happen exactly once: of a cancel and a completion that race, the first commits
  and the other returns False. Each transition appends the job's event (``queued``, ``started``,
  ``requeued``, then the terminal one) and, for a job with a ``webhook_url``, its terminal transition
  puts the webhook in the outbox in the same transaction.
* A running job is claimed by one worker (a process) under a lease that its heartbeats renew
  (:meth:`JobStore.renew_leases`); :meth:`JobStore.recover` re-queues running jobs whose lease ran out
  (same seeds, so the same images), or fails them with code ``interrupted`` once they have started
  ``max_attempts`` times.
* What is stored: id, owner (a hash of the API key, never the key), model, state and timestamps, the
  request as JSON *without image pixels* (refused above :data:`MAX_REQUEST_BYTES`), seeds, timings,
  the error, references to the result objects (the images live in a result store), the attempt count
  and the job's recent events (progress coalesced to the latest one) for replaying a stream.
* Budgets: finished results expire ``ttl`` seconds after the job ended, or earlier by the rule of
  :mod:`fluxserve.storage.budgets`: an owner over ``results_max_bytes_per_owner`` bytes or
  ``max_stored_per_owner`` results loses its own oldest; when all results together pass
  ``results_max_bytes``, the owner furthest over its budget loses its oldest; when no owner is over its
  budget, the new result is refused and its job ends ``failed`` with code ``results_store_full``
  (:data:`RESULTS_STORE_FULL`). An owner within its budget thus loses results only to the TTL. A job's
  record (status, no images) is forgotten ``2 × ttl`` after it ended. Expired and refused results are
  queued for deletion (:meth:`JobStore.take_garbage`), so a crash between the decision and the deletion
  leaks nothing.

Times are wall-clock seconds since the epoch (several hosts share a PostgreSQL store). This module
imports neither torch nor a database driver.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

SCHEMA_VERSION = 1
"""Version of the tables; a store written by another version is refused, never silently reset."""
STORE_APPLICATION = "fluxserve-jobs"
"""What the schema table names as its owner: a database holding other tables is not taken over."""

MAX_REQUEST_BYTES = 64 * 1024
"""Largest request JSON kept per job: requests are stored without image pixels."""
MAX_EVENT_BYTES = 4 * 1024
"""Largest event JSON kept (previews and images never go into the event log)."""
MAX_EVENTS_PER_JOB = 64
"""Events kept per job (progress events replace each other, so a job needs a handful)."""
RESULTS_STORE_FULL = "results_store_full"
"""Error code of a job that succeeded but whose result the results budget refused: keeping it would have
expired results of owners within their budgets (the in-memory job table answers the same)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    """Waited in the queue past its timeout."""


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
LIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})

WEBHOOK_EVENT_TYPES = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.EXPIRED: "job.failed",  # a queue timeout is a failure to the client (status says "expired")
    JobState.CANCELLED: "job.cancelled",
}


# --- errors -----------------------------------------------------------------------------------------
class JobStoreError(RuntimeError):
    """Base of the job store's errors; messages name the store but never a password."""


class JobStoreUnavailable(JobStoreError):
    """The database cannot be reached now (the HTTP layer answers 503 ``job_store_unavailable``).
    Operations work again once it is back."""


class JobStoreRefused(JobStoreError):
    """The store exists but fluxserve will not use it: a corrupted file, another program's database,
    another schema version, or another process holding an SQLite store. The message says which."""


class DuplicateRequestId(JobStoreError):
    """The owner already has a queued or running job with this ``request_id`` (HTTP 409)."""


# --- records ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultRef:
    """One stored result object (an encoded image) in the result store."""

    key: str
    media_type: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "media_type": self.media_type, "size": self.size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRef:
        return cls(str(data["key"]), str(data["media_type"]), int(data["size"]))


@dataclass(frozen=True)
class JobFailure:
    code: str
    message: str


@dataclass(frozen=True)
class WebhookStatus:
    """How a job's webhook is doing: ``state`` is pending, delivered or failed (given up)."""

    attempts: int
    last_status: int | None
    state: str


@dataclass(frozen=True)
class NewJob:
    """What :meth:`JobStore.create` needs; the store adds the state, times and order."""

    id: str
    owner: str | None
    model: str
    request: dict[str, Any]
    """The request without image pixels (prompt, size, steps, output options...)."""
    seeds: Sequence[int]
    request_id: str | None = None
    webhook_url: str | None = None
    """Already validated (:func:`fluxserve.webhooks.urls.validate_webhook_url`)."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    seq: int
    """Submission order: queued jobs run in increasing ``seq``."""
    owner: str | None
    model: str
    state: JobState
    request: dict[str, Any]
    seeds: tuple[int, ...]
    request_id: str | None
    webhook_url: str | None
    attempts: int
    """How many times the job has started."""
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    """The worker (process) that runs or last ran it."""
    lease_until: float | None
    cancel_requested: bool
    timings: dict[str, float]
    error: JobFailure | None
    results: tuple[ResultRef, ...]
    result_meta: dict[str, Any] | None
    """The response document without the images (seeds, timings, parameters...)."""
    result_bytes: int
    result_expired: bool
    webhook: WebhookStatus | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def public(self) -> dict[str, Any]:
        """The job as its owner (and its webhook) sees it: no owner, no result keys, no worker."""
        data: dict[str, Any] = {
            "id": self.id, "object": "image.job", "status": self.state.value, "created": int(self.created_at),
            "model": self.model, "attempts": self.attempts, "seeds": list(self.seeds),
        }
        if self.request_id is not None:
            data["request_id"] = self.request_id
        if self.started_at is not None:
            data["started_at"] = round(self.started_at, 3)
        if self.finished_at is not None:
            data["finished_at"] = round(self.finished_at, 3)
        if self.timings:
            data["timings"] = dict(self.timings)
        if self.error is not None:
            data["error"] = {"message": self.error.message, "code": self.error.code}
        if self.state is JobState.SUCCEEDED:
            data["images"] = len(self.results)
            data["result_expired"] = self.result_expired
            if self.result_meta is not None:
                data["result"] = self.result_meta
        if self.webhook is not None:
            data["webhook"] = {"attempts": self.webhook.attempts, "last_status": self.webhook.last_status,
                               "state": self.webhook.state}
        return data


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    """Increases per job; a reconnecting client asks for the events after the last one it saw."""
    type: str
    data: dict[str, Any]
    at: float


@dataclass(frozen=True)
class Recovery:
    """What :meth:`JobStore.recover` did with running jobs whose process died."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WebhookDelivery:
    """One outbox entry: the same ``id`` (``webhook-id``) and ``payload`` on every attempt."""

    id: str
    job_id: str
    url: str
    event_type: str
    payload: bytes
    attempts: int
    """Attempts made before this one."""
    created_at: float


@dataclass(frozen=True)
class StoreLimits:
    """The budgets and retry bounds a store enforces (from FLUX_JOB_TTL, FLUX_RESULTS_MAX_BYTES,
    FLUX_RESULTS_MAX_BYTES_PER_KEY, FLUX_MAX_STORED_PER_KEY, FLUX_JOB_MAX_ATTEMPTS and FLUX_JOB_LEASE)."""

    ttl: float = 3600.0
    results_max_bytes: int = 512 * 1024 * 1024
    results_max_bytes_per_owner: int = 0
    """Bytes of results one owner may keep (0: no fixed cap; its budget is then a fair share of
    ``results_max_bytes``), by the rule of :mod:`fluxserve.storage.budgets`."""
    max_stored_per_owner: int = 0
    max_attempts: int = 3
    lease: float = 60.0


# --- the protocol -----------------------------------------------------------------------------------
class JobStore(Protocol):
    """What the scheduler needs of durable jobs. Every method is thread-safe and may raise
    :class:`JobStoreUnavailable` (the database is unreachable); none blocks for longer than the
    store's timeout."""

    limits: StoreLimits

    # jobs
    def create(self, job: NewJob) -> JobRecord:
        """Add a queued job at the end of the queue; appends its ``queued`` event.
        Raises :class:`DuplicateRequestId`, or ValueError for a request over :data:`MAX_REQUEST_BYTES`."""
        ...

    def load(self, job_id: str) -> JobRecord | None:
        """The job whoever owns it (for the scheduler; routes use :meth:`get`)."""
        ...

    def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        """The job if ``owner`` owns it; another owner's job is None, as if it did not exist."""
        ...

    def find(self, request_id: str, *, owner: str | None) -> JobRecord | None:
        """The owner's queued or running job labelled ``request_id``."""
        ...

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs in submission order (what a process resumes at start-up)."""
        ...

    def claim_next(self, worker: str, *, models: Iterable[str] | None = None) -> JobRecord | None:
        """Atomically take the oldest queued job (of ``models``, if given) and mark it running for
        ``worker``; None when nothing waits. Two workers never get the same job."""
        ...

    def mark_running(self, job_id: str, worker: str) -> JobRecord | None:
        """queued → running for a job this process already holds; None when it is no longer queued
        (cancelled meanwhile, or another worker took it)."""
        ...

    def renew_leases(self, worker: str) -> set[str]:
        """Extend the leases of ``worker``'s running jobs; returns those whose cancellation was asked
        for (through any process)."""
        ...

    def mark_succeeded(self, job_id: str, *, results: Sequence[ResultRef], result_meta: dict[str, Any] | None = None,
                       timings: dict[str, float] | None = None, worker: str | None = None) -> bool:
        """running → succeeded with the stored results; the results budget applies at once (see the module
        doc): a result larger than a cap alone expires at once (``result_expired``), and one the budget
        refuses ends the job ``failed`` with code :data:`RESULTS_STORE_FULL` instead (the transition still
        happened: True). False when the job was already terminal, or ``worker`` no longer holds it."""
        ...

    def mark_failed(self, job_id: str, *, code: str, message: str, timings: dict[str, float] | None = None,
                    worker: str | None = None, state: JobState = JobState.FAILED) -> bool:
        """queued | running → failed (or ``expired``); False when it was already terminal."""
        ...

    def mark_cancelled(self, job_id: str, *, message: str = "the job was cancelled",
                       worker: str | None = None) -> bool:
        """queued | running → cancelled; False when it was already terminal."""
        ...

    def request_cancel(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        """Cancel on behalf of ``owner``: a queued job is cancelled at once, a running one is flagged
        for its worker (see :meth:`renew_leases`). None when the owner has no such job."""
        ...

    def recover(self) -> Recovery:
        """Running jobs whose lease ran out: back to the queue in their original order (same seeds), or
        ``failed`` with code ``interrupted`` after ``max_attempts`` starts."""
        ...

    # events
    def append_event(self, job_id: str, event: dict[str, Any], *, coalesce: bool = False) -> int | None:
        """Add a non-terminal event (``type`` plus JSON data, no pixels); with ``coalesce`` it replaces
        the job's earlier events of the same type. None when the job is finished or unknown."""
        ...

    def events(self, job_id: str, *, after: int = 0) -> list[StoredEvent]:
        """The job's stored events with ``seq`` greater than ``after``, oldest first."""
        ...

    # budgets
    def sweep(self) -> None:
        """Expire results past their TTL or the byte budgets, forget old records."""
        ...

    def result_bytes(self) -> int:
        """Bytes of the results kept now (counted against ``results_max_bytes``)."""
        ...

    def take_garbage(self, limit: int = 100) -> list[str]:
        """Ids of jobs whose result objects must be deleted from the result store."""
        ...

    def garbage_collected(self, job_ids: Iterable[str]) -> None:
        """The result objects of these jobs are gone."""
        ...

    # webhooks
    def due_deliveries(self, worker: str, *, limit: int, hold: float) -> list[WebhookDelivery]:
        """Take pending webhook deliveries that are due, holding them for ``hold`` seconds (another
        process takes them up after that if this one dies)."""
        ...

    def delivery_attempted(self, delivery_id: str, *, status: int | None, error: str | None,
                           delivered: bool, retry_at: float | None) -> None:
        """Record an attempt: delivered, to retry at ``retry_at``, or given up (neither)."""
        ...

    def next_delivery_at(self) -> float | None:
        """When the earliest pending delivery is due (None: nothing pending)."""
        ...

    def close(self) -> None:
        ...


# --- helpers shared by the implementations ------------------------------------------------------------
def new_worker_id() -> str:
    """This process's worker name: host, pid and a random part (pids repeat across containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def new_delivery_id() -> str:
    """A webhook message id (``webhook-id``), stable across the delivery's attempts."""
    return "msg_" + secrets.token_hex(16)


def dump_json(value: Any, *, limit: int, what: str) -> str:
    """Compact JSON of ``value``; ValueError naming ``what`` when it is over ``limit`` bytes or holds
    bytes (pixels must never reach the store)."""
    try:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON without image data ({exc})") from None
    if len(text.encode()) > limit:
        raise ValueError(f"{what} takes {len(text.encode())} bytes as JSON, over the {limit} a job may store "
                         "(image data is never stored with a job)")
    return text


_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id[:64]!r} is not a job id (letters, digits, _ and -)")
    return job_id
