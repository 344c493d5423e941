"""A process per device: :class:`ProcessEngine` runs one device's :class:`DeviceEngine` in a spawned process.

With ``FLUX_WORKER_PROCESSES=1`` every device's engine lives in its own process, so engines on two GPUs no
longer contend for one interpreter. The scheduler does not know: a :class:`ProcessEngine` implements the
same :class:`~fluxserve.scheduler.protocols.Engine` protocol and forwards each call over a pipe.

The wire, one :func:`multiprocessing.Pipe` per worker (everything pickled):

* parent → worker: ``(call_id, verb, args)`` for ``load``, ``unload``, ``release``, ``memory``,
  ``generate``, and what the routes ask of a loaded model (``token_count``, ``prompt_cache``,
  ``lora_names``, ``lora_load``, ``lora_unload``); ``(call_id, "ack", (seq, [cancelled per request]))``
  answers progress event ``seq``; ``(call_id, "flags", [...])`` carries the flags when they change between
  progress events (the poll).
* worker → parent: ``(call_id, "progress", (seq, request, step, total, preview))`` — the worker then
  waits for the ack, so a job cancelled while step *k* is reported stops at step *k + 1*: cancellation
  crosses the boundary within one step, deterministically; ``(call_id, "ok", value)`` or
  ``(call_id, "error", (kind, message))`` ends a call.

Inside the worker, the receive loop records a call (its flags and acks) the moment its message arrives,
before the call's thread starts, and the call's thread removes the record when it answers. A flags
message is stored in the record whenever it comes — before the thread runs, during text encoding,
while a split group's call waits for the group lock — and never reset; a message for a call without a
record (one that already answered) is dropped. A generation whose requests are all cancelled before it
starts answers ``GenerationCancelled`` without running (and without mirroring it to a group's ranks).

Engine errors cross as themselves (:class:`OutOfMemory`, :class:`BadOutput`, :class:`GenerationCancelled`,
model load errors); anything else becomes :class:`WorkerError`. A worker that dies (killed, segfault, out
of host memory) fails every call in flight with :class:`WorkerCrashed` at once (the reader thread sees the
pipe close), is started again, and loads again the models it had; until then ``get`` answers None so the
scheduler sends it nothing. Results come back as NumPy arrays in the pickles (a 1024² image is 3 MB: a
few milliseconds over a pipe).

A worker that stops answering without dying (stopped, frozen, a call holding its interpreter) is found by
heartbeat: once it has started (its ``hello``), a thread of its own sends ``(0, "heartbeat", None)`` every
second (a quarter of the timeout when that is shorter), and every message counts as a sign of life. The
parent's supervisor thread kills a worker silent for FLUX_WORKER_HEARTBEAT_TIMEOUT seconds; the reader
then sees the pipe close and restarts it as above, but its calls fail with :class:`WorkerUnresponsive`
(the scheduler: 503 ``worker_unresponsive``, or cancelled for a job whose cancel could not cross).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from fluxserve.config import EngineConfig
from fluxserve.engine.parallel import ParallelPlan
from fluxserve.generation import (
    AdapterError,
    BadOutput,
    GenerationCancelled,
    GenerationParams,
    ImageRequest,
    ImageResult,
    ModelLoadError,
    ModelLockTimeout,
    OutOfMemory,
    WorkerUnresponsive,
)
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.devices import DevicePlan
from fluxserve.models.handle import ModelHandle, PromptCacheStats, WarmupRuns
from fluxserve.models.registry import family_descriptor
from fluxserve.models.spec import ModelSpec

if TYPE_CHECKING:
    from fluxserve.engine.loading import LoadedModel
    from fluxserve.loras import LoraInfo

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
"""How often a waiting call looks at its requests' cancel flags when no progress event comes (before the
first step, in the text encoders and the VAE)."""
RESTART_BACKOFF_MAX = 30.0
"""Most seconds between restarts of a worker that keeps dying before it answers a call."""
START_TIMEOUT = 600.0
"""Seconds a call waits for a (re)starting worker to answer before it fails."""
HEARTBEAT_SECONDS = 1.0
"""How often a worker says it is alive (more often where FLUX_WORKER_HEARTBEAT_TIMEOUT is under 4 s)."""


def heartbeat_interval(timeout: float) -> float:
    """Seconds between heartbeats for a supervisor that waits ``timeout`` seconds: several beats per timeout."""
    return min(HEARTBEAT_SECONDS, timeout / 4)


class WorkerError(RuntimeError):
    """The worker raised something that is not an engine error (a bug); the scheduler answers 500."""


class WorkerCrashed(RuntimeError):
    """The worker process died while this call was in flight; it is being restarted."""


@dataclass
class RemoteModel:
    """The parent's view of a model loaded in a worker: the worker-process
    :class:`~fluxserve.models.handle.ModelHandle`. What the worker keeps (prompt cache, token counts, LoRA
    adapters) is asked for over the pipe."""

    spec: ModelSpec
    engine: ProcessEngine = field(repr=False)
    load_seconds: float
    modes: list[str]
    pipeline_class: str
    loaded_at: float = field(default_factory=time.monotonic)
    warmup: WarmupRuns = field(default_factory=dict)
    generation: int = 0
    """Which incarnation of the worker holds it (a restart makes older ones stale)."""
    takes_loras: bool = True
    loras_unavailable: str | None = None
    """Why the worker's model takes no adapters (FLUX_QUANTIZE=fp8, a pipeline without LoRA support)."""

    @property
    def descriptor(self) -> FamilyDescriptor:
        return family_descriptor(self.spec.family)

    @property
    def plan(self) -> DevicePlan:
        return self.engine.plan

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(p.device for p in self.engine.group) if self.engine.group else (self.engine.plan.device,)

    def prompt_cache_stats(self) -> PromptCacheStats:
        hits, misses, capacity = self.engine._call("prompt_cache", (self.spec.key, None))
        return PromptCacheStats(hits=hits, misses=misses, capacity=capacity)

    def token_count(self, prompt: str) -> dict[str, int]:
        counts: dict[str, int] = self.engine._call("token_count", (self.spec.key, prompt))
        return counts

    @property
    def loras(self) -> WorkerLoras | None:
        return WorkerLoras(self.engine, self.spec.key) if self.takes_loras else None


@dataclass(frozen=True)
class WorkerLoras:
    """The adapters of a model in a worker process (:class:`~fluxserve.models.handle.LoraControl`)."""

    engine: ProcessEngine
    key: str

    def loaded_names(self) -> list[str]:
        names: list[str] = self.engine._call("lora_names", (self.key, None))
        return names

    def preload(self, info: LoraInfo) -> float:
        seconds: float = self.engine._call("lora_load", (self.key, info))
        return seconds

    def unload(self, name: str) -> bool:
        return bool(self.engine._call("lora_unload", (self.key, name)))


@dataclass
class _WireRequest:
    """An :class:`ImageRequest` without its callbacks (those stay in the parent)."""

    prompt: str
    seeds: list[int]
    negative_prompt: str | None
    partial_images: int
    reports_progress: bool
    images: list[Any]
    mask: Any


class _NoFaults:
    """The parent's stand-in for the worker's fault injector (faults fire inside the worker)."""

    @contextmanager
    def suspended(self) -> Iterator[None]:
        yield


class ProcessEngine:
    """One device's engine in a spawned worker process, behind the scheduler's ``Engine`` protocol."""

    def __init__(self, settings: EngineConfig, plan: DevicePlan, *, torch_threads: int | None = None,
                 group: list[DevicePlan] | None = None, split: ParallelPlan | None = None) -> None:
        """``group`` and ``split``: this engine is a split group (``FLUX_PARALLEL``); ``plan`` is rank 0's."""
        self.settings = settings
        self.plan = plan
        self.group = group if group and len(group) > 1 else None
        self.split = split if self.group else None
        self.faults = _NoFaults()
        self.torch_threads = torch_threads
        self._context = multiprocessing.get_context("spawn")
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._calls: dict[int, queue.Queue[tuple[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._models: dict[str, RemoteModel] = {}
        self._wanted: dict[str, ModelSpec] = {}
        self._generation = 0
        self._conn: Connection | None = None
        self._process: Any = None
        self._ready = False
        self._closing = False
        self.restarts = 0
        self.rank_pids: list[int] = []
        """A split group's other ranks (their processes are rank 0's children)."""
        self._crashes = 0
        self.consecutive_oom_failures = 0
        self.heartbeat_timeout = float(settings.worker_heartbeat_timeout)
        self._last_sign: float | None = None
        """When the current worker last sent anything; None before its ``hello`` (not supervised yet)."""
        self._silenced: dict[int, float] = {}
        """Generations the supervisor killed, and the seconds each had been silent."""
        self._start_worker()
        threading.Thread(target=self._supervise, name=f"worker-supervisor-{self.device}", daemon=True).start()

    # --- the worker process ----------------------------------------------------------------------
    @property
    def device(self) -> str:
        if self.group:
            return "+".join(p.device for p in self.group)
        return self.plan.device

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start_worker(self) -> None:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        # a split group's rank 0 starts the other ranks: it may not be daemonic (daemons have no children)
        process = self._context.Process(
            target=worker_main, args=(self.settings, self.plan, child_conn, self.torch_threads, self.group,
                                      self.split),
            name=f"fluxserve-worker-{self.device}", daemon=self.group is None)
        process.start()
        child_conn.close()  # only the worker holds its end: its death closes the pipe
        with self._state:
            self._generation += 1
            self._conn, self._process = parent_conn, process
            self._last_sign = None
            self._state.notify_all()
        generation = self._generation
        threading.Thread(target=self._reader, args=(parent_conn, process, generation),
                         name=f"worker-reader-{self.device}", daemon=True).start()
        log.info("worker process started", extra={"ctx": {"device": self.device, "pid": process.pid}})

    def _reader(self, conn: Connection, process: Any, generation: int) -> None:
        """Route the worker's messages to the waiting calls; on EOF fail them all and restart."""
        while True:
            try:
                call_id, kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "hello":  # the worker built its engine: calls may go now, and it is supervised
                with self._state:
                    self.rank_pids = list(payload.get("ranks", []))
                    self._ready = True
                    self._alive(generation)
                    self._state.notify_all()
                continue
            if kind == "heartbeat":
                with self._state:
                    self._alive(generation)
                continue
            with self._state:
                self._alive(generation)
                inbox = self._calls.get(call_id)
                self._crashes = 0
            if inbox is not None:
                inbox.put((kind, payload))
        process.join(timeout=10)
        with self._state:
            if self._generation != generation:
                return
            self._ready = False
            self._last_sign = None
            stale = list(self._calls.values())
            self._models.clear()
            closing = self._closing
            silent = self._silenced.pop(generation, None)
        code = process.exitcode
        for inbox in stale:
            inbox.put(("crashed", code) if silent is None else ("unresponsive", silent))
        conn.close()
        if closing:
            return
        if silent is None:
            log.error("worker process died; restarting it", extra={"ctx": {
                "device": self.device, "pid": process.pid, "exitcode": code, "calls_failed": len(stale)}})
        with self._state:
            self.restarts += 1
            self._state.notify_all()
        self._crashes += 1
        if self._crashes > 1:  # died again before answering anything: back off, never spin
            time.sleep(min(RESTART_BACKOFF_MAX, 2.0 ** (self._crashes - 2)))
        try:
            self._start_worker()
        except Exception:
            log.exception("could not restart the worker process of %s", self.device)
            return
        for spec in list(self._wanted.values()):  # load again what it served, in the background
            threading.Thread(target=self._reload, args=(spec,), name=f"worker-reload-{spec.key}",
                             daemon=True).start()

    def _alive(self, generation: int) -> None:
        """Under the state lock: worker ``generation`` just sent something."""
        if generation == self._generation:
            self._last_sign = time.monotonic()

    def _supervise(self) -> None:
        """Kill the worker when it has sent nothing, not even a heartbeat, for ``heartbeat_timeout`` seconds;
        the reader sees its pipe close, fails its calls with :class:`WorkerUnresponsive` and starts another."""
        period = heartbeat_interval(self.heartbeat_timeout)
        while True:
            with self._state:
                if not self._closing:
                    self._state.wait(period)
                if self._closing:
                    return
                generation, process, last = self._generation, self._process, self._last_sign
                silent = None if last is None else time.monotonic() - last
                if silent is None or silent <= self.heartbeat_timeout or generation in self._silenced:
                    continue
                self._silenced[generation] = silent
                self._ready = False  # no new call goes to it; the reader restarts it once it is gone
                self._models.clear()
            log.error("worker process sent no heartbeat; killing and replacing it", extra={"ctx": {
                "device": self.device, "pid": process.pid, "silent_seconds": round(silent, 1),
                "timeout": self.heartbeat_timeout}})
            process.kill()  # SIGKILL: also ends a stopped process

    def _reload(self, spec: ModelSpec) -> None:
        try:
            self.load(spec)
        except Exception as exc:  # the scheduler's own loads report it to jobs; here only the log
            log.error("reloading %s after a worker restart failed: %s", spec.key, exc)

    def wait_restarted(self, restarts: int, timeout: float | None = None) -> bool:
        """Wait until the worker has been restarted ``restarts`` times in all and answers again."""
        with self._state:
            return self._state.wait_for(lambda: self.restarts >= restarts and self._ready, timeout=timeout)

    def close(self) -> None:
        with self._state:
            self._closing = True
            conn, process = self._conn, self._process
            self._state.notify_all()  # the supervisor stops
        if conn is not None:
            try:
                with self._send_lock:
                    conn.send((0, "shutdown", None))
            except (OSError, ValueError):
                pass
        if process is not None:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)

    # --- calls -----------------------------------------------------------------------------------
    def _call(self, verb: str, args: Any, requests: list[ImageRequest] | None = None) -> Any:
        call_id = next(self._ids)
        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self._state:
            if not self._state.wait_for(lambda: self._ready or self._closing, timeout=START_TIMEOUT):
                raise WorkerCrashed(f"the worker process of {self.device} did not come back")
            if self._closing:
                raise WorkerCrashed(f"the worker process of {self.device} is shutting down")
            self._calls[call_id] = inbox
            conn = self._conn
        assert conn is not None
        sent_flags: list[bool] = [False] * len(requests or [])
        try:
            self._send(conn, (call_id, verb, args))
            while True:
                flags = [r.is_cancelled() for r in requests or []]
                if flags != sent_flags:  # right behind the call, before the first step, or between progress events
                    sent_flags = flags
                    self._send(conn, (call_id, "flags", flags))
                try:
                    kind, payload = inbox.get(timeout=POLL_SECONDS if requests else None)
                except queue.Empty:
                    continue
                if kind == "progress":
                    seq, index, step, total, preview = payload
                    request = (requests or [])[index]
                    if request.on_progress is not None:
                        request.on_progress(step, total, preview)
                    sent_flags = [r.is_cancelled() for r in requests or []]
                    self._send(conn, (call_id, "ack", (seq, sent_flags)))
                elif kind == "ok":
                    return payload
                elif kind == "error":
                    raise _rebuild_error(*payload)
                elif kind == "unresponsive":
                    raise WorkerUnresponsive(
                        f"the worker process of {self.device} stopped responding (no heartbeat for {payload:.0f}s, "
                        f"FLUX_WORKER_HEARTBEAT_TIMEOUT={self.heartbeat_timeout:g}) during {verb}; it was "
                        "replaced")
                elif kind == "crashed":
                    raise WorkerCrashed(f"the worker process of {self.device} died (exit code {payload}) during "
                                        f"{verb}; it is being restarted")
        finally:
            with self._state:
                self._calls.pop(call_id, None)

    def _send(self, conn: Connection, message: Any) -> None:
        try:
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError) as exc:  # the worker is gone; the reader fails the call just after
            log.debug("send to worker failed: %s", exc)

    # --- the Engine protocol ---------------------------------------------------------------------
    def get(self, key: str) -> RemoteModel | None:
        with self._state:
            model = self._models.get(key)
            return model if model is not None and model.generation == self._generation else None

    def loaded(self) -> dict[str, RemoteModel]:
        with self._state:
            return {k: m for k, m in self._models.items() if m.generation == self._generation}

    def load(self, spec: ModelSpec) -> tuple[RemoteModel, bool]:
        existing = self.get(spec.key)
        if existing is not None:
            return existing, False
        with self._state:
            generation = self._generation
        info, loaded_now = self._call("load", spec)
        model = RemoteModel(info["spec"], self, info["load_seconds"], info["modes"], info["pipeline_class"],
                            generation=generation, takes_loras=info["loras"],
                            loras_unavailable=info["loras_unavailable"])
        with self._state:
            self._wanted[spec.key] = spec
            current = self._models.get(spec.key)
            if current is not None and current.generation == generation:
                return current, False
            if generation == self._generation:
                self._models[spec.key] = model
        return model, loaded_now

    def unload(self, key: str) -> bool:
        with self._state:
            self._wanted.pop(key, None)
            had = self._models.pop(key, None) is not None
        if not had:
            return False
        return bool(self._call("unload", key))

    def release(self, keep: set[str]) -> list[str]:
        dropped: list[str] = self._call("release", keep)
        with self._state:
            for key in dropped:
                self._models.pop(key, None)
                self._wanted.pop(key, None)
        return dropped

    def memory(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = self._call("memory", None)
        snapshot.setdefault("device", self.device)
        snapshot["worker_pid"] = self.pid
        return snapshot

    def generate(self, model: ModelHandle, params: GenerationParams,
                 requests: list[ImageRequest]) -> list[ImageResult]:
        wire = [_WireRequest(r.prompt, list(r.seeds), r.negative_prompt, r.partial_images, r.on_progress is not None,
                             list(r.images), r.mask) for r in requests]
        try:
            results: list[ImageResult] = self._call("generate", (model.spec.key, params, wire), requests)
        except OutOfMemory:
            self.consecutive_oom_failures += 1
            raise
        self.consecutive_oom_failures = 0
        return results


_ERRORS: dict[str, type[Exception]] = {
    "GenerationCancelled": GenerationCancelled, "BadOutput": BadOutput, "ModelLoadError": ModelLoadError,
    "ModelLockTimeout": ModelLockTimeout, "AdapterError": AdapterError, "KeyError": KeyError,
    "ValueError": ValueError,
}


def _rebuild_error(kind: str, message: str) -> Exception:
    if kind == "OutOfMemory":
        return OutOfMemory(message)
    error = _ERRORS.get(kind)
    if error is not None:
        return error(message)
    return WorkerError(f"{kind} in the worker process: {message}")


# --- inside the worker process -------------------------------------------------------------------
class _Worker:
    """The worker's side: an engine (a DeviceEngine), a receive loop, one thread per call."""

    def __init__(self, engine: Any, conn: Connection, followers: list[Connection] | None = None) -> None:
        self.engine = engine
        self.conn = conn
        self.followers = followers or []
        self.group_lock = threading.Lock()
        """A split group's ranks must run their collectives in one order: mirrored calls go one at a time."""
        if self.followers:
            from fluxserve.engine.parallel import agree_flags

            self.engine.step_sync = functools.partial(agree_flags, device=engine.device)
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.calls: dict[int, _Call] = {}
        """Calls received and not answered yet (guarded by :attr:`lock`)."""

    def send(self, message: Any) -> None:
        with self.send_lock:
            self.conn.send(message)

    def beat(self, interval: float) -> None:
        """The heartbeat thread: a sign of life every ``interval`` seconds, whatever the calls are doing."""
        while True:
            try:
                self.send((0, "heartbeat", None))
            except (OSError, ValueError):
                return  # the parent is gone
            time.sleep(interval)

    def serve(self) -> None:
        while True:
            try:
                call_id, verb, args = self.conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if verb == "shutdown":
                return
            if verb in ("flags", "ack"):
                seq, flags = (None, args) if verb == "flags" else args
                with self.lock:
                    call = self.calls.get(call_id)
                    if call is not None:  # None: the call already answered, the message is late
                        call.flags = flags
                if call is not None and seq is not None:
                    call.acks.put(seq)
                continue
            with self.lock:  # before its thread starts: a cancel right behind it has a place to land
                self.calls[call_id] = _Call()
            threading.Thread(target=self.run_call, args=(call_id, verb, args), name=f"call-{verb}",
                             daemon=True).start()

    def run_call(self, call_id: int, verb: str, args: Any) -> None:
        try:
            value = self.dispatch(call_id, verb, args)
        except OutOfMemory as exc:
            self.send((call_id, "error", ("OutOfMemory", exc.reason)))
        except Exception as exc:
            if not isinstance(exc, tuple(_ERRORS.values())):
                log.exception("worker call %s failed", verb)
            self.send((call_id, "error", (type(exc).__name__, str(exc))))
        else:
            try:
                self.send((call_id, "ok", value))
            except Exception as exc:  # an answer that cannot cross must still end the call
                log.exception("worker call %s: the result could not be sent", verb)
                self.send((call_id, "error", (type(exc).__name__, "the result could not be sent back")))
        finally:
            with self.lock:
                self.calls.pop(call_id, None)

    def dispatch(self, call_id: int, verb: str, args: Any) -> Any:
        if self.followers and verb in _MIRRORED:
            with self.group_lock:
                self.refuse_if_cancelled(call_id, verb)  # after the wait for the group, before any rank starts
                for follower in self.followers:  # the other ranks run the same call, in the same order
                    follower.send((verb, _mirror_args(verb, args)))
                try:
                    value = self.run_local(call_id, verb, args)
                except GenerationCancelled:
                    # Every rank stopped at the same step (the flags are agreed per step) and answered: read
                    # those answers now, or the next call would take them for its own.
                    self.collect_followers()
                    raise
                failures = self.collect_followers()
                if failures:
                    raise WorkerError(failures[0])
                return value
        self.refuse_if_cancelled(call_id, verb)
        return self.run_local(call_id, verb, args)

    def collect_followers(self) -> list[str]:
        """Every other rank's answer to the mirrored call; what the failed ones said."""
        failures = []
        for rank, follower in enumerate(self.followers, start=1):
            kind, detail = follower.recv()
            if kind == "error":
                failures.append(f"rank {rank} of the split group: {detail}")
        return failures

    def refuse_if_cancelled(self, call_id: int, verb: str) -> None:
        """A generation whose every request was cancelled before it started does not start."""
        with self.lock:
            call = self.calls.get(call_id)
            flags = call.flags if call is not None else None
        if verb == "generate" and flags and all(flags):
            raise GenerationCancelled("cancelled before it started")

    def run_local(self, call_id: int, verb: str, args: Any) -> Any:
        engine = self.engine
        if verb == "load":
            model, loaded_now = engine.load(args)
            return {"spec": model.spec, "load_seconds": model.load_seconds, "modes": list(model.modes),
                    "pipeline_class": model.pipeline_class, "loras": model.loras is not None,
                    "loras_unavailable": model.loras_unavailable}, loaded_now
        if verb == "unload":
            return engine.unload(args)
        if verb == "release":
            return engine.release(args)
        if verb == "memory":
            return engine.memory()
        if verb == "generate":
            key, params, wire = args
            return engine.generate(self.model(key), params, self.requests(call_id, wire))
        if verb in _MODEL_CALLS:
            key, argument = args
            return _model_call(self.model(key), verb, argument)
        raise ValueError(f"unknown worker call {verb!r}")

    def model(self, key: str) -> LoadedModel:
        present = self.engine.get(key)
        if present is None:
            raise ModelLoadError(f"{key} is not loaded in the worker process of {self.engine.device}")
        return present

    def requests(self, call_id: int, wire: list[_WireRequest]) -> list[ImageRequest]:
        """The call's requests, reading the flags the receive loop stores in its record (never reset here:
        a cancel may already be there)."""
        sequence = itertools.count()
        with self.lock:
            call = self.calls[call_id]

        def cancelled(index: int) -> bool:
            with self.lock:
                flags = call.flags
            return bool(flags and flags[index])

        def progress(index: int, step: int, total: int, preview: Any) -> None:
            seq = next(sequence)
            self.send((call_id, "progress", (seq, index, step, total, preview)))
            while call.acks.get() != seq:  # the parent's answer: the cancel flags after this step's callbacks ran
                pass

        out = []
        for index, request in enumerate(wire):
            out.append(ImageRequest(
                prompt=request.prompt, seeds=request.seeds, negative_prompt=request.negative_prompt,
                is_cancelled=functools.partial(cancelled, index),
                on_progress=functools.partial(progress, index) if request.reports_progress else None,
                partial_images=request.partial_images, images=request.images, mask=request.mask))
        return out


@dataclass
class _Call:
    """What the worker keeps of one call while it runs: its requests' cancel flags as the parent last sent
    them (None: none sent yet), and the progress acknowledgements."""

    flags: list[bool] | None = None
    acks: queue.Queue[int] = field(default_factory=queue.Queue)


_MIRRORED = ("load", "unload", "release", "generate", "lora_load", "lora_unload")
_MODEL_CALLS = ("token_count", "prompt_cache", "lora_names", "lora_load", "lora_unload")
"""What the routes ask of one loaded model (args ``(model key, argument)``): :func:`_model_call`."""
_follower_pids: list[int] = []


def _model_call(model: LoadedModel, verb: str, argument: Any) -> Any:
    """One of :data:`_MODEL_CALLS` on a model of this process (the worker's side of :class:`RemoteModel`)."""
    if verb == "token_count":
        return model.token_count(argument)
    if verb == "prompt_cache":
        stats = model.prompt_cache_stats()
        return stats.hits, stats.misses, stats.capacity
    if model.loras is None:
        raise AdapterError(model.loras_unavailable or "this model takes no LoRA adapters")
    if verb == "lora_names":
        return model.loras.loaded_names()
    if verb == "lora_load":
        return model.loras.preload(argument)
    return model.loras.unload(argument)


def _mirror_args(verb: str, args: Any) -> Any:
    if verb != "generate":
        return args
    key, params, wire = args
    return key, params, [replace(w, reports_progress=False) for w in wire]


def worker_main(settings: EngineConfig, plan: DevicePlan, conn: Connection, torch_threads: int | None,
                group: list[DevicePlan] | None = None, split: ParallelPlan | None = None) -> None:
    """The worker process's entry point (spawned: a fresh interpreter). In a split group it is rank 0:
    it starts the other ranks, joins the process group with them, and mirrors every model call to them."""
    from fluxserve.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.structured_logs)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    followers: list[Connection] = []
    if group and split:
        settings = _group_settings(settings)
        followers = _start_followers(settings, group, split, torch_threads)
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.faults import FaultInjector

    engine = DeviceEngine(settings, plan, FaultInjector(settings.fault_injection, settings.faults))
    worker = _Worker(engine, conn, followers)
    worker.send((0, "hello", {"pid": os.getpid(), "ranks": _follower_pids}))
    threading.Thread(target=worker.beat, args=(heartbeat_interval(settings.worker_heartbeat_timeout),),
                     name="heartbeat", daemon=True).start()
    log.info("worker process serving", extra={"ctx": {"device": plan.device, "pid": os.getpid()}})
    worker.serve()
    _exiting()


def _exiting() -> None:
    """Before a worker process exits: whatever is alive now lives until the exit, so it is frozen, not walked
    again by the interpreter's final garbage collections (~1.5 s over the objects of torch and diffusers, which
    a server's shutdown or a restart waits for)."""
    gc.freeze()


def cpu_threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` CPU worker processes, one core kept for the server."""
    cores = os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, workers))


def _group_settings(settings: EngineConfig) -> EngineConfig:
    """A split group's ranks must take the same path through every call: no OOM ladder (a retry, an
    offload or a downscale on one rank alone would leave the others in a collective)."""
    return replace(settings, oom_policy=())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_followers(settings: EngineConfig, group: list[DevicePlan], split: ParallelPlan,
                     torch_threads: int | None) -> list[Connection]:
    """Start ranks 1..N-1, join the process group as rank 0, and watch them: a rank that dies takes
    rank 0 down too, so the server sees the group fail and restarts it whole."""
    from fluxserve.engine.parallel import join_group

    context = multiprocessing.get_context("spawn")
    port = _free_port()
    conns, processes = [], []
    for rank in range(1, len(group)):
        mine, theirs = context.Pipe(duplex=True)
        process = context.Process(target=follower_main,
                                  args=(settings, group[rank], rank, len(group), port, split, theirs, torch_threads),
                                  name=f"fluxserve-rank{rank}-{group[rank].device}", daemon=True)
        process.start()
        theirs.close()
        conns.append(mine)
        processes.append(process)
    join_group(split, 0, len(group), group[0].device, port)
    _follower_pids.extend(p.pid for p in processes if p.pid is not None)

    def watch() -> None:
        multiprocessing.connection.wait([p.sentinel for p in processes])
        dead = [p for p in processes if not p.is_alive()]
        log.error("a rank of the split group died; the group stops and is restarted",
                  extra={"ctx": {"ranks": [p.name for p in dead], "exitcodes": [p.exitcode for p in dead]}})
        os._exit(70)

    threading.Thread(target=watch, name="group-watch", daemon=True).start()
    return conns


def follower_main(settings: EngineConfig, plan: DevicePlan, rank: int, world: int, port: int, split: ParallelPlan,
                  conn: Connection, torch_threads: int | None) -> None:
    """Rank ``rank`` of a split group: runs rank 0's model calls in order, answers ok or error."""
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.parallel import agree_flags, join_group
    from fluxserve.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.structured_logs)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    join_group(split, rank, world, plan.device, port)
    engine = DeviceEngine(settings, plan)
    agreed: list[bool] = []

    def step_sync(flags: list[bool]) -> list[bool]:
        agreed[:] = agree_flags(flags, plan.device)
        return list(agreed)

    engine.step_sync = step_sync
    while True:
        try:
            verb, args = conn.recv()
        except (EOFError, OSError):
            _exiting()
            return  # rank 0 is gone
        try:
            if verb == "load":
                engine.load(args)
                value: Any = None
            elif verb == "unload":
                value = engine.unload(args)
            elif verb == "release":
                value = engine.release(args)
            elif verb in ("lora_load", "lora_unload"):
                key, argument = args
                model = engine.get(key)
                if model is None:
                    raise ModelLoadError(f"{key} is not loaded on rank {rank}")
                value = _model_call(model, verb, argument)
            else:
                key, params, wire = args
                model = engine.get(key)
                if model is None:
                    raise ModelLoadError(f"{key} is not loaded on rank {rank}")
                agreed[:] = [False] * len(wire)
                requests = [ImageRequest(prompt=w.prompt, seeds=w.seeds, negative_prompt=w.negative_prompt,
                                         is_cancelled=functools.partial(_agreed, agreed, i), images=w.images,
                                         mask=w.mask) for i, w in enumerate(wire)]
                with contextlib.suppress(GenerationCancelled):  # rank 0 reports the outcome
                    engine.generate(model, params, requests)
                value = None
        except Exception as exc:
            log.exception("rank %d: %s failed", rank, verb)
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", value))


def _agreed(agreed: list[bool], index: int) -> bool:
    return index < len(agreed) and agreed[index]
