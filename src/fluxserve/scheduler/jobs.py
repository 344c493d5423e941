"""Jobs: one request's journey through the queue, with status, progress events and cancellation."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fluxserve.engine.registry import ModelSpec
from fluxserve.generation import GenerationParams, ImageResult


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


class JobError(Exception):
    """Why a job did not produce images; ``code`` and ``status`` map to the HTTP error."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after


def queue_full(message: str, retry_after: float) -> JobError:
    return JobError(message, code="queue_full", status=429, retry_after=retry_after)


def new_job_id() -> str:
    return "img_" + uuid.uuid4().hex


Listener = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    """A generation request in the scheduler. Thread-safe for the fields workers touch."""

    spec: ModelSpec
    params: GenerationParams
    prompt: str
    seeds: list[int]
    negative_prompt: str | None = None
    id: str = field(default_factory=new_job_id)
    want_previews: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    """Opaque data the caller wants back with the result (e.g. output format)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    status: JobStatus = JobStatus.QUEUED
    queue_position: int | None = None
    step: int = 0
    total_steps: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    batch_size: int | None = None
    cancel_step: int | None = None
    """The denoising step the job had reached when cancellation was asked for."""
    device: str | None = None
    result: ImageResult | None = None
    error: JobError | None = None
    payload: Any = None
    """What the serving layer made of the result (encoded images), kept for async job polling."""
    images: list[np.ndarray] = field(default_factory=list)
    """Edits: the input images (``uint8`` H×W×3), handed to the engine as ``ImageRequest.images``."""
    mask: np.ndarray | None = None
    """Inpainting: ``uint8`` H×W, 255 = may change (``ImageRequest.mask``)."""
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _listeners: list[Listener] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def queue_wait(self) -> float:
        end = self.started_at if self.started_at is not None else time.monotonic()
        return end - self.enqueued_at

    def request_cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancel_step = self.step
        self._cancel.set()

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("id", self.id)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def finish(self, status: JobStatus, *, result: ImageResult | None = None, error: JobError | None = None) -> bool:
        """Move to a final state once; returns False if the job had already finished."""
        with self._lock:
            if self.status in FINISHED:
                return False
            self.status = status
            self.result = result
            self.error = error
            self.finished_at = time.monotonic()
            self.queue_position = None
            self.images, self.mask = [], None  # finished jobs stay listed for FLUX_JOB_TTL: not their inputs
        event: dict[str, Any] = {"type": status.value, "step": self.step}
        if self.cancel_step is not None:
            event["cancel_step"] = self.cancel_step
        if error is not None:
            event.update(code=error.code, message=error.message, status=error.status)
        self.emit(event)
        self._done.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def summary(self) -> dict[str, Any]:
        """Status for GET /v1/images/jobs/{id} (without the images)."""
        data: dict[str, Any] = {
            "id": self.id, "object": "image.job", "status": self.status.value, "created": self.created,
            "model": self.spec.key, "queue_position": self.queue_position,
            "progress": {"step": self.step, "total": self.total_steps or self.params.steps},
            "batch_size": self.batch_size, "cancel_step": self.cancel_step,
        }
        if self.error is not None:
            data["error"] = {"message": self.error.message, "code": self.error.code}
        return data
