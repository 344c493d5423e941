"""/health is liveness only; /ready reflects: start-up (model loaded, warm-up done), not shutting down,
not in repeated out-of-memory. After start-up an admin unload or release of the served model keeps the
server ready: the next request that needs the model loads it (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

GEN = "/v1/images/generations"
OK = {"prompt": "ready?", "size": "64x64", "num_inference_steps": 1}


async def _reasons(client: Any) -> list[str]:
    response = await client.get("/ready")
    if response.status_code == 200:
        return []
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and body["reasons"]
    return list(body["reasons"])


async def test_not_ready_until_warmup_is_done(app_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxserve.catalog import LocalCatalog

    release, entered = threading.Event(), threading.Event()
    real_warmup = LocalCatalog.warmup

    def slow_warmup(self: LocalCatalog, spec: Any) -> None:
        entered.set()
        assert release.wait(60)
        real_warmup(self, spec)

    monkeypatch.setattr(LocalCatalog, "warmup", slow_warmup)
    async with app_factory(ready=False) as client:
        assert await asyncio.to_thread(entered.wait, 60)  # the model is loaded; the warm-up is running
        assert (await client.get("/health")).status_code == 200
        reasons = await _reasons(client)
        assert any("warming up" in r for r in reasons), reasons
        release.set()
        for _ in range(400):
            if not await _reasons(client):
                break
            await asyncio.sleep(0.05)
        assert await _reasons(client) == []
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.warmups and runtime.warmups[0].outcome == "ok"


async def test_warmup_covers_each_configured_text_length(app_factory: Callable[..., Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FLUX_COMPILE a text length is part of a compiled shape: /ready must mean the lengths clients send are
    warm, not only the model's default. Each FLUX_WARMUP_TEXT_LENGTHS entry within the model's limit reaches the
    engine as the warm-up's max_sequence_length; one above the limit (requests could not use it) does not."""
    from fluxserve.engine.engine import DeviceEngine

    seen: list[int] = []
    real_generate = DeviceEngine.generate

    def recording(self: DeviceEngine, model: Any, params: Any, requests: Any) -> Any:
        seen.append(params.max_sequence_length)
        return real_generate(self, model, params, requests)

    monkeypatch.setattr(DeviceEngine, "generate", recording)
    async with app_factory(warmup_sizes=["64x64"], warmup_text_lengths=["48", "32", "48", "100000"]) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert seen == [48, 32]  # in the configured order, once each, nothing above the limit
        assert [(w.size, w.text_length, w.outcome) for w in runtime.warmups] == [("64x64", 48, "ok"),
                                                                                ("64x64", 32, "ok")]
        listed = (await client.get("/v1/models/tiny-flux")).json()
        warm = [entry for device in listed["warmup"].values() for entry in device.values()]
        assert sorted(entry["text_length"] for entry in warm) == [32, 48]
        assert (await client.post(GEN, json={**OK, "max_sequence_length": 32})).status_code == 200


async def test_an_admin_unload_of_the_served_model_keeps_the_server_ready(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert (await client.post("/v1/models/unload", json={"model": "tiny-flux"})).status_code == 200
        assert not runtime.scheduler.is_loaded("tiny-flux")
        assert await _reasons(client) == []  # it can still serve: the next request pays the load
        released = await client.post("/v1/memory/release", json={"all": True})
        assert released.status_code == 200
        assert await _reasons(client) == []
        assert (await client.post(GEN, json=OK)).status_code == 200  # a request loads it again
        assert runtime.scheduler.is_loaded("tiny-flux") and await _reasons(client) == []


def test_behind_a_ready_only_router_an_unloaded_server_is_never_stuck(server_factory: Callable[..., Any]) -> None:
    """A load balancer that routes only to ready servers sends nothing to an unready one. After an admin
    unload or release of the served model the real server must be ready again without any generation
    request, or it would never get one."""
    import httpx

    server = server_factory(name="ready-only")
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        assert http.get("/ready").status_code == 200
        unloaded = http.post("/v1/models/unload", json={"model": "tiny-flux"})
        assert unloaded.status_code == 200 and unloaded.json()["devices"] == ["cpu"]
        ready = http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert http.get("/v1/models/tiny-flux").json()["loaded"] is False  # ready, and honest about the model
        assert http.post("/v1/memory/release", json={"all": True}).status_code == 200
        assert http.get("/ready").status_code == 200
        image = http.post(GEN, json=OK)  # the first request after it loads the model again
        assert image.status_code == 200 and image.json()["data"][0]["b64_json"]
        assert http.get("/ready").status_code == 200
    assert server.stop() == 0


async def test_repeated_oom_makes_it_unready_until_a_success(app_factory: Callable[..., Any]) -> None:
    async with app_factory(fault_injection=True, oom_policy=["clear_cache"], oom_max_consecutive=2,
                           allow_fallback=False) as client:
        faults = client.app.state.runtime.engines[0].faults  # type: ignore[attr-defined]
        faults.arm("oom@denoise:100")
        first = await client.post(GEN, json=OK)
        assert first.status_code == 503 and first.json()["error"]["code"] == "out_of_memory"
        assert await _reasons(client) == []  # one failure is not "repeated"
        assert (await client.post(GEN, json=OK)).status_code == 503
        reasons = await _reasons(client)
        assert any("in a row failed out of memory" in r for r in reasons), reasons
        assert (await client.get("/health")).status_code == 200  # alive, just not ready
        faults.clear()
        assert (await client.post(GEN, json=OK)).status_code == 200
        assert await _reasons(client) == []


async def test_shutting_down_is_unready_and_refuses_new_work(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        client.app.state.runtime.begin_shutdown()  # type: ignore[attr-defined]
        reasons = await _reasons(client)
        assert any("shutting down" in r for r in reasons), reasons
        assert (await client.get("/health")).status_code == 200
        for path in (GEN, "/v1/images/jobs"):
            refused = await client.post(path, json=OK)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
        streamed = await client.post(GEN, json={**OK, "stream": True})  # a status, not a broken event stream
        assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "shutting_down"


async def test_failed_startup_is_unready_but_alive(app_factory: Callable[..., Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxserve.engine import loading

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise loading.ModelLoadError("weights are corrupt (test)")

    monkeypatch.setattr(loading, "load_model", broken)
    import fluxserve.engine.store as store_module

    monkeypatch.setattr(store_module, "load_model", broken)
    async with app_factory(ready=False) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert await asyncio.to_thread(runtime.wait_started, 60)
        reasons = await _reasons(client)
        assert any("start-up failed" in r for r in reasons), reasons
        assert (await client.get("/health")).status_code == 200
