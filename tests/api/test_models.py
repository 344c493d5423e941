"""/v1/models and friends, in-process."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fluxserve.models.registry import BUILTIN_MODELS
from tests.security.helpers import assert_openai_error

TINY = {key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None}
ADMIN, USER = "sk-admin-0123456789abcdef", "sk-user-0123456789abcdef"


async def test_models_list_and_one_model(app_factory: Callable[..., Any]) -> None:
    async with app_factory() as client:
        body = (await client.get("/v1/models")).json()
        ids = [m["id"] for m in body["data"]]
        assert set(ids) == TINY  # no key: an admin, who may select any model; only the offline ones load here
        tiny = next(m for m in body["data"] if m["id"] == "tiny-flux")
        assert tiny["loaded"] and tiny["active"] and tiny["object"] == "model"
        assert set(tiny["presets"]) == {"low", "medium", "high", "wide"}
        assert tiny["defaults"]["num_inference_steps"] == 4 and tiny["warmup"]["cpu"]["64x64"]["outcome"] == "ok"
        snapshot = body["runtime"]
        assert snapshot["devices"][0]["device"] == "cpu" and snapshot["devices"][0]["reasons"]
        assert "process_rss_bytes" in snapshot["memory"][0]
        assert snapshot["queue"]["max_queue"] == 64 and "torch" in snapshot["versions"]
        one = await client.get("/v1/models/tiny-flux")
        assert one.status_code == 200 and one.json()["id"] == "tiny-flux" and one.json()["loadable"]
        dev = (await client.get("/v1/models/dev")).json()
        assert not dev["loaded"] and not dev["loadable"]
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


# --- what each caller is offered ----------------------------------------------------------------------------------
@pytest.fixture
def listing(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``with listing(**settings) as client``: the app without loading any model (listing needs none)."""
    from fastapi.testclient import TestClient

    from fluxserve.api.app import create_app

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        with TestClient(create_app(make_settings(**overrides), manage_runtime=False)) as client:
            yield client

    return factory


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ids(listed: dict[str, Any]) -> set[str]:
    ids = {card["id"] for card in listed["data"]}
    assert set(listed["available"]) == ids  # the earlier page's picker offers the same models
    return ids


def _in_the_hub_cache(cache_dir: Path, repo_id: str) -> None:
    """What a finished download leaves in the hub cache: a snapshot with its model_index.json, and refs/main."""
    repo = cache_dir / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = secrets.token_hex(20)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_each_key_is_offered_what_it_may_use_and_admins_may_ask_for_everything(listing: Callable[..., Any]) -> None:
    with listing(api_keys=[USER], admin_keys=[ADMIN], models=["tiny-qwen", "schnell"]) as client:
        user = client.get("/v1/models", headers=_auth(USER)).json()
        # requests may name tiny-flux (FLUX_MODEL), tiny-qwen and schnell (FLUX_MODELS); schnell cannot load here
        assert _ids(user) == {"tiny-flux", "tiny-qwen"}
        left_out = client.post("/v1/images/generations", headers=_auth(USER),
                               json={"prompt": "a", "model": "tiny-klein"})
        assert_openai_error(left_out, 403, param="model", code="model_not_allowed")  # what the list leaves out
        admin = client.get("/v1/models", headers=_auth(ADMIN)).json()
        assert _ids(admin) == TINY  # an admin may select any registry model that loads here

        refused = client.get("/v1/models?all=true", headers=_auth(USER))
        error = assert_openai_error(refused, 403, param="all", code="permission_denied")
        assert error["type"] == "permission_error" and "FLUX_ADMIN_KEYS" in error["message"]
        everything = client.get("/v1/models", params={"all": "true"}, headers=_auth(ADMIN)).json()
        assert _ids(everything) == set(BUILTIN_MODELS)
        cards = {card["id"]: card for card in everything["data"]}
        assert cards["schnell"]["allowed"] and not cards["schnell"]["loadable"]
        assert cards["tiny-klein"]["loadable"] and not cards["tiny-klein"]["allowed"]
        bad = client.get("/v1/models?all=maybe", headers=_auth(ADMIN))
        assert_openai_error(bad, 400, param="all")


def test_models_in_the_cache_or_downloadable_are_offered(listing: Callable[..., Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with listing(cache_dir=cache) as client:  # FLUX_HUB_DOWNLOADS=off, an empty cache: the offline models only
        assert _ids(client.get("/v1/models").json()) == TINY
    _in_the_hub_cache(cache, "black-forest-labs/FLUX.1-schnell")
    _in_the_hub_cache(cache, "black-forest-labs/FLUX.1-dev")  # gated, but already here: no token needed
    with listing(cache_dir=cache) as client:
        assert _ids(client.get("/v1/models").json()) == TINY | {"schnell", "dev"}
        assert client.get("/v1/models/schnell").json()["loadable"]

    gated = {key for key, spec in BUILTIN_MODELS.items() if spec.gated}
    with listing(cache_dir=tmp_path / "empty", hub_downloads="on") as client:  # downloads, but no token
        assert _ids(client.get("/v1/models").json()) == set(BUILTIN_MODELS) - gated and gated
    with listing(cache_dir=tmp_path / "empty", hub_downloads="on", hf_token="hf_0123456789") as client:
        assert _ids(client.get("/v1/models").json()) == set(BUILTIN_MODELS)
