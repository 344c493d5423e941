"""The Ray Serve ingress without Ray: fluxserve's app on an IngressRuntime, model replicas in-process.

Everything here runs the real ingress code (RemoteScheduler, IngressRuntime, the unchanged routes)
and the real replica code (ReplicaWorker: a full Runtime per replica); only the transport between
them is a direct call instead of a Ray handle. The same paths run over Ray in test_ray_serve.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from fluxserve.distributed.config import (
    ingress_settings,
    max_ongoing_requests,
    model_deployment_options,
    model_keys,
    replica_settings,
)
from fluxserve.distributed.ingress import (
    Backpressure,
    LocalModelClient,
    ModelClient,
    ReplicaLost,
    StatusSource,
    build_ingress_app,
)
from fluxserve.distributed.messages import RemoteRequest, ReplicaStatus, deployment_name
from fluxserve.distributed.replica import ReplicaWorker
from fluxserve.settings import Settings


def _settings(cache_dir: Path, out: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": "tiny-flux", "cache_dir": cache_dir, "output_dir": out, "device": "cpu",
                              "warmup_sizes": ["64x64"], "store_local": False, "ray_num_gpus": 0,
                              "_env_file": None}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def workers(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[ReplicaWorker]]]:
    """Two tiny-flux replicas and one tiny-qwen replica, each with its own Runtime (as on Ray)."""
    out = tmp_path_factory.mktemp("replicas")
    base = _settings(cache_dir, out)
    made = {
        "tiny-flux": [ReplicaWorker(replica_settings(base, "tiny-flux"), f"{deployment_name('tiny-flux')}#r{i}")
                      for i in range(2)],
        "tiny-qwen": [ReplicaWorker(replica_settings(base, "tiny-qwen"), f"{deployment_name('tiny-qwen')}#q0")],
    }
    yield made
    for group in made.values():
        for worker in group:
            worker.close()


def _status_of(workers: dict[str, list[ReplicaWorker]], state: str = "RUNNING") -> StatusSource:
    async def status() -> dict[str, list[ReplicaStatus]]:
        return {key: [ReplicaStatus(w.replica_id, state, pid=w.info().pid) for w in group]
                for key, group in workers.items()}
    return status


@pytest.fixture
def ingress(cache_dir: Path, tmp_path: Path, workers: dict[str, list[ReplicaWorker]]) -> Callable[..., Any]:
    """``async with ingress(clients=..., **settings) as client`` → httpx client on a started ingress app."""

    @asynccontextmanager
    async def factory(clients: dict[str, ModelClient] | None = None, status: StatusSource | None = None,
                      max_retries: int = 2, ready: bool = True, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        overrides.setdefault("preload_models", ["tiny-qwen"])
        settings = ingress_settings(_settings(cache_dir, tmp_path / "outputs", **overrides))
        if clients is None:
            clients = {key: LocalModelClient(group) for key, group in workers.items()}
        app = build_ingress_app(settings, clients, status or _status_of(workers), max_retries=max_retries)
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
                client.app = app  # type: ignore[attr-defined]
                for _ in range(100 if ready else 0):
                    if (await client.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                yield client

    return factory


async def test_generation_names_the_replica_and_alternates(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        replicas = []
        for i in range(4):
            r = await client.post("/v1/images/generations", json={"prompt": f"a cat {i}", "size": "64x64", "seed": 7})
            assert r.status_code == 200, r.text
            item = r.json()["data"][0]
            assert base64.b64decode(item["b64_json"])[:4] == b"\x89PNG"
            assert item["device"] == "cpu" and item["dtype"] == "float32"
            assert item["timing"]["denoise"] > 0 and item["timing"]["image_encode"] > 0
            replicas.append(item["replica"])
        assert set(replicas) == {"FluxModel-tiny-flux#r0", "FluxModel-tiny-flux#r1"}


async def test_same_seed_same_image_on_any_replica(ingress: Callable[..., Any]) -> None:
    """What makes retrying on another replica safe: the seed fixes the image."""
    async with ingress() as client:
        bodies = [await client.post("/v1/images/generations", json={"prompt": "same", "size": "64x64", "seed": 42})
                  for _ in range(2)]
        first, second = (b.json()["data"][0] for b in bodies)
        assert first["replica"] != second["replica"]
        assert first["b64_json"] == second["b64_json"]


async def test_edits_reach_the_replica_with_their_images(ingress: Callable[..., Any]) -> None:
    """An inpainting edit through the ingress: the images and mask travel to the replica, which keeps the
    unmasked half; the same seed gives the same bytes on either replica."""
    import io

    import numpy as np
    from PIL import Image

    def png(pixels: Any) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    image = np.kron(np.random.default_rng(0).integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[:, :32, 3] = 0
    files = {"image": ("in.png", png(image), "image/png"), "mask": ("m.png", png(mask), "image/png")}
    async with ingress() as client:
        answers = [await client.post("/v1/images/edits", files=files, data={"prompt": "a door", "seed": "3"})
                   for _ in range(2)]
    first, second = (a.json()["data"][0] for a in answers)
    assert first["replica"] != second["replica"] and first["b64_json"] == second["b64_json"]
    assert first["params"]["task"] == "inpaint"
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["b64_json"]))).convert("RGB"))
    assert np.array_equal(out[:, 32:], image[:, 32:])


async def test_routes_by_model_and_refuses_models_not_deployed(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        r = await client.post("/v1/images/generations", json={"prompt": "qwen", "model": "tiny-qwen",
                                                              "size": "64x64"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["replica"] == "FluxModel-tiny-qwen#q0"
        assert r.json()["data"][0]["model_key"] == "tiny-qwen"
        r = await client.post("/v1/images/generations", json={"prompt": "x", "model": "schnell"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert "tiny-flux, tiny-qwen" in r.json()["error"]["message"]


async def test_models_lists_deployed_models_with_their_replicas(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        await client.post("/v1/images/generations", json={"prompt": "warm", "size": "64x64"})
        await client.post("/v1/images/generations", json={"prompt": "warm", "size": "64x64"})
        body = (await client.get("/v1/models")).json()
        cards = {card["id"]: card for card in body["data"]}
        assert set(cards) == {"tiny-flux", "tiny-qwen"}
        flux = cards["tiny-flux"]
        assert [r["id"] for r in flux["replicas"]] == ["FluxModel-tiny-flux#r0", "FluxModel-tiny-flux#r1"]
        assert all(r["state"] == "RUNNING" and r["device"] == "cpu" and r["served"] == 1 for r in flux["replicas"])
        assert flux["loaded"] and flux["loaded_on"] == ["FluxModel-tiny-flux#r0", "FluxModel-tiny-flux#r1"]
        assert body["device"] == "cpu"
        assert body["runtime"]["queue"]["replicas"] == 3


async def test_streaming_progress_and_partial_images(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        body = {"prompt": "stream", "size": "64x64", "stream": True, "partial_images": 2, "num_inference_steps": 6,
                "stream_progress": True}
        async with client.stream("POST", "/v1/images/generations", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in [x async for x in r.aiter_lines()]
                      if line.startswith("data: {")]
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "image_generation.completed"
        partials = [e for e in events if e["type"] == "image_generation.partial_image"]
        assert [e["partial_image_index"] for e in partials] == [0, 1] and {e["size"] for e in partials} == {"64x64"}
        assert all(Image.open(io.BytesIO(base64.b64decode(e["b64_json"]))).size == (64, 64) for e in partials)
        assert any(e["type"] == "image_generation.progress" and e["status"] == "running" for e in events)


async def test_async_job_and_cancel(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        r = await client.post("/v1/images/jobs", json={"prompt": "job", "size": "64x64"})
        assert r.status_code == 202
        job_id = r.json()["id"]
        for _ in range(200):
            data = (await client.get(f"/v1/images/jobs/{job_id}")).json()
            if data["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        assert data["status"] == "succeeded"
        assert data["result"]["data"][0]["replica"].startswith("FluxModel-tiny-flux#")

        r = await client.post("/v1/images/jobs", json={"prompt": "long", "size": "256x256",
                                                       "num_inference_steps": 100})
        job_id = r.json()["id"]
        r = await client.delete(f"/v1/images/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"


async def test_tokenize_asks_a_replica(ingress: Callable[..., Any]) -> None:
    async with ingress() as client:
        await client.post("/v1/images/generations", json={"prompt": "warm", "size": "64x64"})
        r = await client.post("/v1/tokenize", json={"prompt": "a red fox"})
        assert r.status_code == 200, r.text
        assert r.json()["counts"]["tokenizer_2"] > 0


class _HeldClient:
    """Requests wait here (not yet taken by a replica) until released."""

    def __init__(self, inner: ModelClient) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    async def stream(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        await self.release.wait()
        async for event in self.inner.stream(request):
            yield event

    def token_count(self, prompt: str) -> dict[str, int]:
        return self.inner.token_count(prompt)


async def test_full_queue_is_429_with_retry_after(ingress: Callable[..., Any],
                                                  workers: dict[str, list[ReplicaWorker]]) -> None:
    held = _HeldClient(LocalModelClient(workers["tiny-flux"]))
    clients: dict[str, ModelClient] = {"tiny-flux": held, "tiny-qwen": LocalModelClient(workers["tiny-qwen"])}
    async with ingress(clients=clients, ray_max_queued_requests=2) as client:
        waiting = [asyncio.create_task(client.post("/v1/images/generations", json={"prompt": f"w{i}",
                                                                                   "size": "64x64"}))
                   for i in range(2)]
        await asyncio.sleep(0.2)
        r = await client.post("/v1/images/generations", json={"prompt": "one too many", "size": "64x64"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "queue_full"
        assert "FLUX_RAY_MAX_QUEUED_REQUESTS" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        held.release.set()
        assert [t.status_code for t in await asyncio.gather(*waiting)] == [200, 200]


class _FlakyClient:
    """Loses the replica ``failures`` times (after it accepted the request), then works."""

    def __init__(self, inner: ModelClient, failures: int, error: Exception | None = None) -> None:
        self.inner = inner
        self.failures = failures
        self.error = error
        self.calls = 0

    async def stream(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.failures:
            async for event in self.inner.stream(request):
                yield event
                if event["type"] == "started":
                    raise ReplicaLost("ActorDiedError: the actor died unexpectedly")
        async for event in self.inner.stream(request):
            yield event

    def token_count(self, prompt: str) -> dict[str, int]:
        return self.inner.token_count(prompt)


async def test_lost_replica_is_retried(ingress: Callable[..., Any], workers: dict[str, list[ReplicaWorker]]) -> None:
    flaky = _FlakyClient(LocalModelClient(workers["tiny-flux"]), failures=1)
    async with ingress(clients={"tiny-flux": flaky, "tiny-qwen": LocalModelClient(workers["tiny-qwen"])}) as client:
        r = await client.post("/v1/images/generations", json={"prompt": "retry me", "size": "64x64"})
        assert r.status_code == 200, r.text
        assert flaky.calls == 2
        assert (await client.get("/v1/metrics/summary")).json()["queue"]["retries"] == 1


async def test_replica_lost_too_often_is_a_clear_503(ingress: Callable[..., Any],
                                                     workers: dict[str, list[ReplicaWorker]]) -> None:
    flaky = _FlakyClient(LocalModelClient(workers["tiny-flux"]), failures=10)
    async with ingress(clients={"tiny-flux": flaky, "tiny-qwen": LocalModelClient(workers["tiny-qwen"])},
                       max_retries=1) as client:
        r = await client.post("/v1/images/generations", json={"prompt": "doomed", "size": "64x64"})
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "replica_unavailable"
        assert "replica" in error["message"] and "ActorDiedError" in error["message"]
        assert flaky.calls == 2


async def test_ray_backpressure_is_429(ingress: Callable[..., Any], workers: dict[str, list[ReplicaWorker]]) -> None:
    refusing = _FlakyClient(LocalModelClient(workers["tiny-flux"]), 0, Backpressure("queue full", retry_after=3))
    async with ingress(clients={"tiny-flux": refusing, "tiny-qwen": LocalModelClient(workers["tiny-qwen"])}) as client:
        r = await client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "3"


async def test_not_ready_until_every_model_has_a_running_replica(ingress: Callable[..., Any],
                                                                  workers: dict[str, list[ReplicaWorker]]) -> None:
    starting = _status_of(workers, state="STARTING")
    async with ingress(status=starting, ready=False) as client:
        for _ in range(100):  # until the ingress has read the replica table once
            r = await client.get("/ready")
            if "waiting for the first replica status from Ray Serve" not in r.json().get("reasons", []):
                break
            await asyncio.sleep(0.02)
        assert r.status_code == 503
        assert "model tiny-flux has no running replica (FluxModel-tiny-flux)" in r.json()["reasons"]


def test_deployment_options_follow_settings(tmp_path: Path) -> None:
    fixed = Settings(_env_file=None, model="tiny-flux", preload_models=["tiny-qwen", "tiny-flux"], ray_num_gpus=0,
                     ray_min_replicas=2, ray_max_replicas=2, ray_max_queued_requests=8, max_batch=4)
    assert model_keys(fixed) == ["tiny-flux", "tiny-qwen"]
    options = model_deployment_options(fixed)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 1.0}
    assert options["max_queued_requests"] == 8
    assert options["max_ongoing_requests"] == max_ongoing_requests(fixed) == 8  # a batch running, one waiting
    replica = replica_settings(fixed, "tiny-qwen")
    assert (replica.model, replica.preload_models, replica.device) == ("tiny-qwen", [], "cpu")
    assert replica.max_queue >= options["max_ongoing_requests"]

    scaling = Settings(_env_file=None, ray_min_replicas=0, ray_max_replicas=8, ray_target_ongoing_requests=3)
    options = model_deployment_options(scaling)
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 8, "initial_replicas": 1,
                                             "target_ongoing_requests": 3.0}
    assert options["ray_actor_options"]["num_gpus"] == 1.0
    assert replica_settings(scaling, "schnell").device == "cuda"
    assert ingress_settings(scaling).device == "cpu"
