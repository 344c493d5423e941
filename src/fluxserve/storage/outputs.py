"""Saving images under FLUX_OUTPUT_DIR: atomic writes, collision-free generated names, JSON sidecars,
a byte quota (FLUX_OUTPUT_MAX_BYTES) and the checks /ready reports (a directory that cannot be written
makes the server not ready; a full one is a warning).

When a save would take the directory past the quota, the save is refused with
:class:`OutputQuotaExceeded` (older images are never deleted behind the operator's back); the caller
still has the image and answers it with a ``save_error``. Clients are told codes, never paths:
:func:`save_error_code` turns any failure into one, and :meth:`OutputStore.relative` gives the name to
show (relative to the output directory).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 * 1024 * 1024
"""Below this much free disk space the output directory counts as full."""
RESCAN_SECONDS = 30.0
"""How long the byte count of the directory is trusted before it is counted again (files removed by
the operator free quota within this time)."""


class OutputError(OSError):
    """A save refused on purpose; ``code`` is what clients see."""

    code = "output_error"


class OutputQuotaExceeded(OutputError):
    code = "output_dir_full"


def save_error_code(exc: BaseException) -> str:
    """The code a client is told for a failed save: never the path, nor whether a directory exists."""
    if isinstance(exc, OutputError):
        return exc.code
    if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return "output_dir_full"
    return "output_dir_unwritable"


class OutputStore:
    """Writes files only inside ``root``; names are generated here, never taken from requests.

    ``max_bytes`` (0: no cap) bounds what the files under ``root`` may take together."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None
        self._counted_at = 0.0

    # --- quota -----------------------------------------------------------------------------------
    def used_bytes(self, *, recount: bool = False) -> int:
        """Bytes the files under the output directory take (counted, then kept up to date by saves)."""
        with self._lock:
            now = time.monotonic()
            if recount or self._used is None or now - self._counted_at > RESCAN_SECONDS:
                self._used = _tree_bytes(self.root)
                self._counted_at = now
            return self._used

    def _reserve(self, size: int) -> None:
        if not self.max_bytes:
            return
        if self.used_bytes() + size > self.max_bytes and self.used_bytes(recount=True) + size > self.max_bytes:
            raise OutputQuotaExceeded(f"the output directory holds {self._used} bytes; saving {size} more would "
                                      f"pass FLUX_OUTPUT_MAX_BYTES={self.max_bytes}")

    def _count(self, size: int) -> None:
        with self._lock:
            if self._used is not None:
                self._used += size

    def problem(self) -> str | None:
        """Why saving cannot work, for /ready (no paths), or None: the directory cannot be created or
        written to (a misconfiguration)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            log.warning("output directory %s is not writable: %s", self.root, exc)
            return "output directory is not writable (FLUX_OUTPUT_DIR)"
        return None

    def space_warning(self) -> str | None:
        """Why saves are refused for now, for /ready's warnings (no paths), or None: the disk is (almost)
        full or FLUX_OUTPUT_MAX_BYTES is reached. Generation goes on (its saves answer ``save_error``), so
        this is a warning, not a reason to take the server out of a load balancer."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return None  # no directory yet (created on the first save) or none at all: problem() says so
        if free < MIN_FREE_BYTES:
            return f"output directory is full: less than {MIN_FREE_BYTES // 2**20} MiB free on its disk"
        if self.max_bytes and self.used_bytes() >= self.max_bytes:
            return f"output directory is full: FLUX_OUTPUT_MAX_BYTES={self.max_bytes} reached"
        return None

    def relative(self, path: Path) -> str:
        """The name clients see for a saved file: relative to the output directory."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def _atomic_write(self, target: Path, data: bytes) -> None:
        target = target.resolve()
        if self.root not in target.parents:
            raise ValueError("refusing to write outside the output directory")
        write_atomically(target, data)

    def save_image(self, data: bytes, ext: str, metadata: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
        """Save image bytes (and optionally a JSON sidecar); returns their (absolute) paths.

        Raises :class:`OutputQuotaExceeded` when FLUX_OUTPUT_MAX_BYTES would be passed, OSError when the
        disk refuses (see :func:`save_error_code`)."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        image_path = self.root / day / f"{new_stem()}.{ext}"
        sidecar = None if metadata is None else sidecar_json(metadata, image_path.name)
        self._reserve(len(data) + len(sidecar or b""))
        self._atomic_write(image_path, data)
        self._count(len(data))
        meta_path = None
        if sidecar is not None:
            meta_path = image_path.with_suffix(".json")
            self._atomic_write(meta_path, sidecar)
            self._count(len(sidecar))
        log.info("image saved", extra={"ctx": {"path": str(image_path), "bytes": len(data)}})
        return image_path, meta_path

    def cleanup_temporaries(self) -> int:
        """Remove temp files a crash left behind (never complete images). Returns how many."""
        removed = 0
        if self.root.is_dir():
            for tmp in self.root.rglob(".tmp-*"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed


def new_stem(prefix: str = "img") -> str:
    """A saved image's file name without its extension: ``img-<UTC date>-<UTC time>-<random>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(6)}"


def sidecar_json(metadata: dict[str, Any], image_name: str) -> bytes:
    """The JSON sidecar saved beside an image: its metadata and the image's file name."""
    return json.dumps(dict(metadata, image=image_name), indent=2, sort_keys=True, default=str).encode()


def write_atomically(target: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file,
    and the file survives a power cut once the call returns."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)  # the rename itself survives a power cut once the directory is synced


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks are not followed; missing root: 0)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                stat = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += stat.st_size
    return total


def _fsync_dir(path: Path) -> None:
    """fsync a directory where the platform allows it (POSIX); elsewhere a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
