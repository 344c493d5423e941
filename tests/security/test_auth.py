"""API keys: FLUX_API_KEYS / FLUX_API_KEYS_FILE, Bearer auth on every /v1 route, OpenAI-shaped 401s,
open liveness/readiness, configurable /metrics, constant-time comparison, fail-closed key files."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import assert_openai_error

KEYS = ["sk-first-0123456789abcdef", "sk-second-fedcba9876543210"]


def _assert_401(response: Any) -> None:
    error = assert_openai_error(response, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert response.headers.get("www-authenticate") == "Bearer"
    for key in KEYS:
        assert key not in response.text


def _v1_routes(app: Any) -> list[tuple[str, str]]:
    """(method, concrete path) for every /v1 operation in the app's OpenAPI schema, parameters filled in."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/v1"):
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            found += [(method.upper(), concrete) for method in operations]
    return found


def test_every_v1_route_needs_a_key(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=KEYS) as client:
        routes = _v1_routes(client.fastapi_app)
        assert len(routes) >= 12, routes  # generations, jobs, files, cancel, models, memory, tokenize, metrics...
        for method, path in routes:
            _assert_401(client.request(method, path, json={"prompt": "x", "model": "tiny-flux"}))
            _assert_401(client.request(method, path, headers={"Authorization": "Bearer wrong-key"}))
        # not just the routes that exist: an unknown /v1 path answers 401 too, revealing nothing
        _assert_401(client.get("/v1/does-not-exist"))
        _assert_401(client.get("/v1"))


@pytest.mark.parametrize("header", [
    "", "Bearer", "Bearer ", "bearer", "Basic " + KEYS[0], "Token " + KEYS[0], KEYS[0], "Bearer " + KEYS[0][:-1],
    "Bearer " + KEYS[0] + "x", "Bearer " + KEYS[0].upper(), "Bearer " + KEYS[0] + "," + KEYS[1],
    "Bearer \u00e9t\u00e9".encode(), b"Bearer \xff\xfe",
])
def test_wrong_or_malformed_credentials_get_401(bare_client: Callable[..., Any], header: str | bytes) -> None:
    with bare_client(api_keys=KEYS) as client:
        headers = {"Authorization": header} if header else {}
        _assert_401(client.get("/v1/models", headers=headers))


def test_each_configured_key_works(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=KEYS) as client:
        for key in KEYS:
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert client.get("/v1/models", headers={"Authorization": f"bearer   {key}  "}).status_code == 200


def test_keys_from_env_string_and_file_are_merged(bare_client: Callable[..., Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxserve.settings import load_settings

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# operators' keys\n\nsk-from-file-aaaaaaaa\n  sk-from-file-bbbbbbbb  \n", encoding="utf-8")
    monkeypatch.setenv("FLUX_API_KEYS", "sk-env-1111111111, sk-env-2222222222")
    monkeypatch.setenv("FLUX_API_KEYS_FILE", str(keys_file))
    settings = load_settings(_env_file=None)
    assert settings.all_api_keys() == ["sk-env-1111111111", "sk-env-2222222222", "sk-from-file-aaaaaaaa",
                                       "sk-from-file-bbbbbbbb"]
    with bare_client(api_keys=settings.api_keys, api_keys_file=keys_file) as client:
        for key in settings.all_api_keys():
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        _assert_401(client.get("/v1/models", headers={"Authorization": "Bearer # operators' keys"}))
        _assert_401(client.get("/v1/models"))


def test_health_ready_and_docs_stay_open(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=KEYS) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code in (200, 503)  # open: never 401 (not started here: 503)
        assert client.get("/ready").status_code != 401
        assert client.get("/openapi.json").status_code == 200


def test_metrics_open_by_default_and_protected_when_configured(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=KEYS) as client:
        assert client.get("/metrics").status_code == 200
    with bare_client(api_keys=KEYS, metrics_require_auth=True) as client:
        _assert_401(client.get("/metrics"))
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
        assert ok.status_code == 200 and "fluxserve" in ok.text


def test_no_keys_means_no_auth(bare_client: Callable[..., Any]) -> None:
    with bare_client() as client:
        assert client.get("/v1/models").status_code == 200


def test_comparison_is_constant_time_over_all_keys(bare_client: Callable[..., Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is compared, with hmac.compare_digest, on fixed-length digests: neither which key
    matched nor how long the keys are shows in the timing."""
    import fluxserve.api.middleware as middleware

    calls: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    with bare_client(api_keys=KEYS) as client:
        for presented, status in (("nope", 401), (KEYS[0], 200), (KEYS[1], 200), ("x" * 500, 401)):
            calls.clear()
            response = client.get("/v1/models", headers={"Authorization": f"Bearer {presented}"})
            assert response.status_code == status
            assert len(calls) == len(KEYS), "stopped comparing at the first match (or compared no key)"
            assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
            assert calls[0][0] == hashlib.sha256(presented.encode()).digest()


def test_a_missing_or_empty_keys_file_refuses_to_start(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    """A typo in FLUX_API_KEYS_FILE must not start an open server."""
    from fluxserve.server import serve
    from fluxserve.settings import SettingsError

    with pytest.raises(SettingsError, match="FLUX_API_KEYS_FILE"):
        serve(make_settings(api_keys_file=tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# no keys yet\n\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="no keys"):
        serve(make_settings(api_keys_file=empty))


def test_keys_are_redacted_from_the_settings_that_get_logged(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(api_keys=KEYS, hf_token="hf_secret_token_value")
    text = repr(settings.redacted())
    for secret in [*KEYS, "hf_secret_token_value"]:
        assert secret not in text
