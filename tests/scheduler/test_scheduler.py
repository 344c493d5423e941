"""Scheduler through the HTTP app (in-process): batching, workers, locks, timeouts, cancellation, jobs."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.registry import resolve_model
from fluxserve.generation import ModelLockTimeout

GEN = "/v1/images/generations"


def pixels(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=int)


async def test_dynamic_batching_merges_compatible_jobs_and_keeps_each_image(app_factory: Callable[..., Any]) -> None:
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 3}
    async with app_factory(max_batch=4, batch_wait_ms=400) as client:
        batched = await asyncio.gather(*(client.post(GEN, json={**body, "seed": s, "prompt": p})
                                         for s, p in ((1, "a red fox"), (2, "a blue bird"), (3, "a cat"))))
        assert all(r.status_code == 200 for r in batched)
        items = [r.json()["data"][0] for r in batched]
        assert [i["batch_size"] for i in items] == [3, 3, 3]
        # an incompatible request (other size) is not merged
        other = await client.post(GEN, json={**body, "size": "128x64", "seed": 1})
        assert other.json()["data"][0]["batch_size"] == 1
        alone = [await client.post(GEN, json={**body, "seed": s, "prompt": p})
                 for s, p in ((1, "a red fox"), (2, "a blue bird"), (3, "a cat"))]
        for b, a in zip(items, alone, strict=True):
            assert a.json()["data"][0]["batch_size"] == 1
            assert np.abs(pixels(b) - pixels(a.json()["data"][0])).max() <= 2


async def test_batching_off_with_max_batch_1(app_factory: Callable[..., Any]) -> None:
    async with app_factory(max_batch=1, batch_wait_ms=200) as client:
        responses = await asyncio.gather(*(client.post(GEN, json={"prompt": "a", "size": "64x64", "seed": s,
                                                                   "num_inference_steps": 1}) for s in range(3)))
        assert {r.json()["data"][0]["batch_size"] for r in responses} == {1}


async def test_two_cpu_workers_serve_in_parallel(app_factory: Callable[..., Any]) -> None:
    body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 12}
    async with app_factory(devices=["cpu", "cpu"], max_batch=1) as client:
        runtime = client.app.state.runtime
        assert len(runtime.scheduler.engines) == 2
        a, b = await asyncio.gather(client.post(GEN, json={**body, "seed": 1}),
                                    client.post(GEN, json={**body, "seed": 2}))
        ta, tb = a.json()["data"][0]["timing"], b.json()["data"][0]["timing"]
        # Neither waited for the other: each queue wait is far shorter than the other's denoising.
        assert max(ta["queue_wait"], tb["queue_wait"]) < 0.5 * min(ta["denoise"], tb["denoise"])


async def test_one_worker_serialises(app_factory: Callable[..., Any]) -> None:
    body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 12}
    async with app_factory(max_batch=1) as client:
        a, b = await asyncio.gather(client.post(GEN, json={**body, "seed": 1}),
                                    client.post(GEN, json={**body, "seed": 2}))
        waits = sorted([a.json()["data"][0]["timing"]["queue_wait"], b.json()["data"][0]["timing"]["queue_wait"]])
        assert waits[1] > 0.5 * a.json()["data"][0]["timing"]["denoise"]


async def test_queue_timeout_gives_504_while_the_worker_is_busy(app_factory: Callable[..., Any]) -> None:
    async with app_factory(queue_timeout=0.3, max_batch=1, max_steps=100000, max_megapixel_steps=1e9) as client:
        slow = await client.post("/v1/images/jobs", json={"prompt": "slow", "size": "256x256",
                                                          "num_inference_steps": 100000})
        await _wait_status(client, slow.json()["id"], {"running"})
        late = await client.post(GEN, json={"prompt": "late", "size": "64x64", "num_inference_steps": 1})
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "queue_timeout"
        assert late.elapsed.total_seconds() < 2.0  # expired on time, not when the worker came free
        assert (await client.delete(f"/v1/images/jobs/{slow.json()['id']}")).json()["status"] == "cancelled"


async def test_queue_full_is_429_with_retry_after_before_any_work(app_factory: Callable[..., Any]) -> None:
    async with app_factory(max_queue=1, max_batch=1, max_steps=100000, max_megapixel_steps=1e9) as client:
        slow = {"prompt": "slow", "size": "256x256", "num_inference_steps": 100000}
        running = await client.post("/v1/images/jobs", json=slow)
        await _wait_status(client, running.json()["id"], {"running"})
        queued = await client.post("/v1/images/jobs", json=slow)
        assert queued.status_code == 202 and queued.json()["queue_position"] == 1
        refused = await asyncio.gather(*(client.post(GEN, json={"prompt": "a", "size": "64x64", "seed": i})
                                         for i in range(2)))
        for response in refused:
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
            assert response.elapsed.total_seconds() < 1.0
        for job in (queued, running):
            await client.delete(f"/v1/images/jobs/{job.json()['id']}")


async def test_cancel_endpoint(app_factory: Callable[..., Any]) -> None:
    async with app_factory(max_batch=1) as client:
        job = await client.post("/v1/images/jobs", json={"prompt": "slow", "size": "256x256",
                                                         "num_inference_steps": 80, "request_id": "cancel-me"})
        assert job.status_code == 202
        assert job.json()["id"] == "cancel-me" and job.json()["status"] in ("queued", "running")
        await _wait_status(client, "cancel-me", {"running"})
        cancelled = await client.post("/v1/images/cancel", json={"request_id": "cancel-me"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        status = (await client.get("/v1/images/jobs/cancel-me")).json()
        assert status["status"] == "cancelled"
        assert status["progress"]["step"] - status["cancel_step"] <= 1
        again = await client.post("/v1/images/cancel", json={"request_id": "cancel-me"})
        assert again.status_code == 404
        unknown = await client.post("/v1/images/cancel", json={"request_id": "nobody"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"


async def _wait_status(client: Any, job_id: str, wanted: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = (await client.get(f"/v1/images/jobs/{job_id}")).json()
        if data["status"] in wanted:
            return data  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"job {job_id} never reached {wanted}")


async def test_async_jobs_lifecycle_and_events(app_factory: Callable[..., Any]) -> None:
    async with app_factory(max_batch=1) as client:
        first = await client.post("/v1/images/jobs", json={"prompt": "a", "size": "128x128",
                                                           "num_inference_steps": 20, "seed": 4})
        second = await client.post("/v1/images/jobs", json={"prompt": "b", "size": "64x64",
                                                            "num_inference_steps": 2, "seed": 5})
        assert second.status_code == 202 and second.headers["location"].endswith(second.json()["id"])
        events = []
        async with client.stream("GET", f"/v1/images/jobs/{second.json()['id']}/events") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
        assert events[0] == "status" and events[-1] == "succeeded"
        assert "progress" in events and "started" in events
        done = await _wait_status(client, second.json()["id"], {"succeeded"})
        assert done["result"]["data"][0]["seed"] == 5
        assert (await _wait_status(client, first.json()["id"], {"succeeded"}))["progress"]["step"] == 20
        deleted = await client.delete(f"/v1/images/jobs/{first.json()['id']}")
        assert deleted.status_code == 409
        missing = await client.get("/v1/images/jobs/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        slow = await client.post("/v1/images/jobs", json={"prompt": "s", "size": "256x256",
                                                          "num_inference_steps": 80})
        await _wait_status(client, slow.json()["id"], {"running"})
        deleted = await client.delete(f"/v1/images/jobs/{slow.json()['id']}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled"


async def test_duplicate_request_id_is_409(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "request_id": "same"}
        assert (await client.post(GEN, json=body)).status_code == 200
        again = await client.post(GEN, json=body)
        assert again.status_code == 409 and again.json()["error"]["param"] == "request_id"


async def test_loading_one_model_does_not_stop_another_from_generating(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        finished: list[float] = []

        async def generate_loop(stop: asyncio.Event) -> None:
            while not stop.is_set():
                r = await client.post(GEN, json={"prompt": "a", "size": "64x64", "num_inference_steps": 1})
                assert r.status_code == 200
                finished.append(time.monotonic())

        stop = asyncio.Event()
        loop_task = asyncio.create_task(generate_loop(stop))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        selected = await client.post("/v1/models/select", json={"model": "tiny-qwen"})
        ended = time.monotonic()
        stop.set()
        await loop_task
        assert selected.status_code == 200 and selected.json()["active"]["key"] == "tiny-qwen"
        during = [t for t in finished if started < t < ended]
        assert during, f"no tiny-flux image finished during the {ended - started:.2f}s load of tiny-qwen"
        models = (await client.get("/v1/models")).json()
        assert models["active"]["key"] == "tiny-qwen"
        loaded = {m["id"] for m in models["data"] if m["loaded"]}
        assert {"tiny-flux", "tiny-qwen"} <= loaded  # selecting does not drop the other model


def test_concurrent_loads_of_one_model_load_it_once(make_settings: Callable[..., Any]) -> None:
    engine = DeviceEngine(make_settings(), select_device_dtype("cpu"))
    spec = resolve_model("tiny-flux")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(engine.load(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for _, loaded_now in results if loaded_now) == 1
    assert len({id(model) for model, _ in results}) == 1


def test_model_lock_wait_times_out_clearly(make_settings: Callable[..., Any]) -> None:
    engine = DeviceEngine(make_settings(model_lock_timeout=0.05), select_device_dtype("cpu"))
    spec = resolve_model("tiny-qwen")
    errors: list[BaseException] = []

    def load() -> None:
        try:
            engine.load(spec)
        except ModelLockTimeout as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "FLUX_MODEL_LOCK_TIMEOUT" in str(errors[0])


async def test_model_that_cannot_load_is_503_and_server_stays_up(app_factory: Callable[..., Any],
                                                                tmp_path: Any) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}')
    async with app_factory(allow_any_model=True) as client:
        response = await client.post(GEN, json={"prompt": "a", "model": str(broken), "size": "64x64"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_unavailable"
        assert str(broken) not in response.json()["error"]["message"]
        ok = await client.post(GEN, json={"prompt": "a", "size": "64x64", "num_inference_steps": 1})
        assert ok.status_code == 200


@pytest.mark.parametrize("stream_steps", [6])
async def test_streaming_progress_and_partial_images(app_factory: Callable[..., Any], stream_steps: int) -> None:
    import json

    async with app_factory() as client:
        body = {"prompt": "a", "size": "64x64", "num_inference_steps": stream_steps, "stream": True,
                "partial_images": 2, "seed": 9}
        kinds: list[str] = []
        payloads: list[dict[str, Any]] = []
        async with client.stream("POST", GEN, json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    payload = json.loads(line.removeprefix("data: "))
                    kinds.append(payload["type"])
                    payloads.append(payload)
        assert kinds.count("image_generation.partial_image") == 2
        assert kinds[-1] == "image_generation.completed"
        steps = [p["step"] for p in payloads if p["type"] == "image_generation.progress" and p["status"] == "running"]
        assert steps[-1] == stream_steps
        completed = payloads[-1]
        plain = await client.post(GEN, json={**body, "stream": False})
        assert completed["b64_json"] == plain.json()["data"][0]["b64_json"]
        preview = Image.open(io.BytesIO(base64.b64decode(payloads[kinds.index("image_generation.partial_image")]
                                                         ["b64_json"])))
        assert max(preview.size) <= 64


async def test_max_concurrent_runs_separate_pipeline_views_on_one_device(app_factory: Callable[..., Any]) -> None:
    body = {"prompt": "slow", "size": "128x128", "num_inference_steps": 10}
    async with app_factory(max_concurrent=2, max_batch=1) as client:
        runtime = client.app.state.runtime
        model = runtime.scheduler.engines[0].get("tiny-flux")
        assert model._views.qsize() == 2  # two pipeline objects sharing one set of weights
        a, b = await asyncio.gather(client.post(GEN, json={**body, "seed": 1}),
                                    client.post(GEN, json={**body, "seed": 2}))
        ta, tb = a.json()["data"][0]["timing"], b.json()["data"][0]["timing"]
        assert max(ta["queue_wait"], tb["queue_wait"]) < 0.5 * min(ta["denoise"], tb["denoise"])
        again = await client.post(GEN, json={**body, "seed": 2})
        assert np.abs(pixels(again.json()["data"][0]) - pixels(b.json()["data"][0])).max() <= 2


async def test_warmup_can_be_turned_off(app_factory: Callable[..., Any]) -> None:
    async with app_factory(warmup_enable=False) as client:
        card = (await client.get("/v1/models/tiny-flux")).json()
        assert card["loaded"] and card["warmup"] == {"cpu": {}}
