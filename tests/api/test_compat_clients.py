"""Contract tests per client: the exact requests real client packages send, replayed in-process.

The fixtures (``tests/api/fixtures/*.json``) were captured once from the real packages by
``tests/api/fixtures/capture_clients.py`` (its docstring says how); each test replays one request
byte for byte, with the client's own headers, and checks the response fields that client reads.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.asyncio(loop_scope="module")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
JS_MAX_SAFE_INTEGER = 2**53 - 1


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """fluxserve as a new user starts it: default settings (aliases on), the demo model."""
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("outputs"),
                        device="cpu", warmup_sizes=["64x64"], _env_file=None)  # type: ignore[call-arg]
    async with running_app(settings) as c:
        yield c


async def replay(client: Any, name: str) -> Any:
    """Send the captured request exactly (method, path, headers, body bytes); return the response."""
    (request,) = load(name)["requests"]
    return await client.request(request["method"], request["path"], headers=request["headers"],
                                content=request["body"].encode())


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", ["langchain_dalle_default", "langchain_dalle3"])
async def test_langchain_dalle_wrapper_gets_urls(client: Any, name: str) -> None:
    """DallEAPIWrapper sends dall-e-2 (its default) or dall-e-3, never response_format, and joins
    ``[item.url for item in response.data]``: every url must be there and download an image."""
    sent = json.loads(load(name)["requests"][0]["body"])
    assert sent["model"].startswith("dall-e-") and "response_format" not in sent
    response = await replay(client, name)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == sent["n"]
    for item in data:
        assert isinstance(item["url"], str) and "b64_json" not in item
        assert item["model"] == "tiny-flux"  # the model that really served, not the alias
        path = item["url"].removeprefix("http://testserver")
        download = await client.get(path)
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert _image(download.content).size == tuple(int(v) for v in sent["size"].split("x"))


@pytest.mark.parametrize(("name", "expect"), [("litellm_gpt_image_1", "b64_json"), ("litellm_dalle3", "url")])
async def test_litellm_image_generation(client: Any, name: str, expect: str) -> None:
    """litellm.image_generation builds its ImageResponse from ``created`` and each item's
    ``b64_json``/``url``/``revised_prompt``; gpt-image-1 answers b64 by default, dall-e-3 a url."""
    response = await replay(client, name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and body["data"]
    item = body["data"][0]
    assert isinstance(item[expect], str)
    assert ("url" if expect == "b64_json" else "b64_json") not in item
    if expect == "b64_json":
        assert _image(base64.b64decode(item["b64_json"])).format == "PNG"
    assert item["model"] == "tiny-flux" and item["model_key"] == "tiny-flux"


async def test_openai_python_sdk_request(client: Any) -> None:
    response = await replay(client, "openai_python")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and all(_image(base64.b64decode(d["b64_json"])).size == (1024, 1024) for d in data)
    assert data[1]["seed"] == data[0]["seed"] + 1


async def test_openai_node_sdk_request_and_javascript_numbers(client: Any) -> None:
    """The Node SDK's request (n=2, no seed): both random seeds must survive JavaScript's doubles."""
    response = await replay(client, "openai_node")
    assert response.status_code == 200, response.text
    seeds = [item["seed"] for item in response.json()["data"]]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    assert all(0 <= s <= JS_MAX_SAFE_INTEGER for s in seeds)
    as_js = [item["seed"] for item in json.loads(response.text, parse_int=float)["data"]]  # JSON.parse's reading
    assert as_js == seeds and as_js[0] != as_js[1]
    if shutil.which("node"):  # and JSON.parse itself, where Node is installed
        script = "const d = JSON.parse(require('fs').readFileSync(0, 'utf8')); " \
                 "console.log(JSON.stringify(d.data.map(x => [x.seed, Number.isSafeInteger(x.seed)])))"
        out = subprocess.run(["node", "-e", script], input=response.text, capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert json.loads(out) == [[s, True] for s in seeds]


async def test_random_seeds_are_javascript_safe(client: Any) -> None:
    body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "n": 4}
    for _ in range(3):
        response = await client.post("/v1/images/generations", json=body)
        seeds = [item["seed"] for item in response.json()["data"]]
        assert seeds == list(range(seeds[0], seeds[0] + 4)) and seeds[-1] <= JS_MAX_SAFE_INTEGER
        parsed = [item["params"]["seed"] for item in json.loads(response.text, parse_int=float)["data"]]
        assert parsed == seeds  # each a distinct, exact double


async def test_seed_plus_i_wraps_at_the_top_and_stays_reproducible(client: Any) -> None:
    """Per-image seeds are (seed + i) mod 2^53: near the top they wrap to 0, and JavaScript reads every one
    exactly."""
    body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "n": 3, "seed": JS_MAX_SAFE_INTEGER - 1}
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    seeds = [d["seed"] for d in response.json()["data"]]
    assert seeds == [JS_MAX_SAFE_INTEGER - 1, JS_MAX_SAFE_INTEGER, 0]  # every reported seed can be sent back
    assert [d["seed"] for d in json.loads(response.text, parse_int=float)["data"]] == seeds  # JSON.parse's reading
    alone = await client.post("/v1/images/generations", json={**body, "n": 1, "seed": 0})
    assert alone.json()["data"][0]["seed"] == 0


@pytest.mark.parametrize("seed", [JS_MAX_SAFE_INTEGER + 1, 9207518215572822513, 2**63 - 1])
async def test_seeds_javascript_cannot_hold_are_refused(client: Any, seed: int) -> None:
    response = await client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "seed": seed})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "seed" and error["code"] == "invalid_value"
    assert str(JS_MAX_SAFE_INTEGER) in error["message"]


@pytest.mark.parametrize("first", [2**53 - 2, 9007199254740000, 12345678901234])
async def test_client_seeds_are_echoed_exactly(client: Any, first: int) -> None:
    """Any seed a client may send is used and echoed as sent, and seed + i stays exact."""
    body = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "n": 2, "seed": first}
    response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["seed"] for d in data] == [first, first + 1]
    assert [d["params"]["seed"] for d in data] == [first, first + 1]
    assert f'"seed":{first + 1}' in response.text.replace(" ", "")  # digits as sent, not a float
    alone = await client.post("/v1/images/generations", json={**body, "n": 1, "seed": first + 1})
    again = alone.json()["data"][0]
    assert again["seed"] == first + 1  # image i reproduced alone: same seed, same image (within float rounding)
    pixels = [np.asarray(_image(base64.b64decode(d["b64_json"])), dtype=int) for d in (again, data[1], data[0])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 2 < np.abs(pixels[1] - pixels[2]).max()
