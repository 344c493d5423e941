"""The result store: where finished async jobs' encoded images live, apart from the job store.

One small protocol, :class:`ResultStore`, with a local-directory store (the default, under
FLUX_STATE_DIR) and an S3-compatible object store (:mod:`.s3`). Objects are named
``<job id>/<name>``: deleting a job's results deletes everything under its id, including what an
interrupted attempt left behind. The job store keeps the :class:`ResultRef` of each object and decides
when results expire; the result store only holds bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fluxserve.storage.jobstore.protocol import ResultRef, check_job_id

__all__ = ["ResultMissing", "ResultRef", "ResultStore", "ResultStoreUnavailable", "result_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ResultMissing(LookupError):
    """No object under that key (expired, deleted, or never stored)."""


class ResultStoreUnavailable(RuntimeError):
    """The store cannot be reached or written now; the message says why, without credentials."""


def result_key(job_id: str, name: str) -> str:
    """``<job id>/<name>``, both checked: no path or key a request could steer elsewhere."""
    check_job_id(job_id)
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"result name {name[:64]!r} must be letters, digits, '.', '_' or '-'")
    return f"{job_id}/{name}"


def split_key(key: str) -> tuple[str, str]:
    job_id, sep, name = key.partition("/")
    if not sep:
        raise ValueError(f"{key[:64]!r} is not a result key")
    result_key(job_id, name)
    return job_id, name


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float
    """Seconds since the epoch."""


@runtime_checkable
class ObjectListing(Protocol):
    """What an object store adds for the ``url`` files of synchronous requests: listing and deleting them, so
    that their budgets (FLUX_FILE_TTL, FLUX_FILES_MAX_BYTES, FLUX_FILES_MAX_BYTES_PER_KEY) hold across processes."""

    def objects(self, job_id: str) -> list[StoredObject]: ...

    def delete(self, keys: list[str]) -> None: ...


class ResultStore(Protocol):
    """Bytes of finished jobs' images. Thread-safe; may raise :class:`ResultStoreUnavailable`."""

    def put(self, job_id: str, name: str, data: bytes, media_type: str) -> ResultRef:
        """Store one object (replacing one of the same key) and return its reference."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises :class:`ResultMissing`."""
        ...

    def url(self, key: str, *, expires_in: int | None = None) -> str | None:
        """A presigned URL that fetches the object without credentials for ``expires_in`` seconds
        (default: the store's expiry), or None when the store has no URLs of its own (the server
        serves the object itself)."""
        ...

    def delete_job(self, job_id: str) -> None:
        """Delete every object of the job (missing ones are no error)."""
        ...

    def problem(self) -> str | None:
        """Why storing would fail now, for /ready (no credentials, no paths), or None."""
        ...
