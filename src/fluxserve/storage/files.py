"""Short-lived downloadable files for ``response_format=url``: unguessable ids, TTL, memory-bounded in all
and per API key (``FLUX_FILES_MAX_BYTES``, ``FLUX_FILES_MAX_BYTES_PER_KEY``; the rule is in
:mod:`fluxserve.storage.budgets`)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fluxserve.storage.budgets import OwnerBudget, StoreFull

_FILE_ID = re.compile(r"^file_[A-Za-z0-9_-]{22,64}$")


@dataclass
class StoredFile:
    data: bytes
    media_type: str
    ext: str
    expires_at: float
    owner: str | None = None
    """The API key (hash) whose request made the file; another key cannot download it."""


class FileRegistry:
    """Files served at /v1/images/files/{id}.{ext}; only ids issued here resolve."""

    def __init__(self, ttl: float, max_bytes: int = 512 * 1024 * 1024, max_bytes_per_owner: int = 0) -> None:
        self.ttl = ttl
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._budget = OwnerBudget(max_bytes, max_bytes_per_owner)
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        return self._budget.max_bytes

    def used_bytes(self, owner: str | None = None) -> int:
        """Bytes the files of ``owner`` take now."""
        with self._lock:
            return self._budget.used.get(owner, 0)

    def put(self, data: bytes, media_type: str, ext: str, owner: str | None = None) -> str:
        """Keep a file for ``owner``; older files go by the budget rule. :class:`StoreFull` when it cannot be
        kept without taking files from a key within its budget (or when it is larger than a budget)."""
        size = len(data)
        if not self._budget.fits_alone(size):
            raise StoreFull(f"an image of {size} bytes is larger than the url file budget (FLUX_FILES_MAX_BYTES"
                            f"={self._budget.max_bytes}, FLUX_FILES_MAX_BYTES_PER_KEY="
                            f"{self._budget.max_bytes_per_owner})", code="file_store_full")
        file_id = "file_" + secrets.token_urlsafe(24)
        with self._lock:
            self._evict(time.monotonic())
            self._files[file_id] = StoredFile(data, media_type, ext, time.monotonic() + self.ttl, owner)
            self._budget.add(owner, size)
            while self._budget.owner_over(owner):  # its own oldest first; the new file fits alone
                self._drop(self._oldest_of(owner))
            while self._budget.total > self._budget.max_bytes:
                found, victim = self._budget.global_victim()
                oldest = self._oldest_of(victim) if found else file_id
                if oldest == file_id:  # nobody else is over budget: refuse rather than take another key's file
                    self._drop(file_id)
                    raise StoreFull("the url file store is full of other keys' files, each within its budget "
                                    "(FLUX_FILES_MAX_BYTES); retry later or ask for b64_json",
                                    code="file_store_full")
                self._drop(oldest)
        return file_id

    def get(self, name: str, owner: str | None = None) -> StoredFile | None:
        """Look up ``<id>.<ext>`` (or a bare id). Anything not issued here, or issued to another owner, is None."""
        file_id, _, ext = name.partition(".")
        if not _FILE_ID.match(file_id):
            return None
        with self._lock:
            self._evict(time.monotonic())
            stored = self._files.get(file_id)
        if stored is None or (ext and ext != stored.ext) or stored.owner != owner:
            return None
        return stored

    def _oldest_of(self, owner: str | None) -> str:
        return next(file_id for file_id, stored in self._files.items() if stored.owner == owner)

    def _drop(self, file_id: str) -> None:
        stored = self._files.pop(file_id)
        self._budget.remove(stored.owner, len(stored.data))

    def _evict(self, now: float) -> None:
        for file_id in [k for k, v in self._files.items() if v.expires_at <= now]:
            self._drop(file_id)
