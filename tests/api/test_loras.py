"""The LoRA routes and the ``loras`` field, in-process on tiny-flux: the library listing (with the demo adapter
serving tiny-flux writes), the echo in the response and the metadata sidecar, every bad ``loras`` naming the
field, and load/unload for admins only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fluxserve.engine.adapters import build_tiny_lora

USER = "sk-user-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"


@pytest.fixture
def lora_dir(cache_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "loras"
    build_tiny_lora(cache_dir / "models" / "tiny-qwen", directory / "qwen" / "qwen-style.safetensors",
                    family="qwen", base_model="tiny-qwen", seed=3)
    build_tiny_lora(cache_dir / "models" / "tiny-flux", directory / "flux" / "other.safetensors",
                    family="flux", base_model="tiny-flux", seed=4)
    return directory


def _body(**extra: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 7, **extra}


async def test_the_library_lists_the_demo_adapter_and_where_it_is_loaded(
        app_factory: Callable[..., Any], lora_dir: Path, tmp_path: Path) -> None:
    async with app_factory(lora_dir=lora_dir) as client:
        listing = (await client.get("/v1/loras")).json()
        cards = {card["name"]: card for card in listing["data"]}
        assert set(cards) == {"tiny-flux-demo", "other", "qwen-style"}
        demo = cards["tiny-flux-demo"]
        assert demo == {**demo, "family": "flux", "base_model": "tiny-flux", "rank": 4, "format": "peft",
                        "target_modules": ["to_k", "to_out.0", "to_q", "to_v"], "loaded": [], "object": "lora"}
        assert demo["size_bytes"] > 0 and "path" not in demo
        assert listing["limits"]["max_loras_per_request"] == 4 and listing["available"] is True

        response = await client.post("/v1/images/generations", json=_body(
            loras=[{"name": "tiny-flux-demo", "scale": 0.7}], store_local=True, write_metadata=True))
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        assert item["params"]["loras"] == [{"name": "tiny-flux-demo", "scale": 0.7}]
        meta = json.loads((tmp_path / "outputs" / item["metadata_path"]).read_text())
        assert meta["params"]["loras"] == [{"name": "tiny-flux-demo", "scale": 0.7}]
        cards = {card["name"]: card for card in (await client.get("/v1/loras")).json()["data"]}
        assert cards["tiny-flux-demo"]["loaded"] == ["tiny-flux@cpu"] and cards["other"]["loaded"] == []

        plain = (await client.post("/v1/images/generations", json=_body())).json()["data"][0]
        assert "loras" not in plain["params"]
        assert plain["b64_json"] != item["b64_json"]


BAD_LORAS = [
    ([{"name": "nope", "scale": 1.0}], 404, "lora_not_found"),
    ([{"name": "qwen-style", "scale": 1.0}], 400, "lora_family_mismatch"),
    ([{"name": "tiny-flux-demo", "scale": 5.0}], 400, "invalid_value"),
    ([{"name": "tiny-flux-demo", "scale": -2.5}], 400, "invalid_value"),
    ([{"name": "tiny-flux-demo"}, {"name": "tiny-flux-demo"}], 400, "invalid_value"),
    ([{"name": "tiny-flux-demo"}] + [{"name": f"x{i}"} for i in range(4)], 400, "too_many_loras"),
    ([{"scale": 1.0}], 400, None),
    ([{"name": "tiny-flux-demo", "scale": "strong"}], 400, None),
    ([{"name": "tiny-flux-demo", "scale": True}], 400, None),
    ("tiny-flux-demo", 400, None),
    ([{"name": ""}], 400, None),
]


@pytest.mark.parametrize(("loras", "status", "code"), BAD_LORAS)
async def test_bad_loras_name_the_field(app_factory: Callable[..., Any], lora_dir: Path, loras: Any, status: int,
                                        code: str | None) -> None:
    async with app_factory(lora_dir=lora_dir) as client:
        response = await client.post("/v1/images/generations", json=_body(loras=loras))
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"].startswith("loras"), error
        if code is not None:
            assert error["code"] == code
        assert str(lora_dir) not in error["message"] and "Traceback" not in error["message"]


async def test_edits_take_loras_as_json_and_multipart(app_factory: Callable[..., Any], lora_dir: Path) -> None:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    async with app_factory(lora_dir=lora_dir) as client:
        as_json = await client.post("/v1/images/edits", json=_body(
            image="data:image/png;base64," + base64.b64encode(png).decode(), loras=[{"name": "other", "scale": 1}]))
        assert as_json.status_code == 200, as_json.text
        assert as_json.json()["data"][0]["params"]["loras"] == [{"name": "other", "scale": 1.0}]
        form = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": "2", "seed": "7",
                "loras": json.dumps([{"name": "other", "scale": 0.5}])}
        multipart = await client.post("/v1/images/edits", data=form, files={"image": ("a.png", png, "image/png")})
        assert multipart.status_code == 200, multipart.text
        assert multipart.json()["data"][0]["params"]["loras"] == [{"name": "other", "scale": 0.5}]
        unknown = await client.post("/v1/images/edits", data={**form, "loras": '[{"name": "nope"}]'},
                                    files={"image": ("a.png", png, "image/png")})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "loras"


async def test_load_and_unload_are_for_admins(app_factory: Callable[..., Any], lora_dir: Path) -> None:
    user = {"Authorization": f"Bearer {USER}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with app_factory(lora_dir=lora_dir, api_keys=[USER], admin_keys=[ADMIN]) as client:
        assert (await client.get("/v1/loras", headers=user)).status_code == 200
        denied = await client.post("/v1/loras/load", json={"name": "other"}, headers=user)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
        assert (await client.post("/v1/loras/unload", json={"name": "other"}, headers=user)).status_code == 403

        loaded = await client.post("/v1/loras/load", json={"name": "other"}, headers=admin)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model"] == "tiny-flux" and "cpu" in loaded.json()["seconds"]
        cards = {c["name"]: c for c in (await client.get("/v1/loras", headers=user)).json()["data"]}
        assert cards["other"]["loaded"] == ["tiny-flux@cpu"]

        for body, status, code in (({"name": "nope"}, 404, "lora_not_found"),
                                   ({"name": "someone/hub-lora"}, 403, "lora_not_allowed"),
                                   ({"name": "qwen-style"}, 400, "lora_family_mismatch"),
                                   ({"name": "other", "model": "tiny-qwen"}, 409, "model_not_loaded")):
            response = await client.post("/v1/loras/load", json=body, headers=admin)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text

        gone = await client.post("/v1/loras/unload", json={"name": "other"}, headers=admin)
        assert gone.status_code == 200, gone.text
        assert gone.status_code == 200 and gone.json()["devices"] == ["cpu"]
        again = await client.post("/v1/loras/unload", json={"name": "other"}, headers=admin)
        assert again.status_code == 404 and again.json()["error"]["param"] == "name"
        cards = {c["name"]: c for c in (await client.get("/v1/loras", headers=user)).json()["data"]}
        assert cards["other"]["loaded"] == []


async def test_hub_ids_are_refused_clearly(app_factory: Callable[..., Any], lora_dir: Path) -> None:
    async with app_factory(lora_dir=lora_dir, allow_any_model=True) as client:
        response = await client.post("/v1/loras/load", json={"name": "someone/hub-lora"})
        assert response.status_code == 501 and response.json()["error"]["code"] == "lora_download_unsupported"
        assert "FLUX_LORA_DIR" in response.json()["error"]["message"]


async def test_fp8_refuses_adapters_per_request(app_factory: Callable[..., Any], lora_dir: Path) -> None:
    """Only the HTTP check: FLUX_QUANTIZE=fp8 cannot load on the CPU, so the app runs unready here."""
    async with app_factory(ready=False, lora_dir=lora_dir, quantize="fp8", dtype="auto") as client:
        response = await client.post("/v1/images/generations", json=_body(loras=[{"name": "other"}]))
        assert response.status_code == 400 and response.json()["error"]["code"] == "loras_unavailable"
        assert "FLUX_QUANTIZE=fp8" in response.json()["error"]["message"]
        assert (await client.get("/v1/loras")).json()["available"] is False


def _pixels(response: Any) -> Any:
    import base64
    import io

    import numpy as np
    from PIL import Image

    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))


async def test_names_that_differ_only_in_punctuation_each_get_their_own_weights(
        app_factory: Callable[..., Any], cache_dir: Path, tmp_path: Path) -> None:
    """``style.v1`` and ``style_v1`` (and ``flux/dup``, listed so because a top-level ``dup`` exists, and
    ``flux_dup``) used to share one PEFT adapter name: one of them answered 400, the other then 500, and
    later ``style.v1`` got ``style_v1``'s image while the response said ``style.v1``. Each name must get
    the image of its own file: the one a fresh server computes with that file as its only loaded adapter."""
    import numpy as np

    model_dir = cache_dir / "models" / "tiny-flux"
    colliding = tmp_path / "colliding"
    files = {"style.v1": colliding / "style.v1.safetensors", "style_v1": colliding / "style_v1.safetensors",
             "dup": colliding / "dup.safetensors", "flux/dup": colliding / "flux" / "dup.safetensors",
             "flux_dup": colliding / "flux_dup.safetensors"}
    for seed, path in enumerate(files.values(), start=20):
        build_tiny_lora(model_dir, path, family="flux", base_model="tiny-flux", seed=seed, std=0.5)
    alone = tmp_path / "alone"  # the same files under names that share nothing
    alone.mkdir()
    for index, path in enumerate(files.values()):
        (alone / f"ref{index}.safetensors").write_bytes(path.read_bytes())

    def body(name: str) -> dict[str, Any]:
        return _body(loras=[{"name": name, "scale": 1.0}])

    expected: dict[str, Any] = {}
    async with app_factory(lora_dir=alone, lora_cache=1) as client:  # one adapter loaded at a time
        for index, name in enumerate(files):
            expected[name] = _pixels(await client.post("/v1/images/generations", json=body(f"ref{index}")))
    assert not np.array_equal(expected["style.v1"], expected["style_v1"])  # the test can tell them apart
    assert not np.array_equal(expected["flux/dup"], expected["flux_dup"])

    async with app_factory(lora_dir=colliding) as client:
        listed = {card["name"] for card in (await client.get("/v1/loras")).json()["data"]}
        assert set(files) <= listed
        for name in ("style_v1", "style.v1", "style_v1", "style.v1", "dup", "flux_dup", "flux/dup", "flux_dup",
                     "flux/dup"):
            response = await client.post("/v1/images/generations", json=body(name))
            pixels = _pixels(response)  # 200, never 400 or 500
            assert response.json()["data"][0]["params"]["loras"] == [{"name": name, "scale": 1.0}], name
            assert np.array_equal(pixels, expected[name]), f"{name} got another adapter's weights"
