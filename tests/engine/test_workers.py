"""A process per device (FLUX_WORKER_PROCESSES=1): real spawned worker processes with the tiny model behind
the real scheduler and app. Kill, cancel and progress are synchronized on job events, never on time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.workers import ProcessEngine, WorkerCrashed, WorkerError, _rebuild_error
from fluxserve.generation import BadOutput, GenerationCancelled, GenerationParams, ImageRequest, OutOfMemory
from fluxserve.models.registry import resolve_model
from fluxserve.scheduler.jobs import Job, JobStatus
from fluxserve.scheduler.scheduler import Scheduler
from tests.conftest import assert_same_image_within_rounding
from tests.engine.fake_worker import GatedEngine, Parent, params, wire

GEN = "/v1/images/generations"
WAIT = 300  # seconds: only a bound against a hang, never a threshold a test asserts


@pytest.fixture(scope="module")
def scheduler(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    """One worker process behind the real scheduler, shared by the tests that kill it or cancel inside it
    (each leaves it serving: a killed worker is restarted)."""
    from fluxserve.settings import Settings

    work = tmp_path_factory.mktemp("worker-scheduler")
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=work / "outputs",  # type: ignore[call-arg]
                        state_dir=work / "state", device="cpu", hub_downloads="off", worker_processes=True,
                        max_batch=1, warmup_enable=False, _env_file=None)
    engine = ProcessEngine(settings.engine, select_device_dtype("cpu"), torch_threads=1)
    scheduler = Scheduler(settings.scheduler, [engine])
    scheduler.start()
    scheduler.ensure_loaded(resolve_model("tiny-flux"), wait=True, timeout=WAIT)
    yield scheduler
    scheduler.shutdown()
    engine.close()


def _job(steps: int, seed: int = 1) -> Job:
    spec = resolve_model("tiny-flux")
    return Job(spec=spec, params=GenerationParams(spec.key, 64, 64, steps, 0.0, 32), prompt="a fox", seeds=[seed])


def test_killed_worker_fails_its_job_and_the_next_job_runs_after_restart(scheduler: Scheduler) -> None:
    engine = scheduler.engines[0]
    assert isinstance(engine, ProcessEngine)
    first_pid, restarts = engine.pid, engine.restarts
    assert first_pid is not None
    mid_job, killed = threading.Event(), threading.Event()

    def hold_at_first_step(event: dict[str, Any]) -> None:
        # runs in the slot thread inside the progress callback: the worker waits for its ack meanwhile
        if event.get("type") == "progress" and not mid_job.is_set():
            mid_job.set()
            killed.wait(WAIT)

    job = _job(steps=8)
    job.add_listener(hold_at_first_step)
    scheduler.submit(job)
    assert mid_job.wait(WAIT)
    os.kill(first_pid, signal.SIGKILL)
    killed.set()
    assert job.wait(WAIT)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and job.error.status == 500 and "WorkerCrashed" in job.error.message

    after = _job(steps=2, seed=2)
    scheduler.submit(after)  # waits in the queue until the restarted worker has loaded the model again
    assert after.wait(WAIT)
    assert after.status == JobStatus.SUCCEEDED, after.error
    assert after.result is not None and after.result.images[0].shape == (64, 64, 3)
    assert engine.pid not in (None, first_pid) and engine.restarts == restarts + 1


HEARTBEAT_TIMEOUT = 3.0  # seconds of silence before the supervisor replaces a worker (15 by default)


def _reaped(pid: int) -> bool:
    import psutil

    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_hung_worker_is_replaced_its_job_ends_and_the_queue_goes_on(app_factory: Callable[..., Any]) -> None:
    """A worker stopped (SIGSTOP) mid-job used to leave the job running for good: a cancel could not reach it,
    queued jobs waited, and nothing restarted it. Twice: a hung job fails with 503 ``worker_unresponsive``;
    a hung job cancelled meanwhile ends cancelled. Each time the job queued behind it succeeds on the new
    worker, /ready answers 200 and the stopped process is gone. Synchronized on job events, never on time."""
    import psutil

    stopped_pids: list[int] = []
    async with app_factory(worker_processes=True, worker_heartbeat_timeout=HEARTBEAT_TIMEOUT, max_batch=1,
                           warmup_enable=False) as client:
        scheduler = client.app.state.runtime.scheduler  # type: ignore[attr-defined]
        engine = scheduler.engines[0]
        assert isinstance(engine, ProcessEngine)
        try:
            for round_, cancel in enumerate((False, True)):
                pid, restarts = engine.pid, engine.restarts
                assert pid is not None
                stopped = threading.Event()

                def stop_at_first_step(event: dict[str, Any], pid: int = pid, stopped: threading.Event = stopped
                                       ) -> None:
                    # the slot thread, inside the progress callback: the worker waits for its ack meanwhile
                    if event.get("type") == "progress" and not stopped.is_set():
                        os.kill(pid, signal.SIGSTOP)
                        stopped_pids.append(pid)
                        stopped.set()

                hung = _job(steps=8, seed=10 * round_)
                hung.add_listener(stop_at_first_step)
                scheduler.submit(hung)
                assert await asyncio.to_thread(stopped.wait, WAIT)
                queued = scheduler.submit(_job(steps=2, seed=10 * round_ + 1))
                if cancel:
                    deleted = await client.delete(f"/v1/images/jobs/{hung.id}")
                    assert deleted.status_code == 200, deleted.text
                assert await asyncio.to_thread(hung.wait, WAIT)
                if cancel:
                    assert hung.status is JobStatus.CANCELLED, hung.error
                else:
                    assert hung.status is JobStatus.FAILED and hung.error is not None
                    assert (hung.error.status, hung.error.code) == (503, "worker_unresponsive")
                    assert "FLUX_WORKER_HEARTBEAT_TIMEOUT" in hung.error.message
                    polled = (await client.get(f"/v1/images/jobs/{hung.id}")).json()
                    assert polled["status"] == "failed" and polled["error"]["code"] == "worker_unresponsive"
                assert await asyncio.to_thread(queued.wait, WAIT)
                assert queued.status is JobStatus.SUCCEEDED, queued.error
                assert queued.result is not None and queued.result.images[0].shape == (64, 64, 3)
                assert engine.restarts == restarts + 1 and engine.pid not in (None, pid)
                assert _reaped(pid)
                ready = await client.get("/ready")
                assert ready.status_code == 200, ready.text
        finally:
            for pid in stopped_pids:  # whatever happened above, no stopped worker outlives the test
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if psutil.Process(pid).ppid() == os.getpid():
                        os.kill(pid, signal.SIGKILL)


def test_a_release_while_a_batch_forms_fails_no_job(make_settings: Callable[..., Any]) -> None:
    """A release racing with jobs failed them with 500 "not loaded": the scheduler handed the model it had
    taken before the release to the batch, and the worker (which looks the model up by key) no longer had
    it. Here a batch is forming (waiting for company) when the release comes, and its wait ends before the
    queued jobs' reload is done: the batch must wait for the model instead of running without it."""
    from fluxserve.catalog import LocalCatalog
    from fluxserve.observability.metrics import Metrics

    settings = make_settings(worker_processes=True, max_batch=2, batch_wait_ms=1000, warmup_enable=False)
    forming = threading.Event()
    clock = [0.0]  # the scheduler's clock: the company wait ends when the test says so
    engine = ProcessEngine(settings.engine, select_device_dtype("cpu"), torch_threads=1)
    scheduler = Scheduler(settings.scheduler, [engine], clock=lambda: clock[0],
                          hook=lambda name, _data: forming.set() if name == "batch_waiting" else None)
    catalog = LocalCatalog(settings, [engine.plan], [engine], scheduler, Metrics(settings.metrics_window))
    scheduler.start()
    try:
        scheduler.ensure_loaded(resolve_model("tiny-flux"), wait=True, timeout=WAIT)
        for round_ in range(2):
            forming.clear()
            first = scheduler.submit(_job(steps=1, seed=10 * round_))
            assert forming.wait(WAIT)
            dropped, _freed = catalog.release(set())
            assert dropped == ["tiny-flux"]
            clock[0] += 10  # the company wait is over; the submit below wakes the forming batch
            second = scheduler.submit(_job(steps=1, seed=10 * round_ + 1))
            for job in (first, second):
                assert job.wait(WAIT)
                assert job.status is JobStatus.SUCCEEDED, job.error
        assert engine.get("tiny-flux") is not None  # loaded again by the queued jobs
    finally:
        scheduler.shutdown()
        engine.close()


def test_cancel_crosses_the_process_boundary_within_one_step(scheduler: Scheduler) -> None:
    steps_seen: list[int] = []

    def cancel_at_step_two(event: dict[str, Any]) -> None:
        if event.get("type") == "progress":
            steps_seen.append(event["step"])
            if event["step"] == 2:
                scheduler.cancel(job.id)  # before the parent acks step 2 to the worker

    job = _job(steps=10)
    job.add_listener(cancel_at_step_two)
    scheduler.submit(job)
    assert job.wait(WAIT)
    assert job.status == JobStatus.CANCELLED
    assert steps_seen == [1, 2]  # the worker saw the flag at the very next step and reported no more


def test_progress_and_partial_images_cross_the_boundary(make_settings: Callable[..., Any]) -> None:
    engine = ProcessEngine(make_settings().engine, select_device_dtype("cpu"), torch_threads=1)
    try:
        model, loaded_now = engine.load(resolve_model("tiny-flux"))
        assert loaded_now and engine.get("tiny-flux") is model
        seen: list[tuple[int, int, Any]] = []
        request = ImageRequest("a fox", [3, 4], on_progress=lambda s, t, p: seen.append((s, t, p)),
                               partial_images=2)
        results = engine.generate(model, GenerationParams("tiny-flux", 64, 64, 3, 0.0, 32), [request])
        assert [s for s, _, _ in seen] == [1, 2, 3] and {t for _, t, _ in seen} == {3}
        partials = [p for _, _, p in seen]
        assert partials[2] is None  # after steps 1 and 2, not the last
        assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.shape == (64, 64, 3) for p in partials[:2])
        assert results[0].seeds == [3, 4] and len(results[0].images) == 2
        assert engine.unload("tiny-flux") and engine.get("tiny-flux") is None
        with pytest.raises(Exception, match="not loaded"):
            engine.generate(model, GenerationParams("tiny-flux", 64, 64, 1, 0.0, 32), [ImageRequest("a", [1])])
    finally:
        engine.close()


def test_engine_errors_keep_their_type_across_the_boundary() -> None:
    oom = _rebuild_error("OutOfMemory", "cpu_oom: still out of memory")
    assert isinstance(oom, OutOfMemory) and oom.reason == "cpu_oom: still out of memory"
    assert isinstance(_rebuild_error("BadOutput", "nan"), BadOutput)
    assert isinstance(_rebuild_error("GenerationCancelled", "x"), GenerationCancelled)
    bug = _rebuild_error("ZeroDivisionError", "division by zero")
    assert isinstance(bug, WorkerError) and "ZeroDivisionError" in str(bug)
    assert not isinstance(bug, WorkerCrashed)


def test_injected_failures_inside_the_worker_keep_their_meaning(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(fault_injection=True, faults="error@encode:1,oom@denoise:2", oom_policy=["clear_cache"])
    engine = ProcessEngine(settings.engine, select_device_dtype("cpu"), torch_threads=1)
    try:
        model, _ = engine.load(resolve_model("tiny-flux"))
        params = GenerationParams("tiny-flux", 64, 64, 1, 0.0, 32)
        with pytest.raises(WorkerError, match="InjectedFault"):  # a bug-like failure: 500 in the scheduler
            engine.generate(model, params, [ImageRequest("a", [1])])
        with pytest.raises(OutOfMemory, match="cpu_oom") as oom:  # the worker's ladder ran, then gave up
            engine.generate(model, params, [ImageRequest("a", [1])])
        assert "cache cleanup" in oom.value.reason and engine.consecutive_oom_failures == 1
        result = engine.generate(model, params, [ImageRequest("a", [1])])[0]
        assert result.images[0].shape == (64, 64, 3) and engine.consecutive_oom_failures == 0
    finally:
        engine.close()


def test_a_split_group_runs_its_ranks_in_lockstep(make_settings: Callable[..., Any]) -> None:
    """A group of two ranks on CPU (gloo). diffusers' context parallelism itself needs CUDA, so the ranks
    here run the same unsplit model ("mirror"): what is tested is the group's plumbing — every call mirrored,
    cancel flags agreed at every step, a dead rank restarting the whole group."""
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.parallel import ParallelPlan

    settings = make_settings(warmup_enable=False)
    cpu = select_device_dtype("cpu")
    spec = resolve_model("tiny-flux")
    params = GenerationParams(spec.key, 64, 64, 2, 0.0, 32)
    alone = DeviceEngine(settings.engine, cpu)
    expected = alone.generate(alone.load(spec)[0], params, [ImageRequest("a fox", [5])])[0].images[0]

    engine = ProcessEngine(settings.engine, cpu, torch_threads=1, group=[cpu, cpu], split=ParallelPlan("mirror", 2))
    try:
        assert engine.device == "cpu+cpu"
        model, _ = engine.load(spec)
        assert len(engine.rank_pids) == 1
        result = engine.generate(model, params, [ImageRequest("a fox", [5])])[0]
        # one torch thread in the rank against this process's threads: the same image within rounding
        assert_same_image_within_rounding(result.images[0], expected)

        stop = threading.Event()
        steps: list[int] = []

        def progress(step: int, _total: int, _preview: Any) -> None:
            steps.append(step)
            if step == 2:
                stop.set()

        with pytest.raises(GenerationCancelled):
            engine.generate(model, GenerationParams(spec.key, 64, 64, 8, 0.0, 32),
                            [ImageRequest("a fox", [6], is_cancelled=stop.is_set, on_progress=progress)])
        assert steps == [1, 2]  # both ranks stopped at step 3: no rank was left in a collective
        assert engine.generate(model, params, [ImageRequest("a fox", [5])])[0].images[0].shape == (64, 64, 3)

        os.kill(engine.rank_pids[0], signal.SIGKILL)  # rank 1 dies: rank 0 stops, the group restarts whole
        assert engine.wait_restarted(1, timeout=WAIT)
        model, _ = engine.load(spec)
        again = engine.generate(model, params, [ImageRequest("a fox", [5])])[0]
        assert np.array_equal(again.images[0], result.images[0])  # the restarted group computes as before
    finally:
        engine.close()


def test_a_real_server_with_two_worker_processes_serves_and_leaves_no_workers(
        server_factory: Callable[..., Any]) -> None:
    """``fluxserve serve`` with FLUX_DEVICES=cpu,cpu and FLUX_WORKER_PROCESSES=1: start-up loads and warms the
    model inside two worker processes of the server's own; concurrent requests through the official client all
    succeed, a seed gives the same image whichever process runs it, and a SIGTERM ends the server with 0 and
    its workers with it."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import psutil
    from openai import OpenAI

    server = server_factory({"FLUX_DEVICES": "cpu,cpu", "FLUX_WORKER_PROCESSES": "1", "FLUX_MAX_BATCH": "1"},
                            name="workers")
    memory = httpx.get(server.base_url + "/v1/models", timeout=30).json()["runtime"]["memory"]
    assert all("worker_pid" in m for m in memory), memory
    pids = [m["worker_pid"] for m in memory]
    assert len(set(pids)) == 2 and server.proc.pid not in pids
    assert all(psutil.Process(pid).ppid() == server.proc.pid for pid in pids)  # the server's own processes
    card = httpx.get(server.base_url + "/v1/models/tiny-flux", timeout=30).json()
    assert card["loaded"] is True
    warmups = list(card["warmup"].values())  # start-up warmed the model inside the worker processes
    assert warmups and all(w["64x64"]["outcome"] == "ok" for w in warmups), card["warmup"]

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)

    def generate(seed: int) -> np.ndarray:
        data = client.images.generate(model="tiny-flux", prompt="a red fox", size="64x64", n=1,
                                      extra_body={"seed": seed, "num_inference_steps": 2}).data
        assert data and data[0].b64_json
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data[0].b64_json))))

    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(generate, range(4)))
    assert all(i.shape == (64, 64, 3) for i in images)
    assert np.array_equal(generate(0), images[0])  # same seed, whichever process runs it (one job per batch)
    assert server.stop() == 0
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


# --- cancel flags inside the worker: the test plays the parent over a real pipe ---------------------------
def test_a_cancel_that_arrives_before_the_call_thread_runs_is_kept() -> None:
    """``requests()`` reset the call's flags when the call thread got there, overwriting a cancel that the
    receive loop had stored first: the call then ran until a progress acknowledgement carried the flag."""
    engine = GatedEngine()
    engine.lookup.close()  # the call's thread waits before it builds its requests
    parent = Parent(engine)
    parent.send((1, "generate", ("m", params(5), [wire("a")])))
    parent.send((1, "flags", [True]))
    parent.start()
    parent.round_trip()  # the worker has stored the cancel
    engine.lookup.open()
    kind, payload = parent.recv(1)
    assert (kind, payload[0]) == ("error", "GenerationCancelled"), (kind, payload)
    assert engine.steps_run.get("a", 0) == 0
    parent.close()


def test_a_cancel_during_text_encoding_stops_the_call_before_its_first_step() -> None:
    engine = GatedEngine()
    engine.encode.close()
    parent = Parent(engine)
    parent.start()
    parent.send((1, "generate", ("m", params(5), [wire("a")])))
    assert engine.encode.reached.wait(20)
    parent.send((1, "flags", [True]))
    parent.round_trip()
    engine.encode.open()
    kind, payload = parent.recv(1)
    assert (kind, payload[0]) == ("error", "GenerationCancelled") and engine.steps_run["a"] == 0
    parent.close()


def test_a_cancel_during_a_split_groups_lock_wait_stops_the_call_before_any_rank_runs_it() -> None:
    engine = GatedEngine()
    parent = Parent(engine, followers=1)
    parent.start()
    parent.worker.group_lock.acquire()  # another mirrored call holds the group
    parent.send((1, "generate", ("m", params(5), [wire("a")])))
    parent.send((1, "flags", [True]))
    parent.round_trip()  # memory is not mirrored: it answers while the group is busy
    parent.worker.group_lock.release()
    kind, payload = parent.recv(1)
    assert (kind, payload[0]) == ("error", "GenerationCancelled"), (kind, payload)
    assert parent.mirrored == [] and "a" not in engine.steps_run  # no rank started it
    parent.close()


def test_a_cancel_between_steps_stops_the_call_at_the_next_step() -> None:
    engine = GatedEngine()
    parent = Parent(engine)
    parent.start()
    parent.send((1, "generate", ("m", params(5), [wire("a")])))
    kind, payload = parent.recv(1)
    assert kind == "progress" and payload[2] == 1
    parent.send((1, "flags", [True]))  # the poll, between progress events
    parent.send((1, "ack", (payload[0], [True])))
    kind, payload = parent.recv(1)
    assert (kind, payload[0]) == ("error", "GenerationCancelled") and engine.steps_run["a"] == 1
    parent.close()


def test_messages_for_a_call_that_ended_leave_nothing_behind() -> None:
    """A flags message that arrived after a call's cleanup re-created an entry nobody removed."""
    engine = GatedEngine()
    parent = Parent(engine)
    parent.start()
    parent.send((1, "generate", ("m", params(1), [wire("a")])))
    kind, payload = parent.recv(1)
    assert kind == "progress"
    parent.send((1, "ack", (payload[0], [False])))
    assert parent.recv(1)[0] == "ok"
    parent.send((1, "flags", [True]))  # late: the parent polled just before the answer reached it
    parent.send((1, "ack", (0, [True])))
    parent.round_trip()
    assert 1 not in parent.worker.calls
    parent.close()


def test_a_cancelled_call_in_a_split_group_leaves_no_answer_of_the_other_ranks_behind() -> None:
    """Rank 0 read the other ranks' answers only after a call that succeeded: after a cancelled generation
    each rank's answer stayed in its pipe, and the next call took it for its own."""
    engine = GatedEngine()
    parent = Parent(engine, followers=1)
    parent.start()
    parent.send((1, "generate", ("m", params(5), [wire("a")])))
    kind, payload = parent.recv(1)
    assert kind == "progress"
    parent.send((1, "ack", (payload[0], [True])))
    kind, payload = parent.recv(1)
    assert (kind, payload[0]) == ("error", "GenerationCancelled")
    assert parent.answered.acquire(timeout=20)  # the other rank has answered the mirrored call
    assert parent.mirrored == ["generate"] and not parent.unread_follower_answers()
    parent.close()
