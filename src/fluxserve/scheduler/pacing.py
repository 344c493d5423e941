"""How long a refused client should wait: the one ``Retry-After`` estimate of every queue."""

from __future__ import annotations

import threading
from collections import deque


class Pacing:
    """Recent job durations → seconds until ``waiting`` jobs ahead have drained through ``slots``."""

    def __init__(self, keep: int = 50) -> None:
        self._durations: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._durations.append(seconds)

    def retry_after(self, waiting: int, slots: int) -> float:
        with self._lock:
            recent = list(self._durations)[-20:]
        per_job = sum(recent) / len(recent) if recent else 1.0
        return max(1.0, round(per_job * max(1, waiting) / max(1, slots), 1))
