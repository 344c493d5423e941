"""Seeded random interleavings against the real job core, with fakes whose every step the test drives.

The scheduler: submit, batching (with batches that wait for company on the scheduler's own clock), steps,
cancel, disconnect, unload (also of a model whose batch is forming), release, listeners that raise, and
shutdown, against a fake engine that counts resident copies. After every run:

* each accepted job reached exactly one terminal state, and none failed with 500 (no batch ran on a model
  that was no longer loaded, no listener changed a job's fate);
* every subscriber saw each job's events in state order: ``queued`` before ``started``, at most one
  ``started``, exactly one terminal event and nothing after it (thread-side listeners from the start,
  streams from whenever they subscribed);
* no model was ever resident twice on one engine, and every unload and release returned;
* no worker died, no waiter waited past its bound, and nothing stayed behind (no queued job, no job in the
  table, no listener, no model held).

The worker process's message loop: calls whose cancel reaches the worker at a random moment (with the
call, before its thread runs, during text encoding, after a step, after its answer), with or without a
split group. Each call answers once; a cancel stored before the first step runs no step, one sent between
steps stops the call at the next one; messages for calls that ended leave nothing behind.
"""

from __future__ import annotations

import asyncio
import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from fluxserve.api.serving import ImageService
from fluxserve.generation import GenerationParams
from fluxserve.models.registry import resolve_model
from fluxserve.scheduler.jobs import FINISHED, TERMINAL_EVENTS, Job, JobError
from fluxserve.scheduler.scheduler import Scheduler
from fluxserve.settings import Settings
from tests.engine.fake_worker import GatedEngine, Parent, params, wire
from tests.scheduler.fake_engine import BOUND, Call, FakeEngine, FakeModel, Stuck, loop_turn

MODELS = [resolve_model("tiny-flux"), resolve_model("tiny-qwen")]
RUNS = 100


def assert_in_state_order(kinds: list[str], *, from_the_start: bool) -> None:
    """One subscriber's view of one job: queued* → started? → progress* → exactly one terminal event, last."""
    assert kinds and kinds[-1] in TERMINAL_EVENTS, kinds
    assert sum(kind in TERMINAL_EVENTS for kind in kinds) == 1, kinds
    assert kinds.count("started") <= 1, kinds
    if "started" in kinds:
        start = kinds.index("started")
        assert "queued" not in kinds[start:], kinds
        assert "progress" not in kinds[:start], kinds
    if from_the_start:
        assert kinds[0] == "queued", kinds


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.settings = Settings(model="tiny-flux", device="cpu", _env_file=None, max_queue=rng.choice([0, 2, 6]),
                                 max_concurrent=rng.choice([1, 2]), max_batch=rng.choice([1, 2, 4]),
                                 batch_wait_ms=rng.choice([0, 0, 5, 1000]), max_queued_per_key=rng.choice([0, 3]))
        self.engines = [FakeEngine(f"fake:{i}") for i in range(rng.choice([1, 2]))]
        broken = rng.random() < 0.3  # some runs cannot load the second model: its jobs fail with 503
        for engine in self.engines:
            engine.models[MODELS[0].key] = FakeModel(MODELS[0])
            if broken:
                engine.load_failures.add(MODELS[1].key)
        self.now = [0.0]  # the scheduler's clock: a batch waiting for company waits until the run moves it
        self.forming: list[Job] = []
        self.scheduler = Scheduler(self.settings, self.engines, hook=self._hook, clock=lambda: self.now[0])
        self.service = ImageService(SimpleNamespace(settings=self.settings, scheduler=self.scheduler))  # type: ignore[arg-type]
        self.jobs: list[Job] = []
        self.seen: dict[str, list[str]] = {}
        """Job id → the event types its first listener (registered before submit) saw."""
        self.calls: list[Call] = []
        self.waiters: list[asyncio.Task[bool]] = []
        self.disconnects: list[asyncio.Future[None]] = []
        self.readers: list[asyncio.Task[list[str]]] = []
        self.admin: list[threading.Thread] = []

    def _hook(self, name: str, data: dict[str, Any]) -> None:
        if name == "batch_waiting":
            self.forming.append(data["job"])

    # --- operations ------------------------------------------------------------------------------
    def submit(self) -> None:
        rng = self.rng
        spec = rng.choice(MODELS)
        params = GenerationParams(spec.key, rng.choice([64, 128]), 64, rng.randint(1, 3), 0.0, 32)
        job = Job(spec=spec, params=params, prompt="p", seeds=[rng.randrange(1000) for _ in range(rng.choice([1, 2]))],
                  owner=rng.choice([None, "a", "b"]), request_id=rng.choice([None, None, "label"]))
        kinds = self.seen.setdefault(job.id, [])
        job.add_listener(lambda event: kinds.append(event["type"]))
        if rng.random() < 0.2:  # a broken listener: logged, and the job goes on as if it were not there
            failing = rng.choice(["queued", "started", "progress", *TERMINAL_EVENTS])

            def broken(event: dict[str, Any]) -> None:
                if event["type"] == failing:
                    raise RuntimeError(f"a broken listener ({failing})")

            job.add_listener(broken)
        try:
            self.scheduler.submit(job)
        except JobError as refused:
            assert refused.status in (409, 429), refused.message
            assert self.scheduler.table.get(job.id, job.owner) is None  # a refused job leaves no trace
            del self.seen[job.id]
            return
        self.jobs.append(job)
        kind = rng.random()
        if kind < 0.4:  # a synchronous client that may hang up
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.disconnects.append(gone)
            self.waiters.append(asyncio.ensure_future(self.service.wait(job, gone)))
        elif kind < 0.6:  # a streaming client reading every event
            self.readers.append(asyncio.ensure_future(self._read(job)))

    @staticmethod
    async def _read(job: Job) -> list[str]:
        async with job.subscribe() as events:
            return [event["type"] async for event in events]

    def collect_calls(self) -> None:
        for engine in self.engines:
            while not engine.calls.empty():
                self.calls.append(engine.calls.get_nowait())
        self.calls = [call for call in self.calls if not call.ended.is_set()]

    def step(self) -> None:
        self.collect_calls()
        if not self.calls:
            return
        call = self.rng.choice(self.calls)
        try:
            if self.rng.random() < 0.2:
                call.run_free()
            else:
                call.advance()
        except Stuck:
            if not call.ended.is_set():
                raise

    def tick(self) -> None:
        """The scheduler's clock moves on: batches waiting for company stop waiting."""
        self._move_clock(2.0)

    def _move_clock(self, seconds: float) -> None:
        with self.scheduler._cond:
            self.now[0] += seconds
            self.scheduler._cond.notify_all()

    def cancel(self) -> None:
        if self.jobs:
            self.scheduler.cancel(self.rng.choice(self.jobs).id)

    def disconnect(self) -> None:
        live = [gone for gone in self.disconnects if not gone.done()]
        if live:
            self.rng.choice(live).set_result(None)

    def unload(self) -> None:  # waits for the batches using the model: in a thread, while the run goes on
        key = self.rng.choice(MODELS).key
        self._in_thread(lambda: self.scheduler.unload(key))

    def unload_forming(self) -> None:
        """Unload the model of a batch that is waiting for company (its first job is still queued)."""
        forming = [job for job in self.forming if job.id in self.scheduler._pending]
        if forming:
            key = self.rng.choice(forming).spec.key
            self._in_thread(lambda: self.scheduler.unload(key))

    def release(self) -> None:
        self._in_thread(lambda: self.scheduler.release(set()))

    def _in_thread(self, target: Any) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.admin.append(thread)

    # --- the end ---------------------------------------------------------------------------------
    async def finish(self) -> None:
        scheduler = self.scheduler
        if self.rng.random() < 0.5:  # a shutdown in the middle of everything
            scheduler.stop_accepting()
            scheduler.drain(0)
        for _ in range(1000):  # let every call run out; jobs end one way or another
            self._move_clock(10.0)  # and no batch wait for company any more
            self.collect_calls()
            for call in self.calls:
                call.run_free()
            if all(job.finished for job in self.jobs):
                break
            await asyncio.get_running_loop().run_in_executor(None, self._wait_any_job)
        assert all(job.finished for job in self.jobs), [job.status for job in self.jobs if not job.finished]
        for thread in self.admin:  # every unload and release returned
            thread.join(BOUND)
            assert not thread.is_alive()
        for gone in self.disconnects:
            if not gone.done():
                gone.set_result(None)
        await asyncio.wait_for(asyncio.gather(*self.waiters, *self.readers), BOUND)
        for reader in self.readers:
            assert_in_state_order(reader.result(), from_the_start=False)

    def _wait_any_job(self) -> None:
        for job in self.jobs:
            if not job.finished:
                job.wait(0.05)  # a bounded wait on the job's own event: returns as soon as it ends
                return

    def check(self) -> None:
        for job in self.jobs:  # a job is done a moment before its listeners (the table's too) hear of it
            assert job.wait_delivered(BOUND)
        assert self.scheduler.readiness_problems() == []  # no worker died
        assert all(slot.crashes == 0 for slot in self.scheduler._slots)
        for job in self.jobs:
            assert job.status in FINISHED
            assert job.error is None or job.error.status != 500, (job.error.code, job.error.message)
            assert_in_state_order(self.seen[job.id], from_the_start=True)
            assert job.listener_count == 0
        for engine in self.engines:
            assert all(copies <= 1 for copies in engine.most_resident.values()), engine.most_resident
        scheduler = self.scheduler
        with scheduler._cond:  # a slot lets go of its model just after its jobs ended
            assert scheduler._cond.wait_for(lambda: all(slot.busy_since is None for slot in scheduler._slots), BOUND)
        assert not scheduler._pending and all(scheduler.users(spec.key) == 0 for spec in MODELS)
        self.scheduler.table.sweep()
        assert len(self.scheduler.table) == 0


@pytest.mark.parametrize("seed", range(RUNS))
async def test_random_interleavings_keep_every_invariant(seed: int) -> None:
    run = Run(seed)
    run.scheduler.start()
    operations = [run.submit] * 5 + [run.step] * 6 + [run.cancel] * 2 + [
        run.disconnect, run.unload, run.unload_forming, run.release, run.tick]
    try:
        for _ in range(40):
            run.rng.choice(operations)()
            await loop_turn()  # let the loop deliver events to waiters and readers
        await run.finish()
        run.check()
    finally:
        run.scheduler.drain(0)
        for call in run.calls:
            call.run_free()
        run.scheduler.shutdown()


# --- the worker process's message loop ------------------------------------------------------------------
MOMENTS = ("never", "with_the_call", "before_its_thread", "during_encoding", "after_a_step", "after_the_end")


def run_worker_call(parent: Parent, engine: GatedEngine, rng: random.Random, call_id: int, start: Any) -> None:
    """One generation call with a cancel at a random moment, played by the parent; checks how it ended."""
    steps = rng.randint(1, 4)
    moment = rng.choice(MOMENTS)
    if moment == "after_a_step" and steps == 1:
        moment = "never"
    stop_after = rng.randint(1, steps - 1) if moment == "after_a_step" else None
    prompt = f"call-{call_id}"
    gate = engine.lookup if moment == "before_its_thread" else engine.encode if moment == "during_encoding" else None
    if gate is not None:
        gate.close()
        gate.reached.clear()
    parent.send((call_id, "generate", ("m", params(steps), [wire(prompt)])))
    if moment == "with_the_call":
        parent.send((call_id, "flags", [True]))
    start()
    if gate is not None:  # the call is held before its requests exist, or before its first step
        assert gate.reached.wait(BOUND)
        parent.send((call_id, "flags", [True]))
        parent.round_trip()  # the worker has stored the cancel
        gate.open()
    cancelled = moment in ("with_the_call", "before_its_thread", "during_encoding")
    progress = 0
    while True:
        kind, payload = parent.recv(call_id)
        if kind != "progress":
            break
        progress += 1
        if progress == stop_after:
            cancelled = True
            if rng.random() < 0.5:
                parent.send((call_id, "flags", [True]))  # the poll got there first
        parent.send((call_id, "ack", (payload[0], [cancelled])))
    if moment == "never" or moment == "after_the_end":
        assert kind == "ok" and engine.steps_run[prompt] == steps, (kind, payload)
    elif moment == "after_a_step":
        assert (kind, payload[0]) == ("error", "GenerationCancelled") and engine.steps_run[prompt] == stop_after
    elif moment == "with_the_call":  # stored before the first step, or acknowledged with it: within one step
        assert (kind, payload[0]) == ("error", "GenerationCancelled") and engine.steps_run.get(prompt, 0) <= 1
    else:  # stored before the first step: no step runs
        assert (kind, payload[0]) == ("error", "GenerationCancelled"), (moment, kind, payload)
        assert engine.steps_run.get(prompt, 0) == 0 and progress == 0
    if moment == "after_the_end" or rng.random() < 0.3:  # late messages for a call that answered
        parent.send((call_id, "flags", [True]))
        parent.send((call_id, "ack", (0, [True])))


@pytest.mark.parametrize("seed", range(RUNS))
def test_random_worker_cancels_stop_in_time_and_leave_nothing_behind(seed: int) -> None:
    rng = random.Random(seed)
    engine = GatedEngine()
    parent = Parent(engine, followers=rng.choice([0, 0, 1]))
    started: list[bool] = []

    def start() -> None:  # the receive loop starts with the first call (its messages then wait in the pipe)
        if not started:
            started.append(True)
            parent.start()

    if rng.random() < 0.5:
        start()
    ids = list(range(1, rng.randint(2, 6)))
    try:
        for call_id in ids:
            run_worker_call(parent, engine, rng, call_id, start)
        parent.round_trip()
        assert not set(parent.worker.calls) & set(ids), parent.worker.calls
        for _ in parent.mirrored:  # every answer the other rank sent was read by rank 0
            assert parent.answered.acquire(timeout=BOUND)
        assert not parent.unread_follower_answers()
    finally:
        start()
        parent.close()
