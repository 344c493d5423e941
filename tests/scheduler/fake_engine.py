"""A fake engine whose every step the test drives, for deterministic scheduler tests.

Each ``generate`` call becomes a :class:`Call` that stops at a gate before every denoising step; the
test moves it on with :meth:`Call.advance` (or lets it run with :meth:`Call.run_free`). Loads can be
held at a gate too. Every wait here is bounded (``BOUND`` seconds) and raises if the bound passes:
a bound only turns a deadlock into a failure, it never decides a result.

Like a real device, it counts copies of a model: a model stays resident from its load until it is
unloaded *and* no call uses it any more (a call's reference keeps the weights alive).
:attr:`FakeEngine.most_resident` is the most copies of one model ever resident at once. Like a worker
process, it refuses to start a call on a model that is not loaded any more.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fluxserve.generation import (
    GenerationCancelled,
    GenerationParams,
    ImageRequest,
    ImageResult,
    ModelLoadError,
)
from fluxserve.models.spec import ModelSpec

BOUND = 20.0


class Stuck(AssertionError):
    """The engine or the scheduler did not get where the test expected within :data:`BOUND`."""


@dataclass(eq=False)
class FakeModel:
    spec: ModelSpec
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.monotonic)
    calls: int = 0
    """Calls running on this copy."""


class Call:
    """One pipeline call (a batch) inside the fake engine. It parks at a gate before every step."""

    def __init__(self, params: GenerationParams, requests: list[ImageRequest]) -> None:
        self.params = params
        self.requests = requests
        self.step = 0
        self.free = False
        self.raises: BaseException | None = None
        self.ended = threading.Event()
        self._cond = threading.Condition()
        self._arrivals = 0
        self._released = 0

    @property
    def size(self) -> int:
        return sum(len(r.seeds) for r in self.requests)

    def _parked(self) -> bool:
        return self._arrivals > self._released

    def _wait(self, predicate: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=BOUND):
                raise Stuck(what)

    def park(self) -> None:
        """Wait until the call is parked at a gate (or has ended)."""
        self._wait(lambda: self._parked() or self.ended.is_set(), "the call never reached a gate")

    def advance(self, steps: int = 1) -> None:
        """Let the call take ``steps`` steps; returns once it is parked at the next gate or has ended."""
        for _ in range(steps):
            self._wait(lambda: self._parked() or self.ended.is_set(), f"the call never reached step {self.step + 1}")
            if self.ended.is_set():
                raise Stuck(f"the call ended at step {self.step}")
            with self._cond:
                self._released += 1
                self._cond.notify_all()
        self.park()

    def run_free(self) -> None:
        """Let the call run to its end without further gates."""
        with self._cond:
            self.free = True
            self._cond.notify_all()

    def fail_with(self, exc: BaseException) -> None:
        """Make the call raise ``exc`` at its next gate."""
        self.raises = exc
        self.run_free()

    def wait_ended(self) -> None:
        if not self.ended.wait(BOUND):
            raise Stuck("the call never ended")

    # engine side
    def _gate(self) -> None:
        with self._cond:
            if self.free:
                return
            self._arrivals += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self.free or self._released >= self._arrivals, timeout=BOUND * 3):
                raise Stuck("nobody advanced the call")

    def _end(self) -> None:
        with self._cond:
            self.ended.set()
            self._cond.notify_all()


class FakeEngine:
    """Implements :class:`fluxserve.scheduler.protocols.Engine`."""

    def __init__(self, device: str = "fake:0", *, hold_loads: bool = False) -> None:
        self._device = device
        self.consecutive_oom_failures = 0
        self.models: dict[str, FakeModel] = {}
        self.calls: queue.Queue[Call] = queue.Queue()
        self.all_calls: list[Call] = []
        self.loads: list[str] = []
        self.load_failures: set[str] = set()
        self.hold_loads = hold_loads
        self.most_resident: dict[str, int] = {}
        self._in_use: list[FakeModel] = []
        """Copies that calls still use (unloaded ones among them are still resident)."""
        self._load_gate = threading.Semaphore(0)
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return self._device

    # --- models --------------------------------------------------------------------------------
    def get(self, key: str) -> FakeModel | None:
        with self._lock:
            return self.models.get(key)

    def loaded(self) -> dict[str, FakeModel]:
        with self._lock:
            return dict(self.models)

    def memory(self) -> dict[str, Any]:
        return {"device": self._device}

    def release_load(self, count: int = 1) -> None:
        for _ in range(count):
            self._load_gate.release()

    def resident(self, key: str) -> int:
        """Copies of ``key`` holding memory now: the loaded one and unloaded ones that calls still use."""
        with self._lock:
            return self._resident_locked(key)

    def _resident_locked(self, key: str) -> int:
        copies = {id(m) for m in self._in_use if m.spec.key == key}
        if key in self.models:
            copies.add(id(self.models[key]))
        count = len(copies)
        self.most_resident[key] = max(self.most_resident.get(key, 0), count)
        return count

    def load(self, spec: ModelSpec) -> tuple[FakeModel, bool]:
        with self._lock:
            if spec.key in self.models:
                return self.models[spec.key], False
        if self.hold_loads and not self._load_gate.acquire(timeout=BOUND * 3):
            raise Stuck("nobody released the load")
        with self._lock:
            self.loads.append(spec.key)
            if spec.key in self.load_failures:
                raise ModelLoadError(f"{spec.key} cannot be loaded here")
            model = self.models.setdefault(spec.key, FakeModel(spec))
            self._resident_locked(spec.key)
        return model, True

    def unload(self, key: str) -> bool:
        with self._lock:
            return self.models.pop(key, None) is not None

    def release(self, keep: set[str]) -> list[str]:
        with self._lock:
            dropped = [key for key in self.models if key not in keep]
            for key in dropped:
                del self.models[key]
        return dropped

    # --- generation ----------------------------------------------------------------------------
    def next_call(self) -> Call:
        try:
            return self.calls.get(timeout=BOUND)
        except queue.Empty:
            raise Stuck("no batch reached the engine") from None

    def generate(self, model: Any, params: GenerationParams, requests: list[ImageRequest]) -> list[ImageResult]:
        with self._lock:
            if self.models.get(model.spec.key) is not model:  # what a worker process answers, too
                raise ModelLoadError(f"{model.spec.key} is not loaded on {self._device}")
            model.calls += 1
            self._in_use.append(model)
            self._resident_locked(model.spec.key)
        call = Call(params, requests)
        self.all_calls.append(call)
        self.calls.put(call)
        try:
            for step in range(params.steps):
                call._gate()
                if call.raises is not None:
                    raise call.raises
                if all(r.is_cancelled() for r in requests):
                    raise GenerationCancelled("cancelled")
                call.step = step + 1
                for request in requests:
                    if request.on_progress is not None and not request.is_cancelled():
                        request.on_progress(step + 1, params.steps, None)
            if call.raises is not None:
                raise call.raises
            size = call.size
            return [ImageResult(images=[np.full((2, 2, 3), seed % 256, np.uint8) for seed in r.seeds],
                                seeds=list(r.seeds), params=params, timings={"denoise": 0.0}, batch_size=size)
                    for r in requests]
        finally:
            with self._lock:
                model.calls -= 1
                self._in_use.remove(model)
            call._end()



async def loop_turn() -> None:
    """Give the event loop one turn (callbacks that threads scheduled with call_soon_threadsafe run)."""
    loop = asyncio.get_running_loop()
    turned: asyncio.Future[None] = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned
