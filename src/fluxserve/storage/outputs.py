"""Saving images under FLUX_OUTPUT_DIR: atomic writes, collision-free generated names, JSON sidecars."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any


class OutputStore:
    """Writes files only inside ``root``; names are generated here, never taken from requests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _new_stem(self, prefix: str = "img") -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return f"{prefix}-{stamp}-{secrets.token_hex(6)}"

    def _atomic_write(self, target: Path, data: bytes) -> None:
        """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
        target = target.resolve()
        if self.root not in target.parents:
            raise ValueError("refusing to write outside the output directory")
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

    def save_image(self, data: bytes, ext: str, metadata: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
        """Save image bytes (and optionally a JSON sidecar); returns their paths."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        stem = self._new_stem()
        image_path = self.root / day / f"{stem}.{ext}"
        self._atomic_write(image_path, data)
        meta_path = None
        if metadata is not None:
            meta_path = image_path.with_suffix(".json")
            payload = dict(metadata, image=image_path.name)
            self._atomic_write(meta_path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
        return image_path, meta_path

    def cleanup_temporaries(self) -> int:
        """Remove temp files a crash left behind (never complete images). Returns how many."""
        removed = 0
        if self.root.is_dir():
            for tmp in self.root.rglob(".tmp-*"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed


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
