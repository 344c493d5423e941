"""The job core against a fake engine whose steps the test drives: each failure that once hung a request
or killed a worker, reproduced deterministically (events and gates, never sleeps)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fluxserve.generation import GenerationParams
from fluxserve.models.registry import resolve_model
from fluxserve.scheduler.jobs import FINISHED, TERMINAL_EVENTS, IllegalTransition, Job, JobError, JobStatus
from fluxserve.scheduler.scheduler import Scheduler
from fluxserve.settings import Settings
from tests.scheduler.fake_engine import BOUND, FakeEngine, FakeModel, Stuck, loop_turn

SPEC = resolve_model("tiny-flux")
OTHER = resolve_model("tiny-qwen")


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": "tiny-flux", "device": "cpu", "_env_file": None, "max_batch": 4}
    values.update(overrides)
    return Settings(**values)


def params(steps: int = 3, width: int = 64, model: str = SPEC.key) -> GenerationParams:
    return GenerationParams(model, width, 64, steps, 0.0, 32)


def job(steps: int = 3, *, spec: Any = SPEC, n: int = 1, width: int = 64, **fields: Any) -> Job:
    return Job(spec=spec, params=params(steps, width, spec.key), prompt="p", seeds=list(range(n)), **fields)


def ended(j: Job) -> JobStatus:
    if not j.wait(BOUND):
        raise Stuck(f"job {j.id} never ended (status {j.status})")
    return j.status


class Hooks:
    """Records the scheduler's hook events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.on: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._seen: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((name, data))
            self._seen.setdefault(name, threading.Event()).set()
        action = self.on.get(name)
        if action is not None:
            action(data)

    def wait(self, name: str) -> None:
        with self._lock:
            seen = self._seen.setdefault(name, threading.Event())
        if not seen.wait(BOUND):
            raise Stuck(f"no {name} event")


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., tuple[Scheduler, FakeEngine, Hooks]]]:
    made: list[Scheduler] = []

    def make(engines: int = 1, hold_loads: bool = False, preload: tuple[str, ...] = (SPEC.key,),
             **overrides: Any) -> tuple[Scheduler, FakeEngine, Hooks]:
        fakes = [FakeEngine(f"fake:{i}", hold_loads=hold_loads) for i in range(engines)]
        for fake in fakes:
            for key in preload:
                fake.models[key] = FakeModel(resolve_model(key))
        hooks = Hooks()
        scheduler = Scheduler(settings(**overrides), fakes, hook=hooks)
        scheduler.start()
        made.append(scheduler)
        return scheduler, fakes[0], hooks

    yield make
    for scheduler in made:
        for engine in scheduler.engines:
            for call in list(getattr(engine, "all_calls", [])):
                if not call.ended.is_set():
                    call.run_free()
        scheduler.drain(0)
        scheduler.shutdown()


# --- the state machine ---------------------------------------------------------------------------------
def test_illegal_transitions_raise_and_terminal_states_win_once() -> None:
    j = job()
    with pytest.raises(IllegalTransition):
        j.transition(JobStatus.SUCCEEDED)  # queued → succeeded skips running
    assert j.transition(JobStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        j.transition(JobStatus.EXPIRED)  # only a queued job expires
    assert j.transition(JobStatus.CANCELLED, error=JobError("x", code="cancelled", status=409))
    assert not j.transition(JobStatus.SUCCEEDED)  # the race is lost, nothing changes
    assert not j.transition(JobStatus.RUNNING)
    assert j.status is JobStatus.CANCELLED and j.error is not None and j.error.code == "cancelled"


def test_listeners_see_the_job_done_and_late_subscribers_are_answered_at_once() -> None:
    """Failure 3: listeners ran before the done flag was set, so a waiter added in between waited forever."""
    j = job()
    seen_done: list[bool] = []
    late: list[dict[str, Any]] = []

    def listener(event: dict[str, Any]) -> None:
        if event["type"] == "succeeded":
            seen_done.append(j.finished)  # the done flag is already set when listeners run
            late.append(j.final_event or {})  # a subscriber arriving now finds the end waiting for it

    j.add_listener(listener)
    j.transition(JobStatus.RUNNING)
    j.transition(JobStatus.SUCCEEDED)
    assert seen_done == [True] and late[0]["type"] == "succeeded"
    assert j.listener_count == 0  # nothing outlives the end

    async def subscribe_after_the_end() -> list[str]:
        async with j.subscribe() as events:
            return [event["type"] async for event in events]

    assert asyncio.run(subscribe_after_the_end()) == ["succeeded"]
    assert asyncio.run(asyncio.wait_for(j.done(), BOUND)) is None


def test_a_slow_subscriber_loses_progress_events_never_the_end() -> None:
    j = job()

    async def run() -> list[str]:
        async with j.subscribe() as events:
            j.transition(JobStatus.RUNNING)
            for step in range(500):
                j.emit({"type": "progress", "step": step})
            j.transition(JobStatus.SUCCEEDED)
            await loop_turn()  # let the loop deliver what the "thread" pushed
            return [event["type"] async for event in events]

    kinds = asyncio.run(run())
    assert kinds[-1] == "succeeded" and kinds.count("succeeded") == 1
    assert len(kinds) <= 64


# --- numbered failures ---------------------------------------------------------------------------------
def test_cancel_while_the_slot_waits_for_company_does_not_kill_the_slot(make_scheduler: Any) -> None:
    """Failure 1: the slot thread raised on a job cancelled while it waited FLUX_BATCH_WAIT_MS."""
    scheduler, engine, hooks = make_scheduler(batch_wait_ms=60_000)
    waiting = threading.Event()
    hooks.on["batch_waiting"] = lambda _data: waiting.set()
    first = scheduler.submit(job())
    assert waiting.wait(BOUND)
    scheduler.cancel(first.id)
    assert ended(first) is JobStatus.CANCELLED
    second = scheduler.submit(job(steps=1, width=128))  # nothing to wait for: max_batch reached by n=4
    second_batch = job(steps=1, width=128, n=3)
    scheduler.submit(second_batch)
    engine.next_call().advance()
    assert ended(second) is JobStatus.SUCCEEDED and ended(second_batch) is JobStatus.SUCCEEDED
    assert scheduler.readiness_problems() == []


def test_cancel_right_after_the_slot_took_the_job_ends_it(make_scheduler: Any) -> None:
    """Failure 2: a cancel landing after the slot took the job off the queue left it 'queued' forever."""
    scheduler, engine, hooks = make_scheduler()
    holder: list[Job] = []
    hooks.on["batch_taken"] = lambda _data: scheduler.cancel(holder[0].id)  # between take and run
    j = job()
    holder.append(j)
    scheduler.submit(j)
    assert ended(j) is JobStatus.CANCELLED
    assert engine.all_calls == []  # it never reached the engine
    assert j.error is not None and j.error.status == 409 and j.error.code == "cancelled"


def test_cancel_of_a_running_job_ends_it_within_one_step(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler()
    j = scheduler.submit(job(steps=10))
    call = engine.next_call()
    call.advance(4)  # parked at step 5's gate
    scheduler.cancel(j.id)
    assert not j.finished  # running jobs stop at the next step, not before
    call.advance()
    assert ended(j) is JobStatus.CANCELLED
    assert j.cancel_step is not None and j.step - j.cancel_step <= 1


class InThread:
    """Runs a blocking scheduler call (an unload, a release) in a thread; :meth:`result` joins it."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self._value: list[Any] = []
        self._thread = threading.Thread(target=lambda: self._value.append(target()), daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join(BOUND)
        if self._thread.is_alive():
            raise Stuck("the call never returned")
        return self._value[0]


def test_unload_waits_for_the_running_batch_and_queued_jobs_reload_the_model_once(make_scheduler: Any) -> None:
    """Failure 5: queued jobs waited for a model nobody reloaded, until they expired with 504. And the unload
    did not wait for the batch running on the model: the queued job's reload made a second copy resident
    while the first was still in use."""
    scheduler, engine, hooks = make_scheduler()
    running = scheduler.submit(job(steps=2, width=64))
    call = engine.next_call()
    queued = scheduler.submit(job(steps=1, width=128))
    model = engine.get(SPEC.key)
    unload = InThread(lambda: scheduler.unload(SPEC.key))
    hooks.wait("unload_waiting")  # it waits for the running batch, which keeps its model
    assert engine.get(SPEC.key) is model and queued.status is JobStatus.QUEUED
    call.run_free()
    assert ended(running) is JobStatus.SUCCEEDED
    assert unload.result() == ["fake:0"]
    engine.next_call().run_free()
    assert ended(queued) is JobStatus.SUCCEEDED
    assert engine.loads == [SPEC.key]  # loaded again for the queued job, once
    assert engine.most_resident[SPEC.key] == 1


def test_unload_while_a_batch_forms_never_runs_the_batch_on_the_unloaded_model(make_scheduler: Any) -> None:
    """``_next_batch`` took the model, waited for company with the lock released and ran the batch on the old
    object after an unload: a worker process answers "not loaded" (500), an in-process engine holds two copies
    while the queued jobs' reload finishes. The batch must go back to the queue and run on the reload."""
    clock = [0.0]
    scheduler, engine, hooks = make_scheduler(hold_loads=True, batch_wait_ms=1000, max_batch=2)
    scheduler._clock = lambda: clock[0]
    first = scheduler.submit(job(steps=1))
    hooks.wait("batch_waiting")
    assert InThread(lambda: scheduler.unload(SPEC.key)).result() == ["fake:0"]
    clock[0] = 10.0  # the company wait is over; the submit below wakes the slot
    second = scheduler.submit(job(steps=1))
    engine.release_load()
    call = engine.next_call()
    call.run_free()
    assert ended(first) is ended(second) is JobStatus.SUCCEEDED, (first.error, second.error)
    assert call.size == 2 and engine.loads == [SPEC.key] and engine.most_resident[SPEC.key] == 1


def test_release_waits_for_running_batches_and_keeps_what_it_is_told_to(make_scheduler: Any) -> None:
    scheduler, engine, hooks = make_scheduler(preload=(SPEC.key, OTHER.key), max_concurrent=2)
    running = scheduler.submit(job(steps=2, spec=OTHER))
    call = engine.next_call()
    release = InThread(lambda: scheduler.release({SPEC.key}))
    hooks.wait("unload_waiting")
    assert engine.get(OTHER.key) is not None  # still in use
    kept = scheduler.submit(job(steps=1))  # a model the release keeps serves on meanwhile
    other = engine.next_call()
    other.run_free()
    assert ended(kept) is JobStatus.SUCCEEDED
    call.run_free()
    assert release.result() == [OTHER.key]
    assert ended(running) is JobStatus.SUCCEEDED
    assert sorted(engine.loaded()) == [SPEC.key] and engine.most_resident[OTHER.key] == 1


def test_a_slot_keeps_no_reference_to_the_model_of_its_last_batch(make_scheduler: Any) -> None:
    """The slot loop kept its last model in a local variable while it waited for the next batch: after an
    unload the weights stayed in memory (and freed_bytes said so) until another batch came."""
    import gc
    import weakref

    scheduler, engine, _ = make_scheduler()
    j = scheduler.submit(job(steps=1))
    engine.next_call().run_free()
    assert ended(j) is JobStatus.SUCCEEDED
    model = weakref.ref(engine.models[SPEC.key])
    assert scheduler.unload(SPEC.key) == ["fake:0"]
    gc.collect()
    assert model() is None


def test_a_model_that_cannot_load_fails_its_queued_jobs_fast(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler(preload=())
    engine.load_failures.add(OTHER.key)
    j = scheduler.submit(job(spec=OTHER))
    assert ended(j) is JobStatus.FAILED
    assert j.error is not None and j.error.status == 503 and j.error.code == "model_unavailable"


def test_max_queue_zero_still_runs_a_job_on_an_idle_slot(make_scheduler: Any) -> None:
    """Failure 7: FLUX_MAX_QUEUE=0 refused every request even with idle slots."""
    scheduler, engine, _ = make_scheduler(max_queue=0)
    j = scheduler.submit(job(steps=1))
    call = engine.next_call()
    with pytest.raises(JobError) as refused:  # the one slot is busy and nothing may wait
        scheduler.submit(job(steps=1, width=128))
    assert refused.value.status == 429 and refused.value.retry_after is not None
    call.advance()
    assert ended(j) is JobStatus.SUCCEEDED


def test_an_exception_anywhere_in_the_slot_loop_fails_the_batch_and_the_slot_serves_on(make_scheduler: Any) -> None:
    scheduler, engine, hooks = make_scheduler()

    def explode(_data: dict[str, Any]) -> None:
        raise RuntimeError("a bug outside the engine")

    hooks.on["batch_started"] = explode
    first = scheduler.submit(job(steps=1))
    assert ended(first) is JobStatus.FAILED
    assert first.error is not None and first.error.status == 500 and first.error.code == "internal_error"
    del hooks.on["batch_started"]
    second = scheduler.submit(job(steps=1))
    engine.next_call().advance()
    assert ended(second) is JobStatus.SUCCEEDED
    assert scheduler.readiness_problems() == []


def test_a_failing_batch_is_retried_job_by_job_so_only_the_culprit_fails(make_scheduler: Any) -> None:
    scheduler, engine, _hooks = make_scheduler(batch_wait_ms=60_000, max_batch=2)
    good, bad = job(steps=1), job(steps=1)
    bad.seeds = [99]
    scheduler.submit(good)
    scheduler.submit(bad)
    batch = engine.next_call()
    assert batch.size == 2
    batch.fail_with(TypeError("one request's input broke the batch"))
    for _ in range(2):  # then each job alone, one after the other
        call = engine.next_call()
        if call.requests[0].seeds == [99]:
            call.fail_with(TypeError("still broken alone"))
        else:
            call.run_free()
        call.wait_ended()
    statuses = sorted([ended(good).value, ended(bad).value])
    assert statuses == ["failed", "succeeded"]


def test_a_job_that_waits_too_long_expires(make_scheduler: Any) -> None:
    clock = [0.0]
    scheduler, engine, _ = make_scheduler(queue_timeout=5)
    scheduler._clock = lambda: clock[0]  # the scheduler's own clock: no real waiting
    blocker = scheduler.submit(job(steps=1))
    call = engine.next_call()
    waiting = scheduler.submit(job(steps=1, width=128))
    clock[0] = 6.0
    assert scheduler.expire_queued() == 1
    assert ended(waiting) is JobStatus.EXPIRED and waiting.error is not None and waiting.error.status == 504
    call.advance()
    assert ended(blocker) is JobStatus.SUCCEEDED


def test_a_stalled_worker_makes_readiness_fail(make_scheduler: Any) -> None:
    clock = [0.0]
    scheduler, engine, _ = make_scheduler(stall_timeout=30)
    scheduler._clock = lambda: clock[0]
    j = scheduler.submit(job(steps=2))
    call = engine.next_call()
    assert scheduler.readiness_problems() == []
    clock[0] = 31.0
    assert any("no progress" in problem for problem in scheduler.readiness_problems())
    call.run_free()
    assert ended(j) is JobStatus.SUCCEEDED


def test_job_ids_are_unguessable_and_labels_are_per_owner(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler()
    a = scheduler.submit(job(steps=1, request_id="same", owner="alice"))
    b = scheduler.submit(job(steps=1, width=128, request_id="same", owner="bob"))  # another owner's label
    assert a.id != "same" and len(a.id) >= 32 and a.id != b.id
    with pytest.raises(JobError) as duplicate:
        scheduler.submit(job(steps=1, request_id="same", owner="alice"))
    assert duplicate.value.status == 409
    table = scheduler.table
    assert table.find("same", "alice") is a and table.find("same", "bob") is b
    assert table.get(a.id, "bob") is None and table.get(a.id, "alice") is a
    for _ in range(2):
        engine.next_call().run_free()
    assert ended(a) is JobStatus.SUCCEEDED and ended(b) is JobStatus.SUCCEEDED


def test_finished_jobs_without_results_leave_the_table_at_once(make_scheduler: Any) -> None:
    scheduler, _engine, _ = make_scheduler()
    jobs = [scheduler.submit(job(steps=1, width=64 + 16 * i)) for i in range(20)]
    running = _engine.next_call()
    for j in jobs:
        scheduler.cancel(j.id)
    running.run_free()  # the running one stops at its next step
    for j in jobs:
        assert ended(j) in FINISHED and j.wait_delivered(BOUND)  # the table hears of the end right after it
    assert len(scheduler.table) == 0
    stone = scheduler.table.tombstone(jobs[-1].id, None)
    assert stone is not None and stone.summary["status"] == "cancelled" and "prompt" not in stone.summary


def test_drain_ends_every_job(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler()
    running = scheduler.submit(job(steps=5))
    engine.next_call()
    queued = [scheduler.submit(job(steps=1, width=80 + 16 * i)) for i in range(3)]
    scheduler.stop_accepting()
    with pytest.raises(JobError) as refused:
        scheduler.submit(job())
    assert refused.value.status == 503
    assert scheduler.drain(0) == 4
    for j in [running, *queued]:
        assert ended(j) is JobStatus.CANCELLED and j.error is not None and j.error.code == "shutting_down"


def test_two_engines_run_two_jobs_at_once_and_one_engine_runs_them_in_turn(make_scheduler: Any) -> None:
    scheduler, _engine, _ = make_scheduler(engines=2)
    a, b = scheduler.submit(job(steps=1)), scheduler.submit(job(steps=1, width=128))
    first, second = (engine.next_call() for engine in scheduler.engines)  # both parked at once: in parallel
    first.run_free()
    second.run_free()
    assert ended(a) is ended(b) is JobStatus.SUCCEEDED

    single, engine, _ = make_scheduler(engines=1)
    c, d = single.submit(job(steps=1)), single.submit(job(steps=1, width=128))
    call = engine.next_call()
    assert d.status is JobStatus.QUEUED and d.queue_position == 1  # waits while the one worker is busy
    call.run_free()
    engine.next_call().run_free()
    assert ended(c) is ended(d) is JobStatus.SUCCEEDED


def test_incompatible_jobs_are_not_batched(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler()
    blocker = scheduler.submit(job(steps=1, width=256))
    held = engine.next_call()
    same = [scheduler.submit(job(steps=1)) for _ in range(2)]
    other = scheduler.submit(job(steps=2))
    held.run_free()
    batch = engine.next_call()
    batch.run_free()
    assert batch.size == 2 and {r.seeds[0] for r in batch.requests} == {0}
    engine.next_call().run_free()
    assert all(ended(j) is JobStatus.SUCCEEDED for j in [blocker, *same, other])


def test_loading_one_model_does_not_stop_another_from_generating(make_scheduler: Any) -> None:
    scheduler, engine, _ = make_scheduler(hold_loads=True)
    waiting = scheduler.submit(job(spec=OTHER))  # its load is held at the gate
    served = scheduler.submit(job(steps=1))
    engine.next_call().run_free()
    assert ended(served) is JobStatus.SUCCEEDED and waiting.status is JobStatus.QUEUED
    engine.release_load()
    engine.next_call().run_free()
    assert ended(waiting) is JobStatus.SUCCEEDED and engine.loads == [OTHER.key]


def test_jobs_batch_only_with_the_same_adapter_set_and_scales(make_scheduler: Any) -> None:
    from dataclasses import replace

    scheduler, engine, _ = make_scheduler()
    blocker = scheduler.submit(job(steps=1, width=256))
    held = engine.next_call()

    def with_loras(loras: tuple[tuple[str, float], ...]) -> Job:
        made = job(steps=1)
        made.params = replace(made.params, loras=loras)
        return made

    same = [scheduler.submit(with_loras((("a", 1.0),))) for _ in range(2)]
    weaker = scheduler.submit(with_loras((("a", 0.5),)))
    plain = scheduler.submit(job(steps=1))
    held.run_free()
    calls = []
    for _ in range(3):
        call = engine.next_call()
        calls.append((call.params.loras, call.size))
        call.run_free()
    assert sorted(calls) == [((), 1), ((("a", 0.5),), 1), ((("a", 1.0),), 2)]
    assert all(ended(j) is JobStatus.SUCCEEDED for j in [blocker, *same, weaker, plain])


# --- ordered, total events -----------------------------------------------------------------------------
class Recorder:
    """A thread-side listener that records each event type, in the order it was called."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.started = threading.Event()
        self.ended = threading.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.kinds.append(event["type"])
        if event["type"] == "started":
            self.started.set()
        if event["type"] in TERMINAL_EVENTS:
            self.ended.set()

    def wait_ended(self) -> list[str]:
        """The events up to the terminal one (a job is done before its listeners hear of it)."""
        if not self.ended.wait(BOUND):
            raise Stuck(f"no terminal event after {self.kinds}")
        return self.kinds


def test_queued_reaches_listeners_before_started(make_scheduler: Any) -> None:
    """``submit`` emitted ``queued`` after releasing the scheduler's lock: an idle slot could start the job
    first, and a stream showed ``queued`` after ``started``. The hook below holds the submitting thread right
    after the lock until the job runs: the ``queued`` event must already be out by then."""
    scheduler, engine, hooks = make_scheduler()
    recorder = Recorder()
    hooks.on["job_queued"] = lambda _data: recorder.started.wait(BOUND)
    j = job(steps=1)
    j.add_listener(recorder)
    scheduler.submit(j)
    engine.next_call().run_free()
    assert ended(j) is JobStatus.SUCCEEDED
    kinds = recorder.wait_ended()
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "succeeded" and kinds.count("succeeded") == 1, kinds


def test_a_raising_listener_is_logged_and_cannot_change_the_jobs_fate(make_scheduler: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raised on ``started`` escaped from ``_next_batch`` after the job was marked running but
    before it was recorded on its slot: the job stayed ``running`` in no structure, ``wait`` never returned."""
    scheduler, engine, _ = make_scheduler()
    later = Recorder()

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError(f"a broken listener ({event['type']})")

    j = job(steps=2)
    j.add_listener(broken)
    j.add_listener(later)  # registered after the broken one: still called, in order
    scheduler.submit(j)
    engine.next_call().run_free()
    assert ended(j) is JobStatus.SUCCEEDED
    assert later.wait_ended() == ["queued", "started", "progress", "progress", "succeeded"]
    assert "a broken listener" in caplog.text and scheduler.readiness_problems() == []
    assert all(slot.crashes == 0 for slot in scheduler._slots)


def test_a_job_is_where_drain_finds_it_before_it_is_marked_running(make_scheduler: Any) -> None:
    """Drain (and cancel) find a running job through its slot. A listener of ``started`` looks for the job
    there; and when a listener raises, drain still cancels the job instead of leaving it running."""
    scheduler, engine, _ = make_scheduler()
    found: list[bool] = []

    def look(event: dict[str, Any]) -> None:
        if event["type"] == "started":
            found.append(any(j in slot.batch for slot in scheduler._slots))
            raise RuntimeError("a broken listener")

    j = job(steps=5)
    j.add_listener(look)
    scheduler.submit(j)
    engine.next_call()  # parked before its first step
    assert found == [True]
    assert scheduler.drain(0) == 1
    assert ended(j) is JobStatus.CANCELLED and j.error is not None and j.error.code == "shutting_down"


def test_events_from_two_threads_reach_every_listener_in_one_order() -> None:
    """A progress event and the terminal event of one job can be emitted by two threads at once (a slot, and
    drain). Each listener must see them in the order the job changed: nothing after the terminal event."""
    j = job()
    j.transition(JobStatus.RUNNING)
    recorder = Recorder()
    in_progress, terminal_emitted = threading.Event(), threading.Event()

    def slow(event: dict[str, Any]) -> None:  # holds the slot thread inside its progress delivery
        if event["type"] == "progress" and not in_progress.is_set():
            in_progress.set()
            assert terminal_emitted.wait(BOUND)

    j.add_listener(slow)
    j.add_listener(recorder)
    slot = threading.Thread(target=lambda: [j.emit({"type": "progress", "step": s}) for s in (1, 2)])
    slot.start()
    assert in_progress.wait(BOUND)
    j.transition(JobStatus.CANCELLED, error=JobError("x", code="cancelled", status=409))  # "drain", elsewhere
    terminal_emitted.set()
    slot.join(BOUND)
    assert recorder.kinds == ["progress", "cancelled"], recorder.kinds
