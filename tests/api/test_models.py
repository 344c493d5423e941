"""/v1/models and friends, in-process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


async def test_models_list_and_one_model(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        body = (await client.get("/v1/models")).json()
        ids = [m["id"] for m in body["data"]]
        assert {"schnell", "dev", "qwen", "tiny-flux", "tiny-qwen"} <= set(ids)
        tiny = next(m for m in body["data"] if m["id"] == "tiny-flux")
        assert tiny["loaded"] and tiny["active"] and tiny["object"] == "model"
        assert set(tiny["presets"]) == {"low", "medium", "high", "wide"}
        assert tiny["defaults"]["num_inference_steps"] == 4 and tiny["warmup"]["cpu"]["64x64"]["outcome"] == "ok"
        snapshot = body["runtime"]
        assert snapshot["devices"][0]["device"] == "cpu" and snapshot["devices"][0]["reasons"]
        assert "process_rss_bytes" in snapshot["memory"][0]
        assert snapshot["queue"]["max_queue"] == 64 and "torch" in snapshot["versions"]
        one = await client.get("/v1/models/tiny-flux")
        assert one.status_code == 200 and one.json()["id"] == "tiny-flux"
        assert not (await client.get("/v1/models/dev")).json()["loaded"]
        missing = await client.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_select_unknown_model_is_404_and_root_is_json(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        response = await client.post("/v1/models/select", json={"model": "nope"})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
        root = (await client.get("/", headers={"accept": "application/json"})).json()
        assert root["model"]["active_key"] == "tiny-flux" and "POST /v1/images/generations" in root["endpoints"]


async def test_ready_waits_for_the_model(app_factory: Callable[..., Any]) -> None:
    async with app_factory(ready=False, warmup_sizes=["256x256"]) as client:
        first = await client.get("/ready")
        assert first.status_code in (200, 503)
        if first.status_code == 503:
            assert first.json()["error"]["code"] == "not_ready"
        assert (await client.get("/health")).status_code == 200


async def test_tokenize_counts_tokens(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        short = (await client.post("/v1/tokenize", json={"prompt": "a fox"})).json()
        longer = (await client.post("/v1/tokenize", json={"prompt": "a fox in a very long prompt"})).json()
        assert short["counts"]["tokenizer"] < longer["counts"]["tokenizer"]
        assert short["limits"]["tokenizer"] == 77


async def test_web_ui_can_be_turned_off(app_factory: Callable[..., Any]) -> None:
    async with app_factory(web_ui=False) as client:
        root = await client.get("/", headers={"accept": "text/html"})
        assert root.headers["content-type"].startswith("application/json")
        assert (await client.get("/static/js/main.js")).status_code == 404
    async with app_factory() as client:
        root = await client.get("/", headers={"accept": "text/html"})
        assert root.headers["content-type"].startswith("text/html")


async def test_invalid_x_request_id_is_replaced(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1}
        good = await client.post("/v1/images/generations", json=body, headers={"x-request-id": "trace-1"})
        assert good.headers["x-request-id"] == "trace-1" and good.json()["data"][0]["request_id"] == "trace-1"
        bad = await client.post("/v1/images/generations", json=body, headers={"x-request-id": "a/b" + "x" * 300})
        assert bad.status_code == 200 and bad.headers["x-request-id"].startswith("req_")


async def test_prompt_cache_counts_repeated_prompts(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        body = {"prompt": "the same prompt", "size": "64x64", "num_inference_steps": 1}
        for _ in range(3):
            assert (await client.post("/v1/images/generations", json=body)).status_code == 200
        cache = (await client.get("/v1/models/tiny-flux")).json()["prompt_cache"]["cpu"]
        assert cache["hits"] >= 2 and cache["capacity"] == 64
