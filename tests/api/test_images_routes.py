"""The image routes through the real app and scheduler, on a fake engine the test drives step by step:
queueing, 429/504, cancel (409 for a waiting client, 404 for another key), disconnects, async jobs and
their result budget, server-sent events. Deterministic: every wait is on an event or a gate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxserve.runtime import Runtime
from fluxserve.settings import Settings
from tests.conftest import running_app
from tests.scheduler.fake_engine import BOUND, FakeEngine, loop_turn

GEN = "/v1/images/generations"
JOBS = "/v1/images/jobs"
BODY = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 3}


class FakeApp:
    def __init__(self, client: httpx.AsyncClient, engine: FakeEngine, runtime: Runtime) -> None:
        self.client = client
        self.engine = engine
        self.runtime = runtime

    async def next_call(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.next_call)

    async def advance(self, call: Any, steps: int = 1) -> None:
        await asyncio.get_running_loop().run_in_executor(None, call.advance, steps)


@asynccontextmanager
async def fake_app(tmp_path: Path, *, ready: bool = True, **overrides: Any) -> AsyncIterator[FakeApp]:
    values: dict[str, Any] = {"model": "tiny-flux", "device": "cpu", "warmup_enable": False, "store_local": False,
                              "output_dir": tmp_path / "outputs", "_env_file": None, "max_batch": 1,
                              "hub_downloads": "off", "state_dir": tmp_path / "state"}
    values.update(overrides)
    settings = Settings(**values)
    engine = FakeEngine("cpu")
    runtime = Runtime(settings, engines=[engine])
    async with running_app(settings, runtime=runtime, ready=ready) as client:
        await asyncio.get_running_loop().run_in_executor(None, runtime.wait_started, BOUND)
        yield FakeApp(client, engine, runtime)
        for call in engine.all_calls:
            call.run_free()


async def test_max_queue_zero_serves_a_request_on_an_idle_worker(tmp_path: Path) -> None:
    async with fake_app(tmp_path, max_queue=0) as app:
        request = asyncio.ensure_future(app.client.post(GEN, json=BODY))
        call = await app.next_call()
        for body in (BODY, {**BODY, "stream": True}):  # the only worker is busy and nothing may wait
            refused = await app.client.post(GEN, json=body)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
        call.run_free()
        response = await request
        assert response.status_code == 200 and len(response.json()["data"]) == 1


async def test_a_waiting_client_whose_job_is_cancelled_by_another_request_gets_409(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        request = asyncio.ensure_future(app.client.post(GEN, json={**BODY, "request_id": "mine"}))
        call = await app.next_call()
        await app.advance(call)
        job = app.runtime.scheduler.table.find("mine", None)
        assert job is not None
        cancel = asyncio.ensure_future(app.client.post("/v1/images/cancel", json={"request_id": "mine"}))
        while not job.cancel_requested:
            await loop_turn()
        await app.advance(call)  # a running job stops at its next step
        cancelled = await cancel
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        response = await request
        assert response.status_code == 409  # a real HTTP status, not 499
        error = response.json()["error"]
        assert error["code"] == "cancelled" and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}


class AsgiClient:
    """One request sent straight to the app's ASGI interface, so the test decides when the client hangs up."""

    def __init__(self, app: FakeApp, body: dict[str, Any], hang_up_on: bytes | None = None) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.hang_up_on = hang_up_on
        raw = json.dumps(body).encode()
        self._messages = [{"type": "http.request", "body": raw, "more_body": False}]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": GEN, "raw_path": GEN.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                                              (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
        self.task = asyncio.ensure_future(app.client.app(scope, self._receive, self._send))  # type: ignore[attr-defined]

    async def _receive(self) -> dict[str, Any]:
        if self._messages:
            return self._messages.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if self.hang_up_on is not None and self.hang_up_on in message.get("body", b""):
            self.gone.set()


async def test_a_client_that_hangs_up_cancels_its_job_at_the_next_step(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        client = AsgiClient(app, {**BODY, "num_inference_steps": 50})
        call = await app.next_call()
        await app.advance(call, 2)  # running, parked before step 3
        job = next(iter(app.runtime.scheduler._running_jobs()))
        client.gone.set()  # the client hangs up
        await asyncio.wait_for(client.task, BOUND)  # the route cancels the job and returns at once
        assert job.cancel_requested and not job.finished
        await app.advance(call)  # the engine sees the cancel at its next step
        await asyncio.wait_for(job.done(), BOUND)
        assert job.status.value == "cancelled" and job.cancel_step == 2 and job.step == 2
        follow_up = asyncio.ensure_future(app.client.post(GEN, json=BODY))  # the worker is free again
        (await app.next_call()).run_free()
        assert (await follow_up).status_code == 200


async def test_a_streaming_client_that_hangs_up_cancels_its_job(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        client = AsgiClient(app, {**BODY, "num_inference_steps": 50, "stream": True, "stream_progress": True},
                            hang_up_on=b'"step": 1,')
        call = await app.next_call()
        job = next(iter(app.runtime.scheduler._running_jobs()))
        await app.advance(call)  # step 1's progress event goes out, and the client hangs up on it
        await asyncio.wait_for(client.gone.wait(), BOUND)
        await asyncio.wait_for(client.task, BOUND)
        assert job.cancel_requested
        await app.advance(call)
        await asyncio.wait_for(job.done(), BOUND)
        assert job.status.value == "cancelled" and job.step == 1
        chunks = b"".join(m.get("body", b"") for m in client.sent)
        assert b"image_generation.completed" not in chunks


async def test_async_job_lifecycle_events_and_result(tmp_path: Path, job_store: str) -> None:
    async with fake_app(tmp_path, job_store=job_store) as app:
        created = await app.client.post(JOBS, json={**BODY, "seed": 5})
        assert created.status_code == 202 and created.headers["location"].endswith(created.json()["id"])
        job_id = created.json()["id"]
        kinds: list[str] = []

        async def read_events() -> None:
            async with app.client.stream("GET", f"{JOBS}/{job_id}/events") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: "):
                        kinds.append(line.removeprefix("event: "))

        reader = asyncio.ensure_future(read_events())
        call = await app.next_call()
        await app.advance(call, 3)
        await asyncio.wait_for(reader, BOUND)
        # every step live in memory; a durable store keeps the latest, so a reader may see fewer
        assert kinds[0] == "status" and kinds[-1] == "succeeded" and 1 <= kinds.count("progress") <= 3
        await asyncio.wait_for(_ended(app, job_id), BOUND)
        done = (await app.client.get(f"{JOBS}/{job_id}")).json()
        assert done["status"] == "succeeded" and done["result"]["data"][0]["seed"] == 5
        assert (await app.client.delete(f"{JOBS}/{job_id}")).status_code == 409
        missing = await app.client.get(f"{JOBS}/img_{'0' * 32}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


async def _ended(app: FakeApp, job_id: str, headers: dict[str, str] | None = None) -> None:
    """Wait until the job has ended and its result is kept: its event stream ends after the terminal event (a
    durable job is recorded as succeeded once its images are stored); in memory, the images are encoded by a
    background task right after."""
    async with app.client.stream("GET", f"{JOBS}/{job_id}/events", headers=headers) as stream:
        async for _ in stream.aiter_lines():
            pass
    for task in list(app.client.app.state.images._background):  # type: ignore[attr-defined]
        await task


def _result_bytes(app: FakeApp) -> int:
    jobs = app.client.app.state.jobs  # type: ignore[attr-defined]
    store = getattr(jobs, "store", None)
    return int(store.result_bytes()) if store is not None else int(app.runtime.scheduler.table.result_bytes)


@pytest.fixture(params=["sqlite", "memory"])
def job_store(request: pytest.FixtureRequest) -> str:
    """Async jobs in the durable store (the default) and in memory (FLUX_JOB_STORE=memory) keep one contract."""
    return str(request.param)


async def test_results_over_budget_expire_oldest_first_with_410(tmp_path: Path, job_store: str) -> None:
    # What one result costs in this store (in memory its base64 text and 1 KiB per image; durably its PNG bytes),
    # measured on a first server; the second has room for two such results and a half.
    async with fake_app(tmp_path / "measure", job_store=job_store) as app:
        created = await app.client.post(JOBS, json={**BODY, "num_inference_steps": 1, "seed": 0})
        (await app.next_call()).run_free()
        await asyncio.wait_for(_ended(app, created.json()["id"]), BOUND)
        one = _result_bytes(app)
    budget = int(2.5 * one)
    async with fake_app(tmp_path, results_max_bytes=budget, job_store=job_store) as app:
        ids = []
        for seed in range(4):
            created = await app.client.post(JOBS, json={**BODY, "num_inference_steps": 1, "seed": seed})
            ids.append(created.json()["id"])
            (await app.next_call()).run_free()
            await asyncio.wait_for(_ended(app, ids[-1]), BOUND)
        assert 0 < _result_bytes(app) <= budget
        oldest = await app.client.get(f"{JOBS}/{ids[0]}")
        assert oldest.status_code == 410 and oldest.json()["error"]["code"] == "result_expired"
        newest = await app.client.get(f"{JOBS}/{ids[-1]}")
        assert newest.status_code == 200 and newest.json()["result"]["data"][0]["seed"] == 3


async def test_a_cancelled_async_job_leaves_only_its_status(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        blocker = asyncio.ensure_future(app.client.post(GEN, json=BODY))
        call = await app.next_call()
        created = (await app.client.post(JOBS, json={**BODY, "prompt": "secret prompt"})).json()
        deleted = await app.client.delete(f"{JOBS}/{created['id']}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled"
        assert app.runtime.scheduler.table.get(created["id"], None) is None  # pruned at once
        status = await app.client.get(f"{JOBS}/{created['id']}")
        assert status.status_code == 200 and status.json()["status"] == "cancelled"
        assert "secret prompt" not in status.text
        call.run_free()
        assert (await blocker).status_code == 200


async def test_jobs_and_files_are_visible_only_to_the_key_that_made_them(tmp_path: Path, job_store: str) -> None:
    async with fake_app(tmp_path, api_keys=["key-a", "key-b"], job_store=job_store) as app:
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        created = (await app.client.post(JOBS, json={**BODY, "request_id": "shared", "response_format": "url"},
                                         headers=a)).json()
        assert (await app.client.get(f"{JOBS}/{created['id']}", headers=b)).status_code == 404
        assert (await app.client.delete(f"{JOBS}/{created['id']}", headers=b)).status_code == 404
        assert (await app.client.get(f"{JOBS}/{created['id']}/events", headers=b)).status_code == 404
        assert (await app.client.post("/v1/images/cancel", json={"request_id": "shared"}, headers=b)).status_code == 404
        (await app.next_call()).run_free()
        await asyncio.wait_for(_ended(app, created["id"], a), BOUND)
        result = (await app.client.get(f"{JOBS}/{created['id']}", headers=a)).json()["result"]
        path = httpx.URL(result["data"][0]["url"]).path
        assert (await app.client.get(path, headers=a)).status_code == 200
        assert (await app.client.get(path, headers=b)).status_code == 404


async def test_a_queued_job_expires_with_504_while_the_worker_is_busy(tmp_path: Path) -> None:
    async with fake_app(tmp_path, queue_timeout=30) as app:
        clock = [0.0]
        scheduler = app.runtime.scheduler
        scheduler._clock = lambda: clock[0]
        busy = asyncio.ensure_future(app.client.post(GEN, json=BODY))
        call = await app.next_call()
        late = asyncio.ensure_future(app.client.post(GEN, json={**BODY, "prompt": "late"}))
        await asyncio.wait_for(_queued(scheduler), BOUND)
        clock[0] = 31.0
        scheduler.expire_queued()
        response = await late
        assert response.status_code == 504 and response.json()["error"]["code"] == "queue_timeout"
        call.run_free()
        assert (await busy).status_code == 200


async def _queued(scheduler: Any) -> None:
    while not scheduler._pending:  # the in-process request is parsed and queued within a few loop turns
        await loop_turn()


async def _streamed(app: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    client = AsgiClient(app, {**body, "stream": True})
    call = await app.next_call()
    await app.advance(call, 3)
    await asyncio.wait_for(client.task, BOUND)
    chunks = b"".join(m.get("body", b"") for m in client.sent).decode()
    assert chunks.rstrip().endswith("data: [DONE]")
    return [json.loads(line.removeprefix("data: ")) for line in chunks.splitlines() if line.startswith("data: {")]


async def test_a_stream_sends_only_openai_events_by_default(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        payloads = await _streamed(app, {**BODY, "output_compression": 80})
        assert [p["type"] for p in payloads] == ["image_generation.completed"] and payloads[0]["job_id"]
        assert payloads[0]["ignored_fields"] == ["output_compression"]  # a PNG: nothing to compress


async def test_a_stream_whose_answer_never_starts_cancels_its_job(tmp_path: Path) -> None:
    """OpenAI's events may come late (no progress by default): a stream opened (its job queued) and closed before
    anything was sent still cancels its job."""
    from fluxserve.api.protocol import ImageGenerationRequest

    async with fake_app(tmp_path) as app:
        service = app.client.app.state.images  # type: ignore[attr-defined]
        body = ImageGenerationRequest(**{**BODY, "stream": True})
        job = service.build_job(body)
        events = await service.open_stream(job, service.output_options(body, "http://test"), asyncio.Event().wait)
        call = await app.next_call()  # the job runs
        await events.aclose()
        assert job.cancel_requested
        await app.advance(call)  # the engine sees the cancel at its next step
        await asyncio.wait_for(job.done(), BOUND)
        assert job.status.value == "cancelled"


async def test_a_stream_that_opts_in_reports_progress_then_the_image(tmp_path: Path) -> None:
    async with fake_app(tmp_path) as app:
        payloads = await _streamed(app, {**BODY, "stream_progress": True})
        assert payloads[-1]["type"] == "image_generation.completed" and payloads[-1]["job_id"]
        steps = [p["step"] for p in payloads if p["type"] == "image_generation.progress" and p["status"] == "running"]
        assert steps == [0, 1, 2, 3]


async def test_an_unwritable_output_dir_never_costs_an_image(tmp_path: Path, job_store: str) -> None:
    """A save that fails (here: a plain file where the output directory should be) leaves the image in the
    answer with a `save_error`; an async job ends succeeded, never 'running' forever; no path leaks."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("in the way")
    async with fake_app(tmp_path, store_local=True, output_dir=blocked, ready=False, job_store=job_store) as app:
        ready = await app.client.get("/ready")
        assert ready.status_code == 503 and "output" in ready.text and str(tmp_path) not in ready.text
        sync = asyncio.ensure_future(app.client.post(GEN, json=BODY))
        (await app.next_call()).run_free()
        response = await sync
        assert response.status_code == 200
        item = response.json()["data"][0]
        assert item["b64_json"] and item["save_error"] == "output_dir_unwritable"
        assert "saved_path" not in item and str(tmp_path) not in response.text

        created = (await app.client.post(JOBS, json=BODY)).json()
        (await app.next_call()).run_free()
        await asyncio.wait_for(_ended(app, created["id"]), BOUND)
        status = (await app.client.get(f"{JOBS}/{created['id']}")).json()
        assert status["status"] == "succeeded" and status["result"]["data"][0]["save_error"]


async def test_unload_drops_the_weights_off_the_event_loop(tmp_path: Path) -> None:
    import threading

    async with fake_app(tmp_path) as app:
        threads: list[str] = []
        unload = app.runtime.unload

        def recording_unload(key: str) -> tuple[list[str], int]:
            threads.append(threading.current_thread().name)
            return unload(key)

        app.runtime.unload = recording_unload  # type: ignore[method-assign]
        response = await app.client.post("/v1/models/unload", json={"model": "tiny-flux"})
        assert response.status_code == 200 and response.json()["devices"] == ["cpu"]
        assert threads and threads[0] != threading.current_thread().name  # not the event loop's thread
        queued = asyncio.ensure_future(app.client.post(GEN, json=BODY))  # a request after the unload reloads
        (await app.next_call()).run_free()
        assert (await queued).status_code == 200
        assert app.engine.loads.count("tiny-flux") == 2
