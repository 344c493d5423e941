"""/health is liveness only; /ready reflects: model loaded, warm-up done, not shutting down, not in
repeated out-of-memory."""

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


async def test_not_ready_while_the_default_model_is_unloaded(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        assert (await client.post("/v1/models/unload", json={"model": "tiny-flux"})).status_code == 200
        reasons = await _reasons(client)
        assert any("not loaded" in r for r in reasons), reasons
        assert (await client.get("/health")).status_code == 200
        assert (await client.post(GEN, json=OK)).status_code == 200  # a request loads it again
        assert await _reasons(client) == []


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
