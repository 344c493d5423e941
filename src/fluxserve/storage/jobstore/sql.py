"""The job store's logic in portable SQL, shared by the SQLite and PostgreSQL stores.

A subclass supplies a transaction (:meth:`SqlJobStore._tx`) and its dialect: the DDL lines that differ,
and the row lock a claim takes (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serializes writers
with ``BEGIN IMMEDIATE`` instead). Statements are written with ``?`` placeholders. JSON is kept as
text in both databases, times as epoch seconds, flags as 0/1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from fluxserve.storage.budgets import OwnerBudget, plan_expiry
from fluxserve.storage.jobstore.protocol import (
    LIVE_STATES,
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_JOB,
    MAX_REQUEST_BYTES,
    RESULTS_STORE_FULL,
    SCHEMA_VERSION,
    STORE_APPLICATION,
    TERMINAL_STATES,
    WEBHOOK_EVENT_TYPES,
    DuplicateRequestId,
    JobFailure,
    JobRecord,
    JobState,
    JobStoreError,
    JobStoreRefused,
    NewJob,
    Recovery,
    ResultRef,
    StoredEvent,
    StoreLimits,
    WebhookDelivery,
    WebhookStatus,
    check_job_id,
    dump_json,
    new_delivery_id,
)


class Tx(Protocol):
    """One open transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        ...


class UniqueViolation(JobStoreError):
    """A dialect raises this (out of its transaction, rolled back) for a unique constraint conflict."""


TABLES = ("schema_info", "jobs", "job_events", "webhook_deliveries", "result_garbage")

_COMMON_DDL = [
    """CREATE TABLE schema_info (
        application TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX jobs_queue ON jobs (state, seq)",
    "CREATE INDEX jobs_finished ON jobs (state, finished_at)",
    "CREATE INDEX jobs_worker ON jobs (worker, state)",
    # One live job per (owner, request_id); owner may be NULL (no API keys), hence the COALESCE.
    """CREATE UNIQUE INDEX jobs_live_label ON jobs ((COALESCE(owner, '')), request_id)
        WHERE request_id IS NOT NULL AND state IN ('queued', 'running')""",
    """CREATE TABLE job_events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, seq))""",
    """CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        claimed_by TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX webhook_due ON webhook_deliveries (state, next_attempt_at)",
    "CREATE INDEX webhook_job ON webhook_deliveries (job_id)",
    """CREATE TABLE result_garbage (
        job_id TEXT PRIMARY KEY,
        queued_at DOUBLE PRECISION NOT NULL)""",
]

JOB_COLUMNS_DDL = """
        owner TEXT,
        model TEXT NOT NULL,
        state TEXT NOT NULL,
        request TEXT NOT NULL,
        seeds TEXT NOT NULL,
        request_id TEXT,
        webhook_url TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        worker TEXT,
        lease_until DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        timings TEXT NOT NULL DEFAULT '{}',
        error_code TEXT,
        error_message TEXT,
        results TEXT NOT NULL DEFAULT '[]',
        result_meta TEXT,
        result_bytes BIGINT NOT NULL DEFAULT 0,
        result_expired INTEGER NOT NULL DEFAULT 0,
        event_count INTEGER NOT NULL DEFAULT 0"""

_SELECT_JOB = """SELECT j.id, j.seq, j.owner, j.model, j.state, j.request, j.seeds, j.request_id, j.webhook_url,
    j.attempts, j.created_at, j.updated_at, j.started_at, j.finished_at, j.worker, j.lease_until,
    j.cancel_requested, j.timings, j.error_code, j.error_message, j.results, j.result_meta, j.result_bytes,
    j.result_expired, d.attempts, d.last_status, d.state
    FROM jobs j LEFT JOIN webhook_deliveries d ON d.job_id = j.id"""

_LIVE = "('queued', 'running')"
_STORE_FULL_MESSAGE = ("the stored-results budget is full of other keys' results, each within its budget "
                       "(FLUX_RESULTS_MAX_BYTES, FLUX_RESULTS_MAX_BYTES_PER_KEY); retry later")
_TERMINAL = "(" + ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES)) + ")"


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _record(row: tuple[Any, ...]) -> JobRecord:
    (job_id, seq, owner, model, state, request, seeds, request_id, webhook_url, attempts, created_at, updated_at,
     started_at, finished_at, worker, lease_until, cancel_requested, timings, error_code, error_message, results,
     result_meta, result_bytes, result_expired, hook_attempts, hook_status, hook_state) = row
    return JobRecord(
        id=job_id, seq=int(seq), owner=owner, model=model, state=JobState(state), request=json.loads(request),
        seeds=tuple(int(s) for s in json.loads(seeds)), request_id=request_id, webhook_url=webhook_url,
        attempts=int(attempts), created_at=float(created_at), updated_at=float(updated_at),
        started_at=None if started_at is None else float(started_at),
        finished_at=None if finished_at is None else float(finished_at), worker=worker,
        lease_until=None if lease_until is None else float(lease_until), cancel_requested=bool(cancel_requested),
        timings=json.loads(timings), error=JobFailure(error_code, error_message or "") if error_code else None,
        results=tuple(ResultRef.from_json(ref) for ref in json.loads(results)),
        result_meta=None if result_meta is None else json.loads(result_meta), result_bytes=int(result_bytes),
        result_expired=bool(result_expired),
        webhook=None if hook_state is None else WebhookStatus(int(hook_attempts), hook_status, hook_state),
    )


def webhook_timestamp(at: float) -> str:
    """ISO 8601 in UTC with microseconds, as the Standard Webhooks payload's ``timestamp``."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


class SqlJobStore:
    """:class:`~fluxserve.storage.jobstore.protocol.JobStore` over a SQL database (see the module doc)."""

    lock_clause = ""
    """Appended to the SELECT that picks rows to claim."""
    description = "job store"
    """How messages name this store (no password)."""

    def __init__(self, limits: StoreLimits, *, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._clock = clock

    # --- for subclasses ----------------------------------------------------------------------------
    def _tx(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def _jobs_table_ddl(self) -> str:
        raise NotImplementedError

    def _existing_tables(self, tx: Tx) -> set[str]:
        raise NotImplementedError

    def _prepare_schema(self) -> None:
        """Create the tables in an empty database; refuse a foreign or other-version one."""
        with self._tx() as tx:
            self._lock_schema(tx)
            existing = self._existing_tables(tx)
            if "schema_info" in existing:
                rows = tx.fetchall("SELECT application, version FROM schema_info")
                if len(rows) != 1 or rows[0][0] != STORE_APPLICATION:
                    raise JobStoreRefused(f"{self.description} belongs to another program (its schema_info table "
                                          f"does not name {STORE_APPLICATION}); fluxserve does not take it over")
                version = int(rows[0][1])
                if version != SCHEMA_VERSION:
                    newer = "a newer" if version > SCHEMA_VERSION else "an older"
                    raise JobStoreRefused(f"{self.description} has schema version {version}, written by {newer} "
                                          f"fluxserve; this one reads version {SCHEMA_VERSION}. Run the fluxserve that "
                                          "wrote it, or point the store elsewhere")
                missing = [name for name in TABLES if name not in existing]
                if missing:
                    raise JobStoreRefused(f"{self.description} is damaged: tables {missing} are missing")
                return
            if existing:
                raise JobStoreRefused(f"{self.description} already holds other tables ({', '.join(sorted(existing))}) "
                                      "and no fluxserve schema; fluxserve does not take it over")
            tx.execute(self._jobs_table_ddl())
            for statement in _COMMON_DDL:
                tx.execute(statement)
            tx.execute("INSERT INTO schema_info (application, version, created_at) VALUES (?, ?, ?)",
                       (STORE_APPLICATION, SCHEMA_VERSION, self._clock()))

    def _lock_schema(self, tx: Tx) -> None:
        """Keep concurrent start-ups from creating the tables twice (PostgreSQL takes a lock)."""

    def _lock_budgets(self, tx: Tx) -> None:
        """Serialize the transactions that apply the results budget (completions and sweeps), so that two
        processes finishing jobs at once each see the other's results (SQLite's writers are serialized
        already; PostgreSQL takes a lock). Taken first in those transactions, before any row lock."""

    # --- jobs ----------------------------------------------------------------------------------------
    def create(self, job: NewJob) -> JobRecord:
        check_job_id(job.id)
        request = dump_json(job.request, limit=MAX_REQUEST_BYTES, what="the job's request")
        seeds = json.dumps([int(seed) for seed in job.seeds])
        now = self._clock()
        try:
            with self._tx() as tx:
                tx.execute("""INSERT INTO jobs (id, owner, model, state, request, seeds, request_id, webhook_url,
                              created_at, updated_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)""",
                           (job.id, job.owner, job.model, request, seeds, job.request_id, job.webhook_url, now, now))
                self._append_event(tx, job.id, "queued", {}, now)
                record = self._select(tx, job.id)
        except UniqueViolation:
            if job.request_id is not None:
                raise DuplicateRequestId(f"request_id {job.request_id!r} is already in use by a queued or running "
                                         "job") from None
            raise JobStoreError(f"job {job.id} already exists") from None
        assert record is not None
        return record

    def load(self, job_id: str) -> JobRecord | None:
        with self._tx() as tx:
            return self._select(tx, job_id)

    def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        record = self.load(job_id)
        return record if record is not None and record.owner == owner else None

    def find(self, request_id: str, *, owner: str | None) -> JobRecord | None:
        with self._tx() as tx:
            rows = tx.fetchall(f"{_SELECT_JOB} WHERE COALESCE(j.owner, '') = ? AND j.request_id = ? "
                               f"AND j.state IN {_LIVE}", (owner or "", request_id))
        return _record(rows[0]) if rows else None

    def unfinished(self) -> list[JobRecord]:
        with self._tx() as tx:
            rows = tx.fetchall(f"{_SELECT_JOB} WHERE j.state IN {_LIVE} ORDER BY j.seq")
        return [_record(row) for row in rows]

    def claim_next(self, worker: str, *, models: Iterable[str] | None = None) -> JobRecord | None:
        wanted = sorted(set(models)) if models is not None else None
        if wanted == []:
            return None
        where, params = "state = 'queued'", []
        if wanted is not None:
            where += f" AND model IN ({_marks(len(wanted))})"
            params = wanted
        with self._tx() as tx:
            rows = tx.fetchall(f"SELECT id FROM jobs WHERE {where} ORDER BY seq LIMIT 1 {self.lock_clause}", params)
            if not rows:
                return None
            return self._start(tx, rows[0][0], worker, self._clock())

    def mark_running(self, job_id: str, worker: str) -> JobRecord | None:
        with self._tx() as tx:
            return self._start(tx, job_id, worker, self._clock())

    def _start(self, tx: Tx, job_id: str, worker: str, now: float) -> JobRecord | None:
        changed = tx.execute("""UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, attempts = attempts + 1,
                                started_at = ?, updated_at = ? WHERE id = ? AND state = 'queued'""",
                             (worker, now + self.limits.lease, now, now, job_id))
        if not changed:
            return None
        record = self._select(tx, job_id)
        assert record is not None
        self._append_event(tx, job_id, "started", {"attempt": record.attempts}, now)
        return record

    def renew_leases(self, worker: str) -> set[str]:
        now = self._clock()
        with self._tx() as tx:
            tx.execute("UPDATE jobs SET lease_until = ? WHERE worker = ? AND state = 'running'",
                       (now + self.limits.lease, worker))
            rows = tx.fetchall("SELECT id FROM jobs WHERE worker = ? AND state = 'running' AND cancel_requested = 1",
                               (worker,))
        return {row[0] for row in rows}

    def mark_succeeded(self, job_id: str, *, results: Sequence[ResultRef], result_meta: dict[str, Any] | None = None,
                       timings: dict[str, float] | None = None, worker: str | None = None) -> bool:
        refs = json.dumps([ref.to_json() for ref in results])
        meta = None if result_meta is None else dump_json(result_meta, limit=MAX_REQUEST_BYTES, what="result_meta")
        with self._tx() as tx:
            self._lock_budgets(tx)
            return self._finish(tx, job_id, JobState.SUCCEEDED, from_states=(JobState.RUNNING,), worker=worker,
                                timings=timings, results=(refs, meta, sum(ref.size for ref in results)))

    def mark_failed(self, job_id: str, *, code: str, message: str, timings: dict[str, float] | None = None,
                    worker: str | None = None, state: JobState = JobState.FAILED) -> bool:
        if state not in (JobState.FAILED, JobState.EXPIRED):
            raise ValueError(f"mark_failed ends a job failed or expired, not {state.value}")
        from_states = (JobState.QUEUED,) if state is JobState.EXPIRED else (JobState.QUEUED, JobState.RUNNING)
        with self._tx() as tx:
            return self._finish(tx, job_id, state, from_states=from_states, worker=worker, timings=timings,
                                error=JobFailure(code, message))

    def mark_cancelled(self, job_id: str, *, message: str = "the job was cancelled",
                       worker: str | None = None) -> bool:
        with self._tx() as tx:
            return self._finish(tx, job_id, JobState.CANCELLED, from_states=(JobState.QUEUED, JobState.RUNNING),
                                worker=worker, error=JobFailure("cancelled", message))

    def request_cancel(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        with self._tx() as tx:
            record = self._select(tx, job_id)
            if record is None or record.owner != owner:
                return None
            if record.state is JobState.QUEUED:
                self._finish(tx, job_id, JobState.CANCELLED, from_states=(JobState.QUEUED,),
                             error=JobFailure("cancelled", "the job was cancelled"))
            elif record.state is JobState.RUNNING:
                tx.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND state = 'running'",
                           (self._clock(), job_id))
            else:
                return record
            return self._select(tx, job_id)

    def recover(self) -> Recovery:
        now = self._clock()
        requeued: list[str] = []
        failed: list[str] = []
        with self._tx() as tx:
            rows = tx.fetchall("SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running' "
                               f"AND (lease_until IS NULL OR lease_until < ?) ORDER BY seq {self.lock_clause}", (now,))
            for job_id, attempts, cancel_requested in rows:
                if cancel_requested:
                    self._finish(tx, job_id, JobState.CANCELLED, from_states=(JobState.RUNNING,),
                                 error=JobFailure("cancelled", "the job was cancelled"))
                    failed.append(job_id)
                elif int(attempts) >= self.limits.max_attempts:
                    self._finish(tx, job_id, JobState.FAILED, from_states=(JobState.RUNNING,),
                                 error=JobFailure("interrupted", f"the server stopped while running this job, "
                                                  f"{attempts} time(s); it is not tried again"))
                    failed.append(job_id)
                else:
                    tx.execute("""UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL,
                                  started_at = NULL, updated_at = ? WHERE id = ? AND state = 'running'""",
                               (now, job_id))
                    self._append_event(tx, job_id, "requeued", {"reason": "interrupted", "attempts": int(attempts)},
                                       now)
                    requeued.append(job_id)
        return Recovery(requeued=requeued, failed=failed)

    def _finish(self, tx: Tx, job_id: str, to: JobState, *, from_states: Sequence[JobState], worker: str | None = None,
                timings: dict[str, float] | None = None, error: JobFailure | None = None,
                results: tuple[str, str | None, int] | None = None) -> bool:
        """The one terminal transition: exactly once, with its event, its webhook and the budgets."""
        now = self._clock()
        sets = ["state = ?", "finished_at = ?", "updated_at = ?", "lease_until = NULL"]
        params: list[Any] = [to.value, now, now]
        if error is not None:
            sets += ["error_code = ?", "error_message = ?"]
            params += [error.code, error.message[:1000]]
        if timings is not None:
            sets.append("timings = ?")
            params.append(dump_json({k: float(v) for k, v in timings.items()}, limit=MAX_EVENT_BYTES, what="timings"))
        if results is not None:
            sets += ["results = ?", "result_meta = ?", "result_bytes = ?"]
            params += list(results)
        where = f"id = ? AND state IN ({_marks(len(from_states))})"
        params += [job_id, *(state.value for state in from_states)]
        if worker is not None:
            where += " AND worker = ?"
            params.append(worker)
        if not tx.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", params):
            return False
        if to is JobState.SUCCEEDED and not self._keep_result(tx, job_id, now):
            to, error = JobState.FAILED, JobFailure(RESULTS_STORE_FULL, _STORE_FULL_MESSAGE)
            tx.execute("""UPDATE jobs SET state = ?, error_code = ?, error_message = ?, results = '[]',
                          result_meta = NULL, result_bytes = 0 WHERE id = ?""",
                       (to.value, error.code, error.message, job_id))
            self._garbage(tx, [job_id], now)
        event: dict[str, Any] = {}
        if error is not None:
            event = {"code": error.code, "message": error.message[:1000]}
        self._append_event(tx, job_id, to.value, event, now, terminal=True)
        record = self._select(tx, job_id)
        assert record is not None
        if record.webhook_url is not None:
            event_type = WEBHOOK_EVENT_TYPES[to]
            payload = json.dumps({"type": event_type, "timestamp": webhook_timestamp(now), "data": record.public()},
                                 separators=(",", ":"))
            tx.execute("""INSERT INTO webhook_deliveries (id, job_id, url, event_type, payload, state, attempts,
                          next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)""",
                       (new_delivery_id(), job_id, record.webhook_url, event_type, payload, now, now, now))
        return True

    def _keep_result(self, tx: Tx, job_id: str, now: float) -> bool:
        """Apply the results budget to a job that just succeeded: False when its result is refused (keeping
        it would expire results of owners within their budgets). A result larger than a cap alone is kept
        as expired (its job stays succeeded; polling it answers ``result_expired``)."""
        size = int(tx.fetchall("SELECT result_bytes FROM jobs WHERE id = ?", (job_id,))[0][0])
        if not OwnerBudget(self.limits.results_max_bytes, self.limits.results_max_bytes_per_owner).fits_alone(size):
            self._expire_results(tx, [job_id], now)
            self._enforce_budgets(tx, now)
            return True
        return not self._enforce_budgets(tx, now, new=job_id)

    # --- events --------------------------------------------------------------------------------------
    def append_event(self, job_id: str, event: dict[str, Any], *, coalesce: bool = False) -> int | None:
        kind = str(event.get("type", ""))
        if not kind or kind in {state.value for state in TERMINAL_STATES}:
            raise ValueError(f"append_event takes non-terminal events with a type, got {kind!r}")
        data = {key: value for key, value in event.items() if key != "type"}
        with self._tx() as tx:
            rows = tx.fetchall("SELECT state FROM jobs WHERE id = ?", (job_id,))
            if not rows or JobState(rows[0][0]) not in LIVE_STATES:
                return None
            return self._append_event(tx, job_id, kind, data, self._clock(), coalesce=coalesce)

    def _append_event(self, tx: Tx, job_id: str, kind: str, data: dict[str, Any], now: float, *,
                      coalesce: bool = False, terminal: bool = False) -> int:
        text = dump_json(data, limit=MAX_EVENT_BYTES, what=f"the {kind} event")
        tx.execute("UPDATE jobs SET event_count = event_count + 1 WHERE id = ?", (job_id,))
        seq = int(tx.fetchall("SELECT event_count FROM jobs WHERE id = ?", (job_id,))[0][0])
        if coalesce:
            tx.execute("DELETE FROM job_events WHERE job_id = ? AND type = ?", (job_id, kind))
        tx.execute("INSERT INTO job_events (job_id, seq, type, data, at) VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, kind, text, now))
        if not terminal:
            tx.execute("DELETE FROM job_events WHERE job_id = ? AND seq <= ?", (job_id, seq - MAX_EVENTS_PER_JOB))
        return seq

    def events(self, job_id: str, *, after: int = 0) -> list[StoredEvent]:
        with self._tx() as tx:
            rows = tx.fetchall("SELECT seq, type, data, at FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq",
                               (job_id, after))
        return [StoredEvent(int(seq), kind, json.loads(data), float(at)) for seq, kind, data, at in rows]

    # --- budgets ---------------------------------------------------------------------------------------
    def sweep(self) -> None:
        now = self._clock()
        with self._tx() as tx:
            self._lock_budgets(tx)
            rows = tx.fetchall("SELECT id FROM jobs WHERE state = 'succeeded' AND result_expired = 0 "
                               "AND finished_at < ?", (now - self.limits.ttl,))
            self._expire_results(tx, [row[0] for row in rows], now)
            self._enforce_budgets(tx, now)
            old = [row[0] for row in tx.fetchall(
                f"""SELECT id FROM jobs WHERE state IN {_TERMINAL} AND finished_at < ? AND NOT EXISTS (
                    SELECT 1 FROM webhook_deliveries d WHERE d.job_id = jobs.id AND d.state = 'pending')""",
                (now - 2 * self.limits.ttl,))]
            for chunk in _chunks(old, 200):
                self._garbage(tx, chunk, now)
                marks = _marks(len(chunk))
                tx.execute(f"DELETE FROM job_events WHERE job_id IN ({marks})", chunk)
                tx.execute(f"DELETE FROM webhook_deliveries WHERE job_id IN ({marks})", chunk)
                tx.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)

    def _enforce_budgets(self, tx: Tx, now: float, *, new: str | None = None) -> bool:
        """Expire results by the rule of :mod:`fluxserve.storage.budgets` (:func:`plan_expiry`, as the in-memory
        job table): an owner over ``results_max_bytes_per_owner`` or ``max_stored_per_owner`` loses its own oldest;
        over ``results_max_bytes``, the owner furthest over its budget loses its oldest. ``new``: the job
        whose result was just stored. True when ``new``'s result is refused (no owner over its budget; the
        caller ends that job): its owner then keeps what it would have given up for it. Without ``new`` (a
        sweep after the caps were lowered) and nobody over a budget, the oldest results go."""
        limits = self.limits
        budget = OwnerBudget(limits.results_max_bytes, limits.results_max_bytes_per_owner)
        # 1. Most of the time every cap holds: one aggregate answers without reading the results one by one.
        owners = tx.fetchall("SELECT owner, COUNT(*), COALESCE(SUM(result_bytes), 0) FROM jobs "
                             "WHERE state = 'succeeded' AND result_expired = 0 GROUP BY owner")
        for owner, _, size in owners:
            budget.add(owner, int(size))
        if budget.total <= limits.results_max_bytes and not any(
                budget.owner_over(owner) or 0 < limits.max_stored_per_owner < int(count) for owner, count, _ in owners):
            return False
        entries = [(job_id, owner, int(size)) for job_id, owner, size in tx.fetchall(
            "SELECT id, owner, result_bytes FROM jobs WHERE state = 'succeeded' AND result_expired = 0 "
            "ORDER BY finished_at, seq")]
        doomed, refused = plan_expiry(entries, limits.results_max_bytes, limits.results_max_bytes_per_owner,
                                      max_count_per_owner=limits.max_stored_per_owner, new=new)
        self._expire_results(tx, doomed, now)
        return refused

    def _expire_results(self, tx: Tx, job_ids: Sequence[str], now: float) -> None:
        for chunk in _chunks(list(job_ids), 200):
            tx.execute(f"""UPDATE jobs SET result_expired = 1, results = '[]', result_bytes = 0, updated_at = ?
                           WHERE id IN ({_marks(len(chunk))})""", [now, *chunk])
            self._garbage(tx, chunk, now)

    def _garbage(self, tx: Tx, job_ids: Sequence[str], now: float) -> None:
        for job_id in job_ids:
            tx.execute("INSERT INTO result_garbage (job_id, queued_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (job_id, now))

    def result_bytes(self) -> int:
        with self._tx() as tx:
            return int(tx.fetchall("SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE state = 'succeeded' "
                                   "AND result_expired = 0")[0][0])

    def take_garbage(self, limit: int = 100) -> list[str]:
        with self._tx() as tx:
            return [row[0] for row in tx.fetchall("SELECT job_id FROM result_garbage ORDER BY queued_at LIMIT ?",
                                                  (limit,))]

    def garbage_collected(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        with self._tx() as tx:
            for chunk in _chunks(ids, 200):
                tx.execute(f"DELETE FROM result_garbage WHERE job_id IN ({_marks(len(chunk))})", chunk)

    # --- webhooks -------------------------------------------------------------------------------------
    def due_deliveries(self, worker: str, *, limit: int, hold: float) -> list[WebhookDelivery]:
        now = self._clock()
        with self._tx() as tx:
            ids = [row[0] for row in tx.fetchall(
                "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ? "
                f"ORDER BY next_attempt_at, created_at LIMIT ? {self.lock_clause}", (now, limit))]
            if not ids:
                return []
            marks = _marks(len(ids))
            tx.execute(f"UPDATE webhook_deliveries SET next_attempt_at = ?, claimed_by = ? "
                       f"WHERE id IN ({marks})", [now + hold, worker, *ids])
            rows = tx.fetchall("SELECT id, job_id, url, event_type, payload, attempts, created_at FROM "
                               f"webhook_deliveries WHERE id IN ({marks}) ORDER BY created_at", ids)
        return [WebhookDelivery(id=row[0], job_id=row[1], url=row[2], event_type=row[3], payload=row[4].encode(),
                                attempts=int(row[5]), created_at=float(row[6])) for row in rows]

    def delivery_attempted(self, delivery_id: str, *, status: int | None, error: str | None,
                           delivered: bool, retry_at: float | None) -> None:
        now = self._clock()
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        with self._tx() as tx:
            tx.execute("""UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = ?, last_error = ?,
                          state = ?, next_attempt_at = ?, claimed_by = NULL, updated_at = ?
                          WHERE id = ? AND state = 'pending'""",
                       (status, None if error is None else error[:500], state,
                        retry_at if retry_at is not None else now, now, delivery_id))

    def next_delivery_at(self) -> float | None:
        with self._tx() as tx:
            value = tx.fetchall("SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'")[0][0]
        return None if value is None else float(value)

    # --- reading ------------------------------------------------------------------------------------------
    def _select(self, tx: Tx, job_id: str) -> JobRecord | None:
        rows = tx.fetchall(f"{_SELECT_JOB} WHERE j.id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def close(self) -> None:
        raise NotImplementedError


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
