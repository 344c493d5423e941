"""Every route × every execution mode × two families, against real servers.

Modes (one server each for the whole module):

* ``server`` — ``fluxserve serve``: the engine runs in the server process;
* ``workers`` — ``fluxserve serve`` with ``FLUX_WORKER_PROCESSES=1``: the engine runs in a spawned worker process;
* ``ray`` — a local Ray Serve cluster: fluxserve's ingress and one CPU replica per model.

Families: tiny-flux (FLUX.1: CLIP + T5) and tiny-qwen (Qwen-Image: one tokenizer, true CFG).

Each route answers the same shape in every mode, or the error documented for that mode: on Ray Serve the
ingress holds no model, so ``/v1/models/unload`` answers 404 ``model_not_loaded`` and ``/v1/memory/release``
drops nothing (docs/scaling-out.md), and adapters load on the replicas with the first request that names them,
so ``/v1/loras/load`` and ``/unload`` answer 400 ``loras_unavailable`` (docs/loras.md). Tests run mode by mode
(pytest groups them by the module-scoped ``deployment``), the routes in the order written here; the ones that
drop models come last.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ServerProcess, exclusive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

IN_CI = bool(os.environ.get("CI"))
MODES = ("server", "workers", "ray")
WAIT = 120.0
"""Seconds: only a bound against a hang, never a threshold a test asserts."""


@dataclass(frozen=True)
class FamilyCase:
    key: str
    lora: str
    guidance_parameter: str
    limits: dict[str, int]


FAMILY_CASES = {
    "tiny-flux": FamilyCase("tiny-flux", "matrix-flux", "guidance_scale", {"tokenizer": 77, "tokenizer_2": 256}),
    "tiny-qwen": FamilyCase("tiny-qwen", "matrix-qwen", "true_cfg_scale", {"tokenizer": 128}),
}


@dataclass
class Deployment:
    mode: str
    base_url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=WAIT)


def _lora_library(cache_dir: Path, directory: Path) -> Path:
    """One adapter per family, built for its tiny model (the file format a trainer writes)."""
    from fluxserve.engine.adapters import build_tiny_lora

    for key, case in FAMILY_CASES.items():
        family = key.removeprefix("tiny-")
        build_tiny_lora(cache_dir / "models" / key, directory / family / f"{case.lora}.safetensors",
                        family=family, base_model=key, seed=11)
    return directory


def _server(mode: str, cache_dir: Path, work: Path) -> Iterator[Deployment]:
    env = {"FLUX_MODEL": "tiny-flux", "FLUX_PRELOAD_MODELS": "tiny-qwen", "FLUX_CACHE_DIR": str(cache_dir),
           "FLUX_DEVICE": "cpu", "FLUX_OUTPUT_DIR": str(work / "outputs"), "FLUX_LORA_DIR": str(work / "loras"),
           "FLUX_WARMUP_SIZES": "64x64"}
    if mode == "workers":
        env["FLUX_WORKER_PROCESSES"] = "1"
    server = ServerProcess(env, work / f"{mode}.log")
    try:
        server.wait_ready()
        yield Deployment(mode, server.base_url)
    finally:
        server.stop()


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _ray(cache_dir: Path, work: Path) -> Iterator[Deployment]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # pragma: no cover - depends on the environment
        if IN_CI:
            raise
        pytest.skip(f"Ray Serve is not installed ({exc}); pip install -e '.[ray]'")
    from fluxserve.distributed.ray_serve import APP_NAME, build_app
    from fluxserve.settings import Settings

    with exclusive("ray"), pytest.MonkeyPatch.context() as env:  # one local Ray cluster at a time
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.delenv("RAY_ADDRESS", raising=False)  # always a fresh local cluster
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     namespace="fluxserve-route-matrix", object_store_memory=256 * 1024 * 1024,
                     configure_logging=False)
        except Exception as exc:  # pragma: no cover - depends on the machine
            if IN_CI:
                raise
            pytest.skip(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = Settings(
                model="tiny-flux", preload_models=["tiny-qwen"], cache_dir=cache_dir, output_dir=work / "outputs",
                lora_dir=work / "loras", device="cpu", warmup_sizes=["64x64"], ray_num_gpus=0, ray_num_cpus=1,
                ray_min_replicas=1, ray_max_replicas=1, shutdown_timeout=5, _env_file=None)
            serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)  # returns once running
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + WAIT
            while not _ready(base_url):  # the ingress's first poll of Ray's replica table
                assert time.monotonic() < deadline, "the Ray Serve application did not become ready"
            yield Deployment("ray", base_url)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


@pytest.fixture(scope="module", params=MODES)
def deployment(request: pytest.FixtureRequest, cache_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp(f"matrix-{request.param}")
    _lora_library(cache_dir, work / "loras")
    if request.param == "ray":
        yield from _ray(cache_dir, work)
    else:
        yield from _server(request.param, cache_dir, work)


@pytest.fixture(params=list(FAMILY_CASES))
def family(request: pytest.FixtureRequest) -> FamilyCase:
    return FAMILY_CASES[request.param]


# --- helpers ---------------------------------------------------------------------------------------------
def _png(width: int = 64, height: int = 64) -> bytes:
    blocks = np.random.default_rng(0).integers(0, 255, (height // 8, width // 8, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _generation(model: str, seed: int = 1) -> dict[str, Any]:
    return {"model": model, "prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": seed}


def _error(response: httpx.Response, status: int, code: str) -> None:
    """The documented error, in OpenAI's shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


def _images(response: httpx.Response, deployment: Deployment, model: str, count: int = 1) -> list[dict[str, Any]]:
    """An images response of ``count`` 64×64 PNGs made by ``model`` (on Ray, each says which replica)."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"created", "data"} <= set(body)
    data = body["data"]
    assert len(data) == count
    for item in data:
        assert item["model_key"] == model
        assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
        assert ("replica" in item) == (deployment.mode == "ray")
    items: list[dict[str, Any]] = data
    return items


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/v1/images/jobs/{job_id}/events") as stream:
        assert stream.status_code == 200
        return [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


CARD_KEYS = {"id", "object", "created", "owned_by", "source", "allowed", "loadable", "family", "description",
             "active", "loaded", "loaded_on", "gated", "licence", "commercial_use", "defaults", "guidance_parameter",
             "presets", "quality_steps", "modes", "load_seconds", "warmup", "prompt_cache", "replicas", "edits"}


# --- the routes ------------------------------------------------------------------------------------------
def test_generations(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        _images(client.post("/v1/images/generations", json=_generation(family.key)), deployment, family.key)


def test_edits(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        response = client.post("/v1/images/edits", files={"image": ("in.png", _png(), "image/png")},
                               data={"model": family.key, "prompt": "make it blue", "num_inference_steps": "4"})
        item = _images(response, deployment, family.key)[0]
        assert item["params"]["task"] == "img2img"


def test_variations(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        response = client.post("/v1/images/variations", files={"image": ("in.png", _png(), "image/png")},
                               data={"model": family.key, "num_inference_steps": "4"})
        _images(response, deployment, family.key)


def test_jobs_and_their_events(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        created = client.post("/v1/images/jobs", json=_generation(family.key, seed=5))
        assert created.status_code == 202, created.text
        job = created.json()
        assert {"id", "object", "status", "created", "model", "progress"} <= set(job) and job["model"] == family.key
        events = _events(client, job["id"])
        assert events[0]["type"] == "status" and events[-1]["type"] == "succeeded"
        assert [e["type"] for e in events].count("succeeded") == 1

        def stored() -> bool:  # the images are encoded right after the job succeeds
            return bool(client.get(f"/v1/images/jobs/{job['id']}").json().get("result"))

        _until(stored, "the job's result")
        polled = client.get(f"/v1/images/jobs/{job['id']}").json()
        assert polled["status"] == "succeeded" and polled["result"]["data"][0]["seed"] == 5


def test_models(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        listing = client.get("/v1/models")
        assert listing.status_code == 200
        cards = {card["id"]: card for card in listing.json()["data"]}
        one = client.get(f"/v1/models/{family.key}")
        assert one.status_code == 200
    for card in (cards[family.key], one.json()):
        assert set(card) == CARD_KEYS
        assert card["loaded"] is True and card["guidance_parameter"] == family.guidance_parameter
        assert card["edits"]["without_mask"] == "img2img"
        assert (card["replicas"] is None) == (deployment.mode != "ray")


def test_select(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        response = client.post("/v1/models/select", json={"model": family.key})
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"ok", "active", "seconds"} and response.json()["active"]["key"] == family.key
        assert client.post("/v1/models/select", json={"model": "tiny-flux"}).status_code == 200


def test_tokenize(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        response = client.post("/v1/tokenize", json={"model": family.key, "prompt": "a red fox"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "counts", "limits"}
    assert set(body["counts"]) == set(family.limits) and all(n > 0 for n in body["counts"].values())
    assert body["limits"] == family.limits


def test_loras_list(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        response = client.get("/v1/loras")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"object", "data", "limits", "available"}
    card = next(card for card in body["data"] if card["name"] == family.lora)
    assert card["base_model"] == family.key and card["loaded"] == []


def test_loras_load_and_unload(deployment: Deployment, family: FamilyCase) -> None:
    adapter = {"name": family.lora, "model": family.key}
    with deployment.client() as client:
        loaded = client.post("/v1/loras/load", json=adapter)
        if deployment.mode == "ray":
            _error(loaded, 400, "loras_unavailable")
            _error(client.post("/v1/loras/unload", json=adapter), 400, "loras_unavailable")
            return
        assert loaded.status_code == 200, loaded.text
        assert set(loaded.json()) == {"ok", "name", "model", "seconds"} and set(loaded.json()["seconds"]) == {"cpu"}
        listed = {card["name"]: card for card in client.get("/v1/loras").json()["data"]}
        assert listed[family.lora]["loaded"] == [f"{family.key}@cpu"]
        unloaded = client.post("/v1/loras/unload", json=adapter)
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json() == {"ok": True, "name": family.lora, "model": family.key, "devices": ["cpu"]}
        _error(client.post("/v1/loras/unload", json=adapter), 404, "lora_not_loaded")


def test_unload(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        _images(client.post("/v1/images/generations", json=_generation(family.key)), deployment, family.key)
        response = client.post("/v1/models/unload", json={"model": family.key})
        if deployment.mode == "ray":  # the ingress holds no model: Ray places and removes them
            _error(response, 404, "model_not_loaded")
            return
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"ok", "model", "devices", "freed_bytes"} and body["devices"] == ["cpu"]
        _error(client.post("/v1/tokenize", json={"model": family.key, "prompt": "a fox"}), 409, "model_not_loaded")
        # The next request loads it again.
        _images(client.post("/v1/images/generations", json=_generation(family.key)), deployment, family.key)


def test_release(deployment: Deployment, family: FamilyCase) -> None:
    with deployment.client() as client:
        _images(client.post("/v1/images/generations", json=_generation(family.key)), deployment, family.key)
        response = client.post("/v1/memory/release", json={"all": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"ok", "message", "pipelines_cleared", "dropped", "kept", "freed_bytes", "memory"}
        assert (family.key in body["dropped"]) == (deployment.mode != "ray")
