"""A worker process's message loop (:class:`fluxserve.engine.workers._Worker`) driven in-process over a real
pipe, with an engine whose stages the test holds at gates: the test plays the parent, so it decides the
exact order in which a call, its cancel flags and late messages reach the worker.

Every wait is bounded by ``BOUND`` seconds and raises :class:`Stuck` when the bound passes: a bound only
turns a deadlock into a failure, it never decides a result.
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass, field
from typing import Any

from fluxserve.engine.workers import _WireRequest, _Worker
from fluxserve.generation import GenerationCancelled, GenerationParams, ImageRequest, ImageResult

BOUND = 20.0


class Stuck(AssertionError):
    """The worker did not answer within :data:`BOUND`."""


@dataclass
class Gate:
    """Holds a stage until the test opens it; :attr:`reached` says a call is waiting at it."""

    closed: bool = False
    reached: threading.Event = field(default_factory=threading.Event)
    _open: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.closed = True
        self._open.clear()

    def open(self) -> None:
        self.closed = False
        self._open.set()

    def pass_through(self) -> None:
        if not self.closed:
            return
        self.reached.set()
        if not self._open.wait(BOUND * 3):
            raise Stuck("nobody opened the gate")


@dataclass
class FakeModel:
    key: str


class GatedEngine:
    """The engine inside the worker: ``get`` (before the call's requests exist) and the text encoding
    (before the first step) can be held; each step checks the cancel flags, then reports progress, and a
    call cancelled by its last step ends cancelled (as :class:`~fluxserve.engine.engine.DeviceEngine`)."""

    device = "fake:0"

    def __init__(self) -> None:
        self.lookup = Gate()
        self.encode = Gate()
        self.steps_run: dict[str, int] = {}
        self.step_sync: Any = None

    def get(self, key: str) -> FakeModel | None:
        self.lookup.pass_through()
        return FakeModel(key)

    def memory(self) -> dict[str, Any]:
        return {"device": self.device}

    def generate(self, model: FakeModel, params: GenerationParams, requests: list[ImageRequest]) -> list[ImageResult]:
        prompt = requests[0].prompt
        self.steps_run[prompt] = 0
        self.encode.pass_through()
        for step in range(params.steps):
            if all(r.is_cancelled() for r in requests):
                raise GenerationCancelled(f"cancelled before step {step + 1}")
            self.steps_run[prompt] = step + 1
            for request in requests:
                if request.on_progress is not None:
                    request.on_progress(step + 1, params.steps, None)
        if all(r.is_cancelled() for r in requests):  # as the real engine: cancelled during the last step
            raise GenerationCancelled("cancelled during denoising")
        return [ImageResult(images=[], seeds=list(r.seeds), params=params, timings={}, batch_size=1) for r in requests]


def wire(prompt: str) -> _WireRequest:
    return _WireRequest(prompt, [1], None, False, True, [], None)


def params(steps: int) -> GenerationParams:
    return GenerationParams("fake", 64, 64, steps, 0.0, 32)


class Parent:
    """The parent's end of the pipe, played by the test, with the worker serving in a thread."""

    def __init__(self, engine: GatedEngine, *, followers: int = 0) -> None:
        self.conn, child = multiprocessing.Pipe(duplex=True)
        self.follower_conns = [multiprocessing.Pipe(duplex=True) for _ in range(followers)]
        self.mirrored: list[str] = []
        self.answered = threading.Semaphore(0)
        """Released once per answer a follower sent."""
        self.worker = _Worker(engine, child, [mine for mine, _theirs in self.follower_conns])
        self._ids = iter(range(1000, 100000))
        self._unread: dict[int, list[tuple[str, Any]]] = {}
        self._serving = threading.Thread(target=self.worker.serve, name="worker-serve", daemon=True)
        for _mine, theirs in self.follower_conns:
            threading.Thread(target=self._follow, args=(theirs,), daemon=True).start()

    def start(self) -> None:
        self._serving.start()

    def _follow(self, conn: Any) -> None:
        """A split group's other rank: records what rank 0 mirrors to it and answers ok."""
        while True:
            try:
                verb, _args = conn.recv()
            except (EOFError, OSError):
                return
            self.mirrored.append(verb)
            conn.send(("ok", None))
            self.answered.release()

    def unread_follower_answers(self) -> bool:
        """Whether rank 0 left a follower's answer in its pipe (call after every answer was sent)."""
        return any(conn.poll(0) for conn in self.worker.followers)

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, call_id: int) -> tuple[str, Any]:
        """The next message the worker sent for ``call_id`` (messages of other calls wait their turn)."""
        while not self._unread.get(call_id):
            if not self.conn.poll(BOUND):
                raise Stuck(f"the worker sent nothing for call {call_id}")
            got, kind, payload = self.conn.recv()
            self._unread.setdefault(got, []).append((kind, payload))
        return self._unread[call_id].pop(0)

    def round_trip(self) -> None:
        """A ``memory`` call and its answer: the worker has handled every message sent before it."""
        call_id = next(self._ids)
        self.send((call_id, "memory", None))
        kind, _payload = self.recv(call_id)
        assert kind == "ok", kind

    def close(self) -> None:
        self.conn.send((0, "shutdown", None))
        self._serving.join(BOUND)
        self.conn.close()
