"""CORS (same origin only unless configured; never '*' with credentials), loopback bind by default,
and model loading (no remote code, safetensors, requests limited to registry keys)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from .helpers import assert_openai_error

SITE = "https://app.example.com"
EVIL = "https://evil.example.net"


def _preflight(client: Any, origin: str) -> Any:
    return client.options("/v1/images/generations", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_no_cross_origin_access_by_default(bare_client: Callable[..., Any]) -> None:
    with bare_client() as client:
        response = client.get("/v1/models", headers={"Origin": EVIL})
        assert "access-control-allow-origin" not in response.headers
        preflight = _preflight(client, EVIL)
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-credentials" not in preflight.headers


def test_configured_origins_only(bare_client: Callable[..., Any]) -> None:
    with bare_client(cors_origins=[SITE]) as client:
        ok = client.get("/v1/models", headers={"Origin": SITE})
        assert ok.headers["access-control-allow-origin"] == SITE
        assert ok.headers["access-control-allow-credentials"] == "true"
        preflight = _preflight(client, SITE)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == SITE
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        for other in (EVIL, SITE + ".evil.net", "null", "http://app.example.com"):
            assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": other}).headers
            assert _preflight(client, other).headers.get("access-control-allow-origin") != other


@pytest.mark.parametrize("origins", [["*"], ["*", SITE], [SITE, "*"]])
def test_wildcard_never_comes_with_credentials(bare_client: Callable[..., Any], origins: list[str]) -> None:
    with bare_client(cors_origins=origins) as client:
        for origin in (EVIL, SITE):
            for response in (client.get("/v1/models", headers={"Origin": origin, "Cookie": "session=1"}),
                             _preflight(client, origin)):
                assert "access-control-allow-credentials" not in response.headers, response.headers
                assert response.headers.get("access-control-allow-origin") in ("*", None)


def test_preflight_passes_auth_but_the_request_does_not(bare_client: Callable[..., Any]) -> None:
    with bare_client(cors_origins=[SITE], api_keys=["sk-cors-test-key-123456"]) as client:
        assert _preflight(client, SITE).status_code == 200
        assert_openai_error(client.get("/v1/models", headers={"Origin": SITE}), 401)


def test_binds_loopback_by_default(make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is exposed unless FLUX_HOST says so: the default reaches uvicorn as 127.0.0.1."""
    import fluxserve.server as server
    from fluxserve.settings import Settings

    assert Settings.model_fields["host"].default == "127.0.0.1"
    seen: dict[str, Any] = {}

    def fake_run(self: Any, *args: Any, **kwargs: Any) -> None:
        seen["host"], seen["port"] = self.config.host, self.config.port

    monkeypatch.setattr(server.GracefulServer, "run", fake_run)
    settings = make_settings()
    assert settings.host == "127.0.0.1"
    assert server.serve(settings) == 0
    assert seen["host"] == "127.0.0.1"
    server.serve(make_settings(host="0.0.0.0"))  # only when asked for
    assert seen["host"] == "0.0.0.0"


def _capture_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import diffusers

    seen: dict[str, Any] = {}

    def fake(source: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, source=source)
        raise OSError("stop here (test)")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", staticmethod(fake))
    return seen


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_off_unless_enabled(make_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                        trust: bool) -> None:
    from fluxserve.engine.device import select_device_dtype
    from fluxserve.engine.loading import load_model
    from fluxserve.generation import ModelLoadError
    from fluxserve.models.registry import BUILTIN_MODELS

    seen = _capture_from_pretrained(monkeypatch)
    settings = make_settings(**({"trust_remote_code": True} if trust else {}))
    with pytest.raises(ModelLoadError):
        load_model(BUILTIN_MODELS["tiny-flux"], select_device_dtype("cpu", "auto", "auto"), settings)
    assert seen["trust_remote_code"] is trust
    assert seen.get("use_safetensors") is not False  # diffusers' default: safetensors whenever the repo has them


def test_models_load_from_safetensors(cache_dir: Path) -> None:
    weights = [p for p in (cache_dir / "models" / "tiny-flux").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in weights)
    assert not [p for p in weights if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


@pytest.mark.parametrize("name", [
    # hub repos that are not registry keys (FLUX.1-Kontext-dev is one now), paths, URLs, traversal
    "black-forest-labs/FLUX.1-Fill-dev", "someone/evil-model", "/etc", "../../../../etc/passwd",
    "~/models/x", "C:\\models\\x", "https://example.com/model.safetensors", "tiny-flux/../schnell",
])
def test_requests_may_only_name_registry_keys(bare_client: Callable[..., Any], name: str) -> None:
    with bare_client() as client:
        assert_openai_error(client.post("/v1/images/generations", json={"prompt": "x", "model": name}), 404,
                            param="model", code="model_not_found")
        assert_openai_error(client.post("/v1/images/jobs", json={"prompt": "x", "model": name}), 404, param="model")
        assert_openai_error(client.post("/v1/models/select", json={"model": name}), 404, param="model")
        assert_openai_error(client.get("/v1/models/" + quote(name, safe="")), 404)  # (unquoted, the client
        # itself would resolve "tiny-flux/../schnell" to /v1/models/schnell)


def test_allow_any_model_opens_hub_repos(bare_client: Callable[..., Any]) -> None:
    with bare_client(allow_any_model=True) as client:
        card = client.get("/v1/models/someone/some-model")
        assert card.status_code == 200 and card.json()["id"] == "someone/some-model"
    with bare_client() as client:
        assert client.get("/v1/models/tiny-flux").status_code == 200
        assert client.get("/v1/models/someone/some-model").status_code == 404
