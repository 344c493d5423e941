"""The shared job store: PostgreSQL through psycopg 3 and a connection pool (``fluxserve[postgres]``).

Several processes (ingress replicas, model replicas, servers) use one store: a claim picks the oldest
queued job with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two processes never take the same job and
neither waits for the other's lock. The tables live in their own schema (``fluxserve`` unless told
otherwise), created on first use under an advisory lock so that replicas starting together do not race.

Faults: the database unreachable when the store opens raises :class:`JobStoreUnavailable` with the
reason (the server refuses to start). Lost later, every operation raises
:class:`JobStoreUnavailable` after at most ``timeout`` seconds; the pool checks each connection before
handing it out and reconnects in the background (retrying after 1, 2, 4... seconds; after
``max(10, 3 × timeout)`` seconds of failures it starts over on the next operation), so operations work
again within seconds of the database's return.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from fluxserve.settings import redact_dsn
from fluxserve.storage.jobstore.protocol import JobStoreError, JobStoreUnavailable, StoreLimits
from fluxserve.storage.jobstore.sql import JOB_COLUMNS_DDL, SqlJobStore, Tx, UniqueViolation

DEFAULT_SCHEMA = "fluxserve"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _reason(exc: BaseException) -> str:
    """The first line of a driver error (libpq's messages name host and port, never the password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _PostgresTx:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, query: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(query.replace("?", "%s"), tuple(params))
        return self._cursor.rowcount

    def fetchall(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(query.replace("?", "%s"), tuple(params))
        return list(self._cursor.fetchall())


class PostgresJobStore(SqlJobStore):
    lock_clause = "FOR UPDATE SKIP LOCKED"

    def __init__(self, dsn: str, limits: StoreLimits, *, schema: str = DEFAULT_SCHEMA, pool_size: int = 4,
                 timeout: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__(limits, clock=clock)
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema must be a lower-case SQL name (letters, digits, _), got {schema!r}")
        self.schema = schema
        self.timeout = timeout
        self.description = f"the PostgreSQL job store {redact_dsn(dsn)} (schema {schema})"
        connect_args: dict[str, Any] = {"connect_timeout": max(2, round(timeout)), "application_name": "fluxserve",
                                        "options": f"-c search_path={schema}"}
        # 1. A clear reason when the database is not there at all (the pool would only time out).
        try:
            psycopg.connect(dsn, **connect_args).close()
        except psycopg.Error as exc:
            raise JobStoreUnavailable(f"cannot reach {self.description}: {_reason(exc)}") from None
        # 2. The pool: each connection is checked before use, lost ones are replaced in the background.
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, kwargs=connect_args, open=False, timeout=timeout,
            check=ConnectionPool.check_connection, reconnect_timeout=max(10.0, 3 * timeout), name="fluxserve-jobs")
        try:
            self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            self._pool.close()
            raise JobStoreUnavailable(f"cannot reach {self.description} within {timeout} s") from None
        try:
            self._prepare_schema()
        except BaseException:
            self._pool.close()
            raise

    def _lock_schema(self, tx: Tx) -> None:
        tx.fetchall("SELECT pg_advisory_xact_lock(hashtext(?))", (f"fluxserve-jobs:{self.schema}",))
        tx.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")  # a checked name (see _SCHEMA_NAME)

    def _lock_budgets(self, tx: Tx) -> None:
        tx.fetchall("SELECT pg_advisory_xact_lock(hashtext(?))", (f"fluxserve-jobs-budgets:{self.schema}",))

    def _jobs_table_ddl(self) -> str:
        return ("CREATE TABLE jobs (seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, id TEXT PRIMARY KEY,"
                f"{JOB_COLUMNS_DDL})")

    def _existing_tables(self, tx: Tx) -> set[str]:
        rows = tx.fetchall("SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (self.schema,))
        return {row[0] for row in rows}

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        try:
            with self._pool.connection(timeout=self.timeout) as conn, conn.cursor() as cursor:
                yield _PostgresTx(cursor)
        except PoolTimeout:
            raise JobStoreUnavailable(f"{self.description} is unreachable (no connection within {self.timeout} s)"
                                      ) from None
        except psycopg.errors.UniqueViolation as exc:
            raise UniqueViolation(_reason(exc)) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise JobStoreUnavailable(f"{self.description} is unreachable: {_reason(exc)}") from None
        except psycopg.Error as exc:
            raise JobStoreError(f"{self.description} failed: {_reason(exc)}") from None

    def close(self) -> None:
        self._pool.close(timeout=self.timeout)
