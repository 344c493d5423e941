"""Memory and OOM recovery through the HTTP API, on tiny-flux at 64x64 with faults injected at run time.

Covers each rung of the OOM ladder, the 503 ``out_of_memory`` answer when it is exhausted, /ready after
FLUX_OOM_MAX_CONSECUTIVE failures, NaN/black-image recovery, POST /v1/memory/release, POST
/v1/models/unload, the memory readings in /v1/models, every memory mode generating, and a soak of 200
requests with out-of-memory errors interleaved (nothing lost, memory flat, server ready afterwards).
Everything runs on the CPU; CUDA/MPS specifics are simulated in tests/engine/test_oom_recovery.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.faults import FaultInjector
from fluxserve.engine.memory import empty_cache

pytestmark = pytest.mark.asyncio(loop_scope="module")

RSS_GROWTH_BOUND = 64 * 2**20
"""The soak's bound: process RSS may grow at most 64 MiB between request 40 and request 200."""


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(  # type: ignore[call-arg]
        model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("outputs"), device="cpu",
        warmup_sizes=["64x64"], store_local=False, fault_injection=True, oom_max_consecutive=2,
        min_size=32,  # lets the downscale rung go 64 → 48 → 32 (cheap); requests still use 64x64
        hub_downloads="off", _env_file=None)
    async with running_app(settings) as c:
        yield c


def engine(client: httpx.AsyncClient) -> DeviceEngine:
    engines: list[DeviceEngine] = client.app.state.runtime.scheduler.engines  # type: ignore[attr-defined]
    assert len(engines) == 1
    return engines[0]


def faults(client: httpx.AsyncClient) -> FaultInjector:
    return engine(client).faults


@pytest.fixture(autouse=True)
async def clean(client: httpx.AsyncClient) -> AsyncIterator[None]:
    faults(client).clear()
    engine(client).consecutive_oom_failures = 0
    yield
    faults(client).clear()
    engine(client).consecutive_oom_failures = 0


async def generate(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    body = {"prompt": "a lighthouse at dusk", "size": "64x64", "num_inference_steps": 2, "seed": 7, **fields}
    return await client.post("/v1/images/generations", json=body)


def png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.size


def assert_oom_503(response: httpx.Response, *fragments: str) -> str:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error"
    assert error["message"].startswith("out of memory: cpu_oom: still out of memory")
    for fragment in fragments:
        assert fragment in error["message"]
    return str(error["message"])


# --- each rung ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "reason", "size"), [
    ("oom@denoise:1", "cpu_oom: retried after cache cleanup", "64x64"),
    ("oom@denoise:2", "cpu_oom: retried after cache cleanup and VAE tiling/slicing", "64x64"),
    # rung 3 (model offload) is CUDA-only; on the CPU it is skipped without spending a retry
    ("oom@decode:3", "cpu_oom: retried at 48x48 after cache cleanup and VAE tiling/slicing", "48x48"),
    ("oom@encode:4", "cpu_oom: retried at 32x32 after cache cleanup and VAE tiling/slicing", "32x32"),
])
async def test_each_rung_of_the_ladder(client: httpx.AsyncClient, spec: str, reason: str, size: str) -> None:
    faults(client).arm(spec)
    response = await generate(client)
    assert response.status_code == 200, response.text
    body = response.json()
    item = body["data"][0]
    params = item["params"]
    assert params["fallback_applied"] is True and params["fallback_reason"] == reason
    assert body["size"] == size and f"{params['width']}x{params['height']}" == size
    assert png_size(item["b64_json"]) == tuple(int(x) for x in size.split("x"))
    if size == "64x64":
        assert params.get("original_params") is None
    else:
        assert params["original_params"] == {"width": 64, "height": 64, "num_inference_steps": 2}
    assert params["num_inference_steps"] == 2
    vae = engine(client).get("tiny-flux").primary.vae  # type: ignore[union-attr]
    assert not vae.use_tiling and not vae.use_slicing  # temporary modes undone


async def test_no_fallback_fields_without_trouble(client: httpx.AsyncClient) -> None:
    params = (await generate(client)).json()["data"][0]["params"]
    assert params["fallback_applied"] is False and params.get("fallback_reason") is None


async def test_schnell_like_defaults_keep_their_steps(client: httpx.AsyncClient) -> None:
    """tiny-flux defaults to schnell's 4 steps; a downscaled retry must never raise them (the earlier server
    answered OOM with 8)."""
    faults(client).arm("oom@denoise:4")
    response = await generate(client, num_inference_steps=None)
    params = response.json()["data"][0]["params"]
    assert params["num_inference_steps"] == 4 and params["original_params"]["num_inference_steps"] == 4
    assert (params["width"], params["height"]) == (32, 32)


async def test_batch_falls_back_together(client: httpx.AsyncClient) -> None:
    faults(client).arm("oom@denoise:3")
    response = await generate(client, n=2)
    data = response.json()["data"]
    assert [png_size(d["b64_json"]) for d in data] == [(48, 48), (48, 48)]
    assert {d["params"]["fallback_reason"] for d in data} == {
        "cpu_oom: retried at 48x48 after cache cleanup and VAE tiling/slicing"}


# --- when recovery fails -----------------------------------------------------------------------------
async def test_exhausted_ladder_is_a_503_and_the_worker_lives_on(client: httpx.AsyncClient) -> None:
    faults(client).arm("oom@denoise:5")
    assert_oom_503(await generate(client), "at 32x32 after cache cleanup, VAE tiling/slicing, downscale to 48x48 "
                                           "and downscale to 32x32")
    ok = await generate(client)
    assert ok.status_code == 200 and ok.json()["data"][0]["params"]["fallback_applied"] is False


async def test_request_without_fallback_is_never_downscaled(client: httpx.AsyncClient) -> None:
    faults(client).arm("oom@denoise:3")
    assert_oom_503(await generate(client, allow_fallback=False), "at 64x64", "allow_fallback=false")


async def test_ready_turns_503_after_consecutive_failures_and_one_success_resets(client: httpx.AsyncClient) -> None:
    faults(client).arm("oom@encode:10")  # two requests × 5 failed attempts (oom_max_consecutive=2)
    for _ in range(2):
        assert_oom_503(await generate(client))
    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert "2 requests in a row failed out of memory" in ready.json()["reasons"]
    assert (await client.get("/health")).status_code == 200
    assert (await generate(client)).status_code == 200
    assert (await client.get("/ready")).status_code == 200


async def test_nan_output_is_re_decoded_or_refused(client: httpx.AsyncClient) -> None:
    faults(client).arm("nan@decode:1")
    response = await generate(client)
    assert response.status_code == 200
    assert response.json()["data"][0]["params"]["fallback_reason"] == \
        "nan_output: re-decoded the VAE in float32 after NaN/black output"
    faults(client).arm("nan@denoise:1")  # NaN latents: no float32 retry on the CPU (MPS fp16 only)
    response = await generate(client)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "bad_output"
    assert (await client.get("/ready")).status_code == 200  # bad output is not an OOM failure


async def test_other_failures_are_not_treated_as_oom(client: httpx.AsyncClient) -> None:
    faults(client).arm("error@denoise:1")
    response = await generate(client)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert engine(client).consecutive_oom_failures == 0
    assert (await generate(client)).status_code == 200


# --- memory routes -------------------------------------------------------------------------------------
async def test_models_snapshot_shows_memory_per_device(client: httpx.AsyncClient) -> None:
    runtime = (await client.get("/v1/models")).json()["runtime"]
    assert [m["device"] for m in runtime["memory"]] == ["cpu"]
    assert runtime["memory"][0]["process_rss_bytes"] > 0
    assert runtime["offload"] == "none" and runtime["vae_tiling"] is False


async def test_release_and_unload(client: httpx.AsyncClient) -> None:
    # Load a second model, then make tiny-flux active again: tiny-qwen stays cached.
    for model in ("tiny-qwen", "tiny-flux"):
        assert (await client.post("/v1/models/select", json={"model": model})).status_code == 200
    assert engine(client).get("tiny-qwen") is not None

    released = (await client.post("/v1/memory/release")).json()
    assert released["dropped"] == ["tiny-qwen"] and released["kept"] == ["tiny-flux"]
    assert isinstance(released["freed_bytes"], int) and released["freed_bytes"] >= 0
    assert released["memory"][0]["process_rss_bytes"] > 0
    assert engine(client).get("tiny-qwen") is None and (await client.get("/ready")).status_code == 200
    card = (await client.get("/v1/models/tiny-qwen")).json()
    assert card["loaded"] is False

    assert (await client.post("/v1/models/select", json={"model": "tiny-qwen"})).status_code == 200
    assert (await client.post("/v1/models/select", json={"model": "tiny-flux"})).status_code == 200
    unloaded = await client.post("/v1/models/unload", json={"model": "tiny-qwen"})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["devices"] == ["cpu"] and unloaded.json()["freed_bytes"] >= 0
    again = await client.post("/v1/models/unload", json={"model": "tiny-qwen"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_loaded"
    unknown = await client.post("/v1/models/unload", json={"model": "no-such-model"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    # {"all": true} drops the active model too; the server stays ready and the next request reloads it.
    everything = (await client.post("/v1/memory/release", json={"all": True})).json()
    assert everything["dropped"] == ["tiny-flux"] and everything["kept"] == []
    assert engine(client).get("tiny-flux") is None and (await client.get("/ready")).status_code == 200
    assert (await generate(client)).status_code == 200  # the request reloads it
    assert engine(client).get("tiny-flux") is not None and (await client.get("/ready")).status_code == 200


# --- soak: 200 requests with OOMs interleaved -------------------------------------------------------------
async def test_200_requests_with_injected_ooms_lose_nothing_and_leak_nothing(client: httpx.AsyncClient) -> None:
    injector = faults(client)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    baseline = 0

    async def one(i: int) -> None:
        response = await client.post("/v1/images/generations", json={
            "prompt": f"soak {i % 5}", "size": "64x64", "num_inference_steps": 1, "seed": i,
            "allow_fallback": i % 4 != 0})
        if response.status_code == 200:
            data = response.json()["data"]
            assert len(data) == 1 and png_size(data[0]["b64_json"]) in {(64, 64), (48, 48), (32, 32)}
            outcomes["image"] += 1
            reasons[(data[0]["params"].get("fallback_reason") or "none").split(":")[0]] += 1
        else:
            assert_oom_503(response)
            outcomes["503"] += 1

    for wave in range(25):  # 25 waves of 8 concurrent requests
        if wave % 2 == 0:  # OOMs at a varying stage and count before every other wave
            injector.arm(f"oom@{('encode', 'denoise', 'decode')[wave % 3]}:{wave % 6 + 1}")
        await asyncio.gather(*(one(wave * 8 + j) for j in range(8)))
        if wave == 4:  # after 40 requests: every code path has run, caches are warm
            empty_cache("cpu")
            baseline = psutil.Process(os.getpid()).memory_info().rss

    assert sum(outcomes.values()) == 200, outcomes
    assert outcomes["image"] > 100 and outcomes["503"] > 0 and reasons["cpu_oom"] > 0, (outcomes, reasons)
    empty_cache("cpu")
    growth = psutil.Process(os.getpid()).memory_info().rss - baseline
    print(f"\nsoak: {dict(outcomes)} {dict(reasons)}; RSS growth after request 40: {growth / 2**20:+.1f} MiB",
          file=sys.stderr)
    assert growth < RSS_GROWTH_BOUND

    injector.clear()
    assert (await generate(client)).status_code == 200
    assert (await client.get("/ready")).status_code == 200
    scheduler = client.app.state.runtime.scheduler  # type: ignore[attr-defined]
    for _ in range(100):  # the worker slot lets go of a job a moment after its response is sent
        stats = scheduler.stats()
        if stats["queue_depth"] == 0 and stats["jobs_in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["queue_depth"] == 0 and stats["jobs_in_flight"] == 0, stats
    vae = engine(client).get("tiny-flux").primary.vae  # type: ignore[union-attr]
    assert not vae.use_tiling and not vae.use_slicing


# --- memory modes, each generating on tiny-flux -------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "modes", "not_applied"), [
    ({"offload": "model"}, ["offload_model"], []),
    ({"vae_slicing": True, "vae_tiling": True, "vae_tile_size": 64, "attention_slicing": "max"},
     ["vae_slicing", "vae_tiling"], ["attention_slicing_max"]),
])
async def test_each_memory_mode_generates(app_factory: Callable[..., Any], overrides: dict[str, Any],
                                          modes: list[str], not_applied: list[str]) -> None:
    async with app_factory(store_local=False, **overrides) as c:
        card = (await c.get("/v1/models/tiny-flux")).json()
        assert all(m in card["modes"] for m in modes) and not set(not_applied) & set(card["modes"])
        vae = c.app.state.runtime.scheduler.engines[0].get("tiny-flux").primary.vae
        tiled: list[int] = []
        real = vae.tiled_decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            tiled.append(1)
            return real(*args, **kwargs)

        vae.tiled_decode = counting
        response = await c.post("/v1/images/generations", json={"prompt": "a kite", "size": "128x128",
                                                                  "num_inference_steps": 1, "seed": 1, "n": 2})
        assert response.status_code == 200, response.text
        assert [png_size(d["b64_json"]) for d in response.json()["data"]] == [(128, 128)] * 2
        assert bool(tiled) == ("vae_tiling" in modes)  # 128 px > the 64 px tile: decoded in tiles


async def test_faults_from_the_environment_hit_requests_not_warmup(app_factory: Callable[..., Any]) -> None:
    async with app_factory(store_local=False, fault_injection=True, faults="oom@denoise:2,nan@decode:1") as c:
        response = await c.post("/v1/images/generations", json={"prompt": "a", "size": "64x64",
                                                                  "num_inference_steps": 1})
        assert response.json()["data"][0]["params"]["fallback_reason"] == (
            "cpu_oom: retried after cache cleanup and VAE tiling/slicing; "
            "re-decoded the VAE in float32 after NaN/black output")
        warmup = c.app.state.runtime.warmups[0]
        assert warmup.outcome == "ok"


@pytest.mark.e2e
def test_sequential_offload_on_cpu_stops_the_server_at_start(server_factory: Callable[..., Any]) -> None:
    server = server_factory({"FLUX_OFFLOAD": "sequential"}, ready=False)
    assert server.proc.wait(timeout=120) == 2
    logs = server.logs()
    assert "FLUX_OFFLOAD=sequential cannot run on the CPU" in logs and "Traceback" not in logs
