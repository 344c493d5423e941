"""OpenAI's rules as its clients expect them: model names, default response format, background,
and errors in one form. In-process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fluxserve.models.aliases import OPENAI_IMAGE_MODELS, default_response_format, parse_model_aliases

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY = {"prompt": "a", "size": "64x64", "num_inference_steps": 1}


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Default settings, as a new user runs it (aliases on, b64 unless dall-e-*)."""
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("outputs"),
                        device="cpu", warmup_sizes=["64x64"], hub_downloads="off",
                        _env_file=None)  # type: ignore[call-arg]
    async with running_app(settings) as c:
        yield c


async def _generate(client: Any, **fields: Any) -> Any:
    return await client.post("/v1/images/generations", json={**BODY, **fields})


def test_alias_parsing() -> None:
    assert parse_model_aliases(["gpt-image-1=schnell", " dall-e-3 "]) == {"gpt-image-1": "schnell", "dall-e-3": None}
    assert parse_model_aliases([]) == {}
    for bad in (["=schnell"], ["a="], ["a", "a=dev"], ["a=b", "b=dev"]):
        with pytest.raises(ValueError):
            parse_model_aliases(bad)
    assert default_response_format("dall-e-2", "b64_json") == "url"
    assert default_response_format("gpt-image-1", "b64_json") == "b64_json"
    assert default_response_format(None, "url") == "url"


def test_alias_settings(make_settings: Callable[..., Any]) -> None:
    from fluxserve.settings import SettingsError, load_settings

    assert make_settings().model_aliases == list(OPENAI_IMAGE_MODELS)
    with pytest.raises(SettingsError, match="FLUX_MODEL_ALIASES"):
        load_settings(model_aliases="gpt-image-1=")


async def test_every_openai_model_name_means_the_active_model(client: Any) -> None:
    for name in OPENAI_IMAGE_MODELS:
        response = await _generate(client, model=name)
        assert response.status_code == 200, (name, response.text)
        item = response.json()["data"][0]
        assert item["model"] == "tiny-flux" and item["model_key"] == "tiny-flux"  # who really served
        assert ("url" in item) == name.startswith("dall-e-")  # OpenAI's default response_format
    listed = (await client.get("/v1/models")).json()
    assert listed["aliases"] == {name: "tiny-flux" for name in OPENAI_IMAGE_MODELS}
    card = await client.get("/v1/models/gpt-image-1")
    assert card.status_code == 200 and card.json()["id"] == "tiny-flux"
    explicit = await _generate(client, model="dall-e-3", response_format="b64_json")
    assert "b64_json" in explicit.json()["data"][0]


async def test_aliases_to_chosen_models_and_off(app_factory: Callable[..., Any]) -> None:
    async with app_factory(model_aliases=["gpt-image-1=tiny-qwen", "dall-e-3",
                                          "gpt-image-2=black-forest-labs/FLUX.1-schnell"],
                           preload_models=["tiny-qwen"], default_response_format="url") as client:
        listed = (await client.get("/v1/models")).json()["aliases"]
        assert listed == {"gpt-image-1": "tiny-qwen", "dall-e-3": "tiny-flux", "gpt-image-2": "schnell"}
        qwen = (await _generate(client, model="gpt-image-1")).json()["data"][0]
        assert qwen["model_key"] == "tiny-qwen" and "url" in qwen  # FLUX_DEFAULT_RESPONSE_FORMAT=url
        assert (await _generate(client, model="dall-e-3")).json()["data"][0]["model_key"] == "tiny-flux"
        missing = await _generate(client, model="dall-e-2")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    async with app_factory(model_aliases=[]) as client:
        off = await _generate(client, model="gpt-image-1")
        assert off.status_code == 404 and off.json()["error"]["code"] == "model_not_found"
        assert (await client.get("/v1/models")).json()["aliases"] == {}


async def test_background(client: Any) -> None:
    refused = await _generate(client, background="transparent", model="gpt-image-1")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "background" and error["code"] == "unsupported_value"
    assert error["message"].startswith("invalid 'background': tiny-flux cannot produce transparent images")
    for value in ("opaque", "auto"):
        ok = await _generate(client, background=value)
        assert ok.status_code == 200
        assert ok.json()["background"] == "opaque" and "background" not in ok.json()["ignored_fields"]
    plain = await _generate(client, style="vivid", moderation="low")
    assert plain.json()["ignored_fields"] == ["style", "moderation"] and "background" not in plain.json()
    bad = await _generate(client, background="glass")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "background"


@pytest.mark.parametrize(("fields", "message"), [
    ({"n": 11}, "invalid 'n': must be between 1 and 4, got 11"),
    ({"n": 0}, "invalid 'n': must be at least 1, got 0"),
    ({"n": "two"}, "invalid 'n': must be a valid integer, got 'two'"),
    ({"num_inference_steps": 101}, "invalid 'num_inference_steps': must be at most 100, got 101"),
    ({"size": "big"}, "invalid 'size': must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got 'big'"),
    ({"size": "4096x64"}, "invalid 'size': width must be between 64 and 2048 pixels, got 4096"),
    ({"width": 100, "size": None}, "invalid 'width': width must be a multiple of 16 for tiny-flux, got 100 "
                                   "(nearest: 96)"),
    ({"response_format": "gif"}, "invalid 'response_format': must be 'b64_json' or 'url', got 'gif'"),
    ({"output_compression": 101}, "invalid 'output_compression': must be at most 100, got 101"),
    ({"moderation": "strict"}, "invalid 'moderation': must be 'low' or 'auto', got 'strict'"),
    ({"seed": 2**53}, "invalid 'seed': must be at most 9007199254740991, got 9007199254740992"),
    ({"prompt": "x" * 4001}, "invalid 'prompt': must be at most 4000 characters, got 4001"),
    ({"prompt": "  "}, "invalid 'prompt': must not be blank, got only whitespace"),
    ({"guidance_scale": 31.0}, "invalid 'guidance_scale': must be at most 30, got 31"),
    ({"max_sequence_length": 513}, "invalid 'max_sequence_length': must be at most 512 for tiny-flux, got 513"),
])
async def test_validation_messages_have_one_form(client: Any, fields: dict[str, Any], message: str) -> None:
    body = {**BODY, **fields}
    response = await client.post("/v1/images/generations", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message


async def test_missing_field_and_invalid_json_read_the_same(client: Any) -> None:
    missing = await client.post("/v1/images/generations", json={"size": "64x64"})
    assert missing.json()["error"]["message"] == "invalid 'prompt': is required, got nothing"
    headers = {"content-type": "application/json"}
    broken = await client.post("/v1/images/generations", content=b'{"prompt": "\xc3\xa9", ', headers=headers)
    twice = await client.post("/v1/images/generations", content=b'{"prompt": "a", "prompt": "b"}',
                              headers=headers)
    pydantic = await client.post("/v1/images/generations", json={"prompt": "é", "n": "two"})
    for response in (broken, twice, pydantic):
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        # one serializer (FastAPI's JSONResponse): compact separators, text not \\u-escaped
        assert response.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert broken.json()["error"]["code"] == "invalid_json"
    assert twice.json()["error"]["param"] == "prompt"
