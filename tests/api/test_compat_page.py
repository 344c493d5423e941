"""The earlier web page and scripts, unchanged: every field they read (docs/compatibility.md), HEAD on
every GET route. In-process."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fluxserve.models.registry import BUILTIN_MODELS

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("outputs"),
                        device="cpu", warmup_sizes=["64x64"], fault_injection=True, min_size=32,
                        hub_downloads="off", _env_file=None)  # type: ignore[call-arg]
    async with running_app(settings) as c:
        yield c


async def test_models_has_what_the_page_iterates(client: Any) -> None:
    body = (await client.get("/v1/models")).json()
    available = body["available"]  # Object.entries(available): key → repo id
    assert available["tiny-flux"] == "tiny-flux" and available["tiny-qwen"] == "tiny-qwen"
    assert body["active"] == {"key": "tiny-flux", "id": "tiny-flux", "type": "flux"}
    for key in ("device", "dtype", "cache_dir", "revision", "variant", "runtime", "data"):
        assert key in body
    assert [m["id"] for m in body["data"]] == list(available)  # the OpenAI list names the same models
    everything = (await client.get("/v1/models?all=true")).json()["available"]  # an admin's view of the registry
    assert everything["schnell"] == "black-forest-labs/FLUX.1-schnell" and everything["qwen"] == "Qwen/Qwen-Image"


async def test_the_page_picker_offers_only_models_this_server_can_switch_to(client: Any) -> None:
    """Nothing downloads here (FLUX_HUB_DOWNLOADS=off) and nothing is in the cache: the picker offers the models
    built offline, each of which loads; what it leaves out is what would fail."""
    offered = set((await client.get("/v1/models")).json()["available"])
    assert offered == {key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None}
    cards = (await client.get("/v1/models?all=true")).json()["data"]
    left_out = {card["id"] for card in cards if card["id"] not in offered}
    assert "schnell" in left_out and not any(card["loadable"] for card in cards if card["id"] in left_out)
    chosen = await client.post("/v1/models/select", json={"model": "schnell"})  # as the old picker could
    assert chosen.status_code == 503 and chosen.json()["error"]["param"] == "model"
    assert "FLUX_HUB_DOWNLOADS=off" in chosen.json()["error"]["message"]
    assert (await client.get("/v1/models")).json()["active_key"] == "tiny-flux"


async def test_select_and_release_answer_what_the_page_shows(client: Any) -> None:
    selected = await client.post("/v1/models/select", json={"model": "tiny-qwen"})
    assert selected.status_code == 200
    assert selected.json()["ok"] is True and selected.json()["active"] == {"key": "tiny-qwen", "id": "tiny-qwen"}
    back = await client.post("/v1/models/select", json={"model": "tiny-flux"})
    assert back.json()["active"]["key"] == "tiny-flux"
    released = (await client.post("/v1/memory/release")).json()  # drops tiny-qwen, keeps the active one
    assert released["pipelines_cleared"] == 1 and released["dropped"] == ["tiny-qwen"]
    assert released["message"].startswith("released 1 pipeline(s) (tiny-qwen)")
    again = (await client.post("/v1/memory/release")).json()
    assert again["pipelines_cleared"] == 0 and again["message"] == "nothing to release but the active model"


async def test_generation_items_carry_the_page_fields(client: Any) -> None:
    body = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 1, "guidance_scale": 3.5,
            "max_sequence_length": 256, "seed": 3, "store_local": True, "write_metadata": True, "request_id": "page-1"}
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    for key in ("b64_json", "saved_path", "metadata_path", "model", "model_key", "params"):
        assert item[key], key
    assert isinstance(item["duration_ms"], int)
    assert item["duration_ms"] == round(item["timing"]["total"] * 1000)
    assert "warning" not in item  # only set when a fallback applied
    out = client.app.state.runtime.settings.output_dir  # saved paths are relative to the output directory
    assert not Path(item["saved_path"]).is_absolute()
    assert (out / item["saved_path"]).is_file() and (out / item["metadata_path"]).is_file()


async def test_warning_when_a_fallback_applied(client: Any) -> None:
    engine = client.app.state.runtime.scheduler.engines[0]
    engine.faults.arm("oom@decode:3")  # recovered on the downscale rung: 64x64 → 48x48
    response = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64",
                                                                  "num_inference_steps": 1})
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["params"]["fallback_applied"] is True
    assert item["warning"].startswith("out of memory; recovered by cpu_oom")
    assert item["warning"].endswith(": 48x48 instead of 64x64")


async def test_api_images_are_not_stored_by_default(client: Any) -> None:
    response = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64",
                                                                  "num_inference_steps": 1})
    assert "saved_path" not in response.json()["data"][0]


async def test_head_on_every_get_route(client: Any) -> None:
    schema = (await client.get("/openapi.json")).json()
    paths = sorted(path for path, ops in schema["paths"].items() if "get" in ops and "{" not in path)
    assert {"/health", "/ready", "/metrics", "/v1/models", "/", "/v1/metrics/summary"} <= set(paths)
    for path in [*paths, "/v1/models/tiny-flux", "/static/js/main.js"]:
        get = await client.get(path)
        head = await client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    url = (await client.post("/v1/images/generations", json={
        "prompt": "a", "size": "64x64", "num_inference_steps": 1, "response_format": "url"})).json()["data"][0]["url"]
    file = await client.head(url.removeprefix("http://testserver"))
    assert file.status_code == 200 and file.content == b"" and file.headers["content-type"] == "image/png"
    assert int(file.headers["content-length"]) > 0
    missing = await client.head("/v1/models/nope")
    assert missing.status_code == 404 and missing.content == b""
    post_only = await client.head("/v1/images/generations")
    assert post_only.status_code == 405
    assert not any("head" in ops for ops in schema["paths"].values())  # HEAD stays out of the schema


async def test_the_documented_cors_line_lets_the_page_in_from_a_file_or_another_port(
        app_factory: Callable[..., Any]) -> None:
    line = re.search(r"^FLUX_CORS_ORIGINS=(\S+) ", (ROOT / "docs" / "earlier-server.md").read_text(), re.M)
    assert line is not None
    async with app_factory(cors_origins=line.group(1)) as client:
        for origin in ("null", "http://127.0.0.1:5500"):  # a file:// page, a page on another port
            preflight = await client.options("/v1/models/select", headers={
                "origin": origin, "access-control-request-method": "POST",
                "access-control-request-headers": "content-type"})
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
            listed = await client.get("/v1/models", headers={"origin": origin})
            assert listed.headers["access-control-allow-origin"] == origin
        stranger = await client.get("/v1/models", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
    async with app_factory() as client:  # the default stays same-origin
        assert "access-control-allow-origin" not in (await client.get("/v1/models", headers={"origin": "null"})).headers
