"""Short-lived downloadable files for ``response_format=url``: unguessable ids, TTL, memory-bounded."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

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

    def __init__(self, ttl: float, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, ext: str, owner: str | None = None) -> str:
        file_id = "file_" + secrets.token_urlsafe(24)
        with self._lock:
            self._evict(time.monotonic())
            self._files[file_id] = StoredFile(data, media_type, ext, time.monotonic() + self.ttl, owner)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._bytes -= len(old.data)
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

    def _evict(self, now: float) -> None:
        expired = [k for k, v in self._files.items() if v.expires_at <= now]
        for key in expired:
            self._bytes -= len(self._files.pop(key).data)
