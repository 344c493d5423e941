"""Seeded random interleavings of submit, batching, steps, cancel, disconnect, unload, release and shutdown
against the real scheduler and a fake engine. After every run: each accepted job reached exactly one
terminal state, no worker died, no waiter waited past its bound, and nothing stayed behind (no queued
job, no job in the table, no listener)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest

from fluxserve.api.serving import ImageService
from fluxserve.generation import GenerationParams
from fluxserve.models.registry import resolve_model
from fluxserve.scheduler.jobs import FINISHED, TERMINAL_EVENTS, Job, JobError
from fluxserve.scheduler.scheduler import Scheduler
from fluxserve.settings import Settings
from tests.scheduler.fake_engine import BOUND, Call, FakeEngine, FakeModel, Stuck, loop_turn

MODELS = [resolve_model("tiny-flux"), resolve_model("tiny-qwen")]
RUNS = 60


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.settings = Settings(model="tiny-flux", device="cpu", _env_file=None, max_queue=rng.choice([0, 2, 6]),
                                 max_concurrent=rng.choice([1, 2]), max_batch=rng.choice([1, 2, 4]),
                                 batch_wait_ms=rng.choice([0, 0, 5]), max_queued_per_key=rng.choice([0, 3]))
        self.engines = [FakeEngine(f"fake:{i}") for i in range(rng.choice([1, 2]))]
        broken = rng.random() < 0.3  # some runs cannot load the second model: its jobs fail with 503
        for engine in self.engines:
            engine.models[MODELS[0].key] = FakeModel(MODELS[0])
            if broken:
                engine.load_failures.add(MODELS[1].key)
        self.scheduler = Scheduler(self.settings, self.engines)
        self.service = ImageService(SimpleNamespace(settings=self.settings, scheduler=self.scheduler))  # type: ignore[arg-type]
        self.jobs: list[Job] = []
        self.terminal_events: dict[str, int] = {}
        self.calls: list[Call] = []
        self.waiters: list[asyncio.Task[bool]] = []
        self.disconnects: list[asyncio.Future[None]] = []
        self.readers: list[asyncio.Task[list[str]]] = []

    # --- operations ------------------------------------------------------------------------------
    def submit(self) -> None:
        rng = self.rng
        spec = rng.choice(MODELS)
        params = GenerationParams(spec.key, rng.choice([64, 128]), 64, rng.randint(1, 3), 0.0, 32)
        job = Job(spec=spec, params=params, prompt="p", seeds=[rng.randrange(1000) for _ in range(rng.choice([1, 2]))],
                  owner=rng.choice([None, "a", "b"]), request_id=rng.choice([None, None, "label"]))

        def count(event: dict[str, Any], job_id: str = job.id) -> None:
            if event["type"] in TERMINAL_EVENTS:
                self.terminal_events[job_id] = self.terminal_events.get(job_id, 0) + 1

        job.add_listener(count)
        try:
            self.scheduler.submit(job)
        except JobError as refused:
            assert refused.status in (409, 429), refused.message
            assert self.scheduler.table.get(job.id, job.owner) is None  # a refused job leaves no trace
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

    def cancel(self) -> None:
        if self.jobs:
            self.scheduler.cancel(self.rng.choice(self.jobs).id)

    def disconnect(self) -> None:
        live = [gone for gone in self.disconnects if not gone.done()]
        if live:
            self.rng.choice(live).set_result(None)

    def unload(self) -> None:
        self.scheduler.unload(self.rng.choice(MODELS).key)

    def release(self) -> None:
        for engine in self.engines:
            engine.release(set())
        self.scheduler.unload_done()

    # --- the end ---------------------------------------------------------------------------------
    async def finish(self) -> None:
        scheduler = self.scheduler
        if self.rng.random() < 0.5:  # a shutdown in the middle of everything
            scheduler.stop_accepting()
            scheduler.drain(0)
        for _ in range(1000):  # let every call run out; jobs end one way or another
            self.collect_calls()
            for call in self.calls:
                call.run_free()
            if all(job.finished for job in self.jobs):
                break
            await asyncio.get_running_loop().run_in_executor(None, self._wait_any_job)
        assert all(job.finished for job in self.jobs), [job.status for job in self.jobs if not job.finished]
        for gone in self.disconnects:
            if not gone.done():
                gone.set_result(None)
        await asyncio.wait_for(asyncio.gather(*self.waiters, *self.readers), BOUND)
        for reader in self.readers:
            kinds = reader.result()
            assert kinds[-1] in TERMINAL_EVENTS and sum(kind in TERMINAL_EVENTS for kind in kinds) == 1

    def _wait_any_job(self) -> None:
        for job in self.jobs:
            if not job.finished:
                job.wait(0.05)  # a bounded wait on the job's own event: returns as soon as it ends
                return

    def check(self) -> None:
        assert self.scheduler.readiness_problems() == []  # no worker died
        for job in self.jobs:
            assert job.status in FINISHED
            assert self.terminal_events.get(job.id) == 1, (job.id, self.terminal_events.get(job.id))
            assert job.listener_count == 0
        assert not self.scheduler._pending
        self.scheduler.table.sweep()
        assert len(self.scheduler.table) == 0


@pytest.mark.parametrize("seed", range(RUNS))
async def test_random_interleavings_keep_every_invariant(seed: int) -> None:
    run = Run(seed)
    run.scheduler.start()
    operations = [run.submit] * 5 + [run.step] * 6 + [run.cancel] * 2 + [run.disconnect, run.unload, run.release]
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
