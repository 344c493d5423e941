"""The embedded job store: one SQLite file (stdlib ``sqlite3``), for one server process.

* WAL journal with ``synchronous=FULL``: a job acknowledged to a client survives a crash of the
  process and a power cut.
* One process at a time: the store takes an exclusive lock on ``<file>.lock`` and a second process is
  refused with the reason (share jobs between processes with the PostgreSQL store). Because of that
  lock, running jobs found at opening belong to a process that is gone: their leases end at once, so
  :meth:`recover` re-queues them without waiting.
* Threads share one connection under a lock; every transaction is ``BEGIN IMMEDIATE``.
* A file that is not an SQLite database, fails SQLite's ``quick_check``, belongs to another program or
  has another schema version is refused with the reason, never reset: moving it away is the
  operator's decision.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fluxserve.storage.jobstore.protocol import JobStoreError, JobStoreRefused, JobStoreUnavailable, StoreLimits
from fluxserve.storage.jobstore.sql import JOB_COLUMNS_DDL, SqlJobStore, Tx, UniqueViolation

APPLICATION_ID = 0x666C7578
"""``PRAGMA application_id`` of fluxserve's job stores ('flux'): `file` and SQLite tools can tell them."""
DEFAULT_FILE = "jobs.sqlite3"
_UNAVAILABLE = ("locked", "busy", "disk", "i/o", "full", "readonly", "unable to open")
"""Words of SQLite's errors that mean "not now" (disk full, I/O error, locked), not a bug in a statement."""


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())


class SqliteJobStore(SqlJobStore):
    def __init__(self, path: Path, limits: StoreLimits, *, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(limits, clock=clock)
        self.path = Path(path).expanduser().resolve()
        self.description = f"the SQLite job store {self.path}"
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 1. One process per store: the lock lives as long as this object (the kernel drops it if we die).
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise JobStoreRefused(f"{self.description} is in use by another process (pid {holder}); an SQLite store "
                                  "serves one server process: share jobs between processes with "
                                  "FLUX_JOB_STORE=postgresql://...") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        # 2. Open, check, create or validate the schema.
        try:
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._release_lock()
            raise JobStoreUnavailable(f"{self.description} cannot be opened: {exc}") from None
        try:
            self._check_file()
            self._prepare_schema()  # refuses a foreign or other-version store before anything below changes it
            self._configure()
            # 3. Nobody else holds the store, so jobs still marked running lost their process: their leases end now.
            with self._tx() as tx:
                tx.execute("UPDATE jobs SET lease_until = NULL WHERE state = 'running'")
        except BaseException:
            self.close()
            raise

    def _check_file(self) -> None:
        try:
            application = self._conn.execute("PRAGMA application_id").fetchone()[0]
            if application not in (0, APPLICATION_ID):
                raise JobStoreRefused(f"{self.description} is another program's SQLite database (application id "
                                      f"{application:#x}); fluxserve does not take it over")
            check = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise JobStoreRefused(f"{self.description} is corrupted (SQLite quick_check: {'; '.join(check[:3])}); "
                                      "fluxserve never resets a job store: restore it from a backup or move it away")
        except sqlite3.DatabaseError as exc:
            raise JobStoreRefused(f"{self.description} is not a usable SQLite database ({exc}); fluxserve never "
                                  "resets a job store: restore it from a backup or move it away") from None

    def _configure(self) -> None:
        """Write-ahead logging and full syncs, on a store that passed every check."""
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JobStoreRefused(f"{self.description} cannot use write-ahead logging (journal mode {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            if self._conn.execute("PRAGMA application_id").fetchone()[0] == 0:
                self._conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        except sqlite3.DatabaseError as exc:
            raise JobStoreUnavailable(f"{self.description} cannot be configured: {exc}") from None

    def _jobs_table_ddl(self) -> str:
        return f"CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,{JOB_COLUMNS_DDL})"

    def _existing_tables(self, tx: Tx) -> set[str]:
        rows = tx.fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        return {row[0] for row in rows}

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise JobStoreUnavailable(f"{self.description} cannot be written: {exc}") from None
            try:
                yield _SqliteTx(self._conn)
                self._conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
                    raise UniqueViolation(str(exc)) from None
                if isinstance(exc, sqlite3.OperationalError) and any(
                        word in str(exc).lower() for word in _UNAVAILABLE):
                    raise JobStoreUnavailable(f"{self.description} failed: {exc}") from None
                if isinstance(exc, sqlite3.DatabaseError):
                    raise JobStoreError(f"{self.description} failed: {exc}") from None
                raise

    def _release_lock(self) -> None:
        if not self._lock_file.closed:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()

    def close(self) -> None:
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
            self._release_lock()
