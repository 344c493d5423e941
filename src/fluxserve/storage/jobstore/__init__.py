"""Durable async jobs: the :class:`JobStore` protocol and its SQLite and PostgreSQL stores.

:func:`open_job_store` picks the store FLUX_JOB_STORE names. The PostgreSQL store needs the
``postgres`` extra (psycopg 3 and its pool); the SQLite store needs nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fluxserve.storage.jobstore.protocol import (
    DuplicateRequestId,
    JobRecord,
    JobState,
    JobStore,
    JobStoreError,
    JobStoreRefused,
    JobStoreUnavailable,
    NewJob,
    ResultRef,
    StoreLimits,
)

if TYPE_CHECKING:
    from fluxserve.config import StorageConfig

__all__ = ["DuplicateRequestId", "JobRecord", "JobState", "JobStore", "JobStoreConfig", "JobStoreError",
           "JobStoreRefused", "JobStoreUnavailable", "NewJob", "ResultRef", "StoreLimits", "open_job_store"]


@dataclass(frozen=True)
class JobStoreConfig:
    """The settings a job store needs (FLUX_JOB_STORE and its neighbours), and nothing else."""

    url: str = "sqlite"
    """``sqlite``, ``sqlite:///absolute/path`` or ``postgresql://...``."""
    state_dir: Path = Path(".")
    limits: StoreLimits = field(default_factory=StoreLimits)
    timeout: float = 5.0
    pool_size: int = 4
    schema: str = "fluxserve"
    """PostgreSQL only: the schema of the tables."""

    @classmethod
    def from_settings(cls, settings: StorageConfig) -> JobStoreConfig:
        return cls(url=settings.job_store, state_dir=settings.state_dir, timeout=settings.job_store_timeout,
                   pool_size=settings.job_store_pool_size, schema=settings.job_store_schema,
                   limits=StoreLimits(ttl=settings.job_ttl, results_max_bytes=settings.results_max_bytes,
                                      results_max_bytes_per_owner=settings.results_max_bytes_per_key,
                                      max_stored_per_owner=settings.max_stored_per_key,
                                      max_attempts=settings.job_max_attempts, lease=settings.job_lease))

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))


def open_job_store(config: JobStoreConfig) -> JobStore:
    """Open (and on first use create) the store. Raises :class:`JobStoreUnavailable` when its database
    cannot be reached and :class:`JobStoreRefused` when it holds something fluxserve must not touch;
    both messages say why, for the operator."""
    if config.is_postgres:
        try:
            from fluxserve.storage.jobstore.postgres import PostgresJobStore
        except ImportError:
            raise JobStoreError("FLUX_JOB_STORE=postgresql://... needs psycopg 3 and its pool: "
                                "pip install 'fluxserve[postgres]'") from None
        return PostgresJobStore(config.url, config.limits, schema=config.schema, pool_size=config.pool_size,
                                timeout=config.timeout)
    from fluxserve.storage.jobstore.sqlite import DEFAULT_FILE, SqliteJobStore

    path = config.state_dir / DEFAULT_FILE if config.url == "sqlite" else Path(config.url.removeprefix("sqlite://"))
    return SqliteJobStore(path, config.limits, timeout=config.timeout)
