"""Jobs: one request's journey through the queue, as one state machine with one subscription.

A job's state changes only through :meth:`Job.transition`, under the job's lock::

    queued ──▶ running ──▶ succeeded | failed | cancelled
       └────▶ cancelled | failed | expired

An illegal edge (``running → queued``, ``queued → succeeded``...) raises :class:`IllegalTransition`.
A job that is already terminal ignores every later transition (``transition`` returns False): a
cancel and a completion may race, exactly one of them wins. The terminal transition sets the done
flag *before* any listener runs, and a subscriber that arrives after the end is answered at once, so
no waiter can miss the end.

Events are ordered and total. Each event (``queued``, ``started``, ``progress``, the terminal one) is
put in the job's outbox under the job's lock, in the same step as the state change it reports, so the
outbox holds them in state order. One thread at a time delivers the outbox, in that order, to the
listeners registered when each event happened; a thread that finds another one delivering leaves its
event to it. So two threads emitting at once (a slot's progress and a drain's cancel) cannot reorder
what a listener sees, nothing follows the terminal event, and no lock is held while listeners run (a
listener may read the job or emit on it). A listener that raises is logged and skipped: it cannot
change the job's fate, nor stop the other listeners.

Threads (scheduler workers) and asyncio (routes) meet in one place: :meth:`Job.subscribe` returns a
:class:`Subscription`, an async iterator of the job's events that ends with its terminal event, and
:meth:`Job.done` awaits the end. Listeners must not block and must not call back into the scheduler.

This module imports neither torch nor the engine.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from fluxserve.generation import GenerationParams, ImageRequest, ImageResult
from fluxserve.models.spec import ModelSpec
from fluxserve.storage.jobstore.protocol import JobState

log = logging.getLogger(__name__)

JobStatus = JobState
"""A job's state: the one enum the scheduler, the routes and the job store share (queued, running, succeeded,
failed, cancelled, expired)."""


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
"""The terminal states."""

TERMINAL_EVENTS = frozenset(status.value for status in FINISHED)

_EDGES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.EXPIRED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
}


class IllegalTransition(RuntimeError):
    """A state change the job's state machine does not allow (a bug in the caller)."""


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


def cancelled_error(why: str) -> JobError:
    """A job someone cancelled. 409 ``cancelled`` reaches a synchronous client still waiting for it."""
    return JobError(f"the job was {why}", code="cancelled", status=409)


def new_job_id() -> str:
    """Server-issued and unguessable (128 random bits): a job id is a capability to read and cancel."""
    return "img_" + secrets.token_hex(16)


Listener = Callable[[dict[str, Any]], None]

SUBSCRIPTION_BUFFER = 64
"""Events a slow subscriber may fall behind by; older progress events are dropped, never the end."""


@dataclass(eq=False)
class Job:
    """A generation request in the scheduler. State changes are thread-safe (see the module doc)."""

    spec: ModelSpec
    params: GenerationParams
    prompt: str
    seeds: list[int]
    negative_prompt: str | None = None
    id: str = field(default_factory=new_job_id)
    request_id: str | None = None
    """The client's own label (``request_id`` / ``X-Request-ID``); cancels by it are matched per owner."""
    owner: str | None = None
    """Who created the job (a hash of the API key), or None without keys. Other owners cannot see it."""
    partial_images: int = 0
    """Partial images the engine makes for a streaming client (0–3; see ``ImageRequest.partial_images``)."""
    images: list[Any] = field(default_factory=list)
    """Input images for edits (NumPy ``uint8`` H×W×3)."""
    mask: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    """Opaque data the caller wants back with the result (e.g. output format)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
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
    _status: JobStatus = JobStatus.QUEUED
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _listeners: list[Listener] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _final_event: dict[str, Any] | None = None
    _outbox: deque[tuple[dict[str, Any], list[Listener]]] = field(default_factory=deque)
    """Events not delivered yet, each with the listeners registered when it happened (see the module doc)."""
    _delivering: bool = False
    _delivered: threading.Event = field(default_factory=threading.Event)
    """Set once the terminal event has reached every listener it was for."""

    # --- state -------------------------------------------------------------------------------------
    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def batchable(self) -> bool:
        """Jobs with input images batch only when the batching key carries a digest of those inputs
        (``GenerationParams.inputs``): then every job of the batch edits the same pixels."""
        return not self.images or self.params.inputs is not None

    @property
    def batch_key(self) -> tuple[str, GenerationParams]:
        return self.spec.key, self.params

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def queue_wait(self) -> float:
        end = self.started_at if self.started_at is not None else time.monotonic()
        return end - self.enqueued_at

    def request_cancel(self) -> None:
        """Ask a running job to stop at its next denoising step (the engine polls this flag)."""
        with self._lock:
            if not self._cancel.is_set():
                self.cancel_step = self.step
                self._cancel.set()

    def transition(self, to: JobStatus, *, result: ImageResult | None = None, error: JobError | None = None,
                   **changes: Any) -> bool:
        """Move to ``to``. False when the job was already terminal (a lost race); raises
        :class:`IllegalTransition` for an edge the state machine does not have. ``changes`` are fields set
        together with the state (``batch_size``, ``device``...). Listeners run outside the lock, in event order."""
        with self._lock:
            current = self._status
            if current in FINISHED:
                return False
            if to not in _EDGES[current]:
                raise IllegalTransition(f"job {self.id}: {current.value} → {to.value}")
            for name, value in changes.items():
                if not hasattr(self, name) or name.startswith("_"):
                    raise AttributeError(name)
                setattr(self, name, value)
            self._status = to
            now = time.monotonic()
            if to is JobStatus.RUNNING:
                self.started_at = now
                self.queue_position = 0
                event: dict[str, Any] = {"type": "started", "batch_size": self.batch_size, "device": self.device}
            else:
                self.result = result
                self.error = error
                self.finished_at = now
                self.queue_position = None
                self.images, self.mask = [], None  # a finished job keeps no input pixels
                event = {"type": to.value, "step": self.step}
                if self.cancel_step is not None:
                    event["cancel_step"] = self.cancel_step
                if error is not None:
                    event.update(code=error.code, message=error.message, status=error.status)
                event["id"] = self.id
                self._final_event = event
                self._done.set()  # before any listener runs: a waiter that looks now sees the end
            event.setdefault("id", self.id)
            self._outbox.append((event, list(self._listeners)))
            if to in FINISHED:
                self._listeners.clear()  # nothing outlives the end
        self._deliver()
        return True

    def emit(self, event: dict[str, Any]) -> None:
        """Send a non-terminal event (queued position, progress) to the listeners."""
        event.setdefault("id", self.id)
        with self._lock:
            if self._status in FINISHED:
                return
            self._outbox.append((event, list(self._listeners)))
        self._deliver()

    def _deliver(self) -> None:
        """Deliver the outbox in order, unless another thread is doing so (it delivers ours too)."""
        with self._lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._outbox:
                        self._delivering = False  # in the same step as the check: no event is left behind
                        return
                    event, listeners = self._outbox.popleft()
                for listener in listeners:
                    try:
                        listener(event)
                    except Exception:  # a listener's bug is its own: the job and the other listeners carry on
                        log.exception("a listener of job %s failed on its %r event", self.id, event.get("type"))
                if event["type"] in TERMINAL_EVENTS:
                    self._delivered.set()
        except BaseException:  # interpreter exit, KeyboardInterrupt: let the next emit deliver
            with self._lock:
                self._delivering = False
            raise

    # --- subscription ------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> bool:
        """Register a thread-side listener. False (and nothing registered) when the job already ended:
        the caller reads :attr:`final_event` instead."""
        with self._lock:
            if self._status in FINISHED:
                return False
            self._listeners.append(listener)
            return True

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @property
    def final_event(self) -> dict[str, Any] | None:
        return self._final_event

    @property
    def listener_count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def subscribe(self, loop: asyncio.AbstractEventLoop | None = None) -> Subscription:
        """The job's events on ``loop`` (default: the running loop), ending with the terminal event."""
        return Subscription(self, loop or asyncio.get_running_loop())

    async def done(self) -> None:
        """Wait, without blocking the loop, until the job is terminal."""
        if self._done.is_set():
            return
        async with self.subscribe() as events:
            async for _event in events:
                pass

    def wait(self, timeout: float | None = None) -> bool:
        """Blocking wait for the end (threads only: the CLI, Ray replica helpers)."""
        return self._done.wait(timeout)

    def wait_delivered(self, timeout: float | None = None) -> bool:
        """Blocking wait until the terminal event has reached every listener (the job is done a moment
        before: :meth:`wait` returns then). Threads only."""
        return self._delivered.wait(timeout)

    def summary(self) -> dict[str, Any]:
        """Status for GET /v1/images/jobs/{id} (without the images)."""
        data: dict[str, Any] = {
            "id": self.id, "object": "image.job", "status": self._status.value, "created": self.created,
            "model": self.spec.key, "queue_position": self.queue_position,
            "progress": {"step": self.step, "total": self.total_steps or self.params.steps},
            "batch_size": self.batch_size, "cancel_step": self.cancel_step,
        }
        if self.request_id is not None:
            data["request_id"] = self.request_id
        if self.error is not None:
            data["error"] = {"message": self.error.message, "code": self.error.code}
        return data

    def engine_request(self, is_cancelled: Callable[[], bool],
                       on_progress: Callable[[int, int, Any], None]) -> ImageRequest:
        return ImageRequest(prompt=self.prompt, seeds=list(self.seeds), negative_prompt=self.negative_prompt,
                            is_cancelled=is_cancelled, on_progress=on_progress, partial_images=self.partial_images,
                            images=list(self.images), mask=self.mask)


class Subscription:
    """An async iterator over one job's events, fed from any thread; closes itself at the end.

    Use as ``async with job.subscribe() as events: async for event in events: ...``. At most
    :data:`SUBSCRIPTION_BUFFER` events wait; when a slow consumer falls further behind, the oldest
    non-terminal events are dropped. The terminal event is always delivered, exactly once.
    """

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self._loop = loop
        self._buffer: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._closed = False
        if not job.add_listener(self._on_event):  # already over: answer at once
            final = job.final_event
            assert final is not None
            self._buffer.append(final)

    def _on_event(self, event: dict[str, Any]) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._push, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.job.remove_listener(self._on_event)

    def _push(self, event: dict[str, Any]) -> None:  # on the loop
        if self._closed:
            return
        if len(self._buffer) >= SUBSCRIPTION_BUFFER:
            for index, old in enumerate(self._buffer):
                if old["type"] not in TERMINAL_EVENTS:
                    del self._buffer[index]
                    break
        self._buffer.append(event)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._ended or self._closed:
            raise StopAsyncIteration
        while not self._buffer:
            self._wakeup.clear()
            await self._wakeup.wait()
        event = self._buffer.popleft()
        if event["type"] in TERMINAL_EVENTS:
            self._ended = True
            self.close()
        return event

    def close(self) -> None:
        self._closed = True
        self.job.remove_listener(self._on_event)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()
