"""Roles and rates, in-process (middleware and routes; no model is loaded unless a test says so).

- FLUX_ADMIN_KEYS: with keys configured, select, unload, memory release, LoRA library changes and the
  runtime snapshot of /v1/models need an admin key; ordinary keys get 403 ``permission_denied``.
  Without keys nothing changes (every client is an admin, the loopback default).
- FLUX_RATE_LIMIT_PER_MINUTE: a token bucket per key; 429 ``rate_limit_exceeded`` with Retry-After;
  one key's flood does not use up another key's bucket.
- Nothing internal leaks: /, /ready and /v1/models for ordinary keys carry no absolute paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import assert_openai_error

ADMIN = "sk-admin-0123456789abcdef"
USER = "sk-user-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
GEN = "/v1/images/generations"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN_ACTIONS = [("/v1/models/select", {"model": "tiny-flux"}), ("/v1/models/unload", {"model": "tiny-qwen"}),
                 ("/v1/memory/release", {}), ("/v1/loras", {"name": "style"}), ("/v1/loras/style/delete", {})]


@pytest.mark.parametrize(("path", "body"), ADMIN_ACTIONS)
def test_ordinary_keys_get_403_for_admin_actions(bare_client: Callable[..., Any], path: str,
                                                  body: dict[str, Any]) -> None:
    with bare_client(api_keys=[USER], admin_keys=[ADMIN]) as client:
        error = assert_openai_error(client.post(path, json=body, headers=_auth(USER)), 403, code="permission_denied")
        assert error["type"] == "permission_error" and "FLUX_ADMIN_KEYS" in error["message"]
        assert client.post(path, json=body).status_code == 401  # no key at all: still 401 first
        admitted = client.post(path, json=body, headers=_auth(ADMIN))
        assert admitted.status_code not in (401, 403), admitted.text[:300]  # past auth (the route answers)


def test_keys_without_admin_keys_mean_nobody_may_administer(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=[USER]) as client:
        assert_openai_error(client.post("/v1/memory/release", json={}, headers=_auth(USER)), 403,
                            code="permission_denied")


def test_admin_keys_alone_turn_auth_on(bare_client: Callable[..., Any]) -> None:
    with bare_client(admin_keys=[ADMIN]) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=_auth(ADMIN)).status_code == 200


def test_without_keys_everyone_is_admin_as_before(make_settings: Callable[..., Any],
                                                  bare_client: Callable[..., Any]) -> None:
    with bare_client() as client:
        released = client.post("/v1/memory/release", json={})
        assert released.status_code == 200 and released.json()["ok"]
        assert "runtime" in client.get("/v1/models").json()


def test_the_runtime_snapshot_with_paths_is_for_admins(bare_client: Callable[..., Any], tmp_path: Path) -> None:
    with bare_client(api_keys=[USER], admin_keys=[ADMIN]) as client:
        ordinary = client.get("/v1/models", headers=_auth(USER))
        assert ordinary.status_code == 200 and ordinary.json()["data"]  # the OpenAI list still works
        assert "runtime" not in ordinary.json() and "cache_dir" not in ordinary.json()
        assert str(tmp_path) not in ordinary.text and "/.cache" not in ordinary.text
        admin = client.get("/v1/models", headers=_auth(ADMIN)).json()
        assert admin["runtime"]["output_dir"] and "cache_dir" in admin


def test_root_and_ready_carry_no_paths(bare_client: Callable[..., Any], tmp_path: Path) -> None:
    local = tmp_path / "my-local-pipeline"
    with bare_client(api_keys=[USER]) as client:
        runtime = client.fastapi_app.state.runtime
        spec = runtime.resolve(None)
        from dataclasses import replace

        # as if FLUX_MODEL were a directory
        runtime.models.names.configured[spec.key] = replace(spec, source=str(local))
        root = client.get("/", headers={"accept": "application/json"})
        assert root.status_code == 200 and str(tmp_path) not in root.text
        assert root.json()["model"]["active_id"] == "local/my-local-pipeline"
        runtime.models.startup_error = f"could not load {local}/transformer: [Errno 2] No such file: '{local}/x.json'"
        runtime.models._startup_done.set()
        ready = client.get("/ready")
        assert ready.status_code == 503 and str(tmp_path) not in ready.text and "could not load" in ready.text


def test_a_plain_file_as_output_dir_makes_ready_503_without_the_path(bare_client: Callable[..., Any],
                                                                      tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the output directory should be")
    with bare_client(output_dir=blocker, store_local=True) as client:
        client.fastapi_app.state.runtime.models._startup_done.set()
        reasons = client.get("/ready").json()["reasons"]
        assert "output directory is not writable (FLUX_OUTPUT_DIR)" in reasons
        assert str(tmp_path) not in " ".join(reasons)


# --- rate limit -----------------------------------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after_per_key(bare_client: Callable[..., Any]) -> None:
    with bare_client(api_keys=[USER, OTHER], rate_limit_per_minute=1, rate_limit_burst=3) as client:
        # invalid bodies (400) still count: floods of bad requests are floods too, and cost nothing here
        answers = [client.post(GEN, json={"prompt": ""}, headers=_auth(USER)).status_code for _ in range(5)]
        assert answers == [400, 400, 400, 429, 429], answers
        limited = client.post("/v1/images/jobs", json={"prompt": ""}, headers=_auth(USER))
        error = assert_openai_error(limited, 429, code="rate_limit_exceeded")
        assert error["type"] == "rate_limit_error" and "FLUX_RATE_LIMIT_PER_MINUTE" in error["message"]
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert client.post(GEN, json={"prompt": ""}, headers=_auth(OTHER)).status_code == 400  # its own bucket
        assert client.get("/v1/models", headers=_auth(USER)).status_code == 200  # only generations count


def test_token_buckets_refill_and_stay_bounded() -> None:
    from fluxserve.api.middleware import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(rate=0.5, burst=2, max_clients=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)  # one token every 2 s
    now[0] += 2.0
    assert buckets.take("a") == 0.0
    for client in ("b", "c", "d", "e"):
        buckets.take(client)
    assert len(buckets._buckets) == 3  # the least recently used client was forgotten
