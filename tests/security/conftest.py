"""Fixtures for the security tests.

``live_client``: one in-process app per package with a started runtime (tiny-flux on the CPU) and
tight, known limits, so that a request the validation wrongly lets through is generated (and the test
sees a 200), never left hanging. ``bare_client``: an app whose runtime is never started (no model
loaded) for middleware-only checks: auth, CORS, body limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

# The limits of the live app; tests name them instead of repeating numbers.
LIMITS: dict[str, Any] = {
    "max_images_per_request": 2, "max_prompt_chars": 1000, "min_size": 64, "max_size": 256,
    "max_pixels": 128 * 128, "max_steps": 4, "max_guidance": 10.0, "max_body_bytes": 64 * 1024,
}


@pytest.fixture(scope="package")
def live_settings(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fluxserve.settings import Settings

    return Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("security") / "out",
                    device="cpu", warmup_sizes=["64x64"], store_local=False, max_batch=1, hub_downloads="off",
                    _env_file=None,
                    **LIMITS)


@pytest.fixture(scope="package")
def live_runtime(live_settings: Any) -> Iterator[Any]:
    from fluxserve.runtime import Runtime

    runtime = Runtime(live_settings)
    runtime.start(wait=True)
    ok, reasons = runtime.readiness()
    assert ok, reasons
    yield runtime
    runtime.close(timeout=5)


@pytest.fixture(scope="package")
def live_app(live_settings: Any, live_runtime: Any) -> Any:
    from fluxserve.api.app import create_app

    return create_app(live_settings, live_runtime, manage_runtime=False)


@pytest.fixture(scope="package")
def live_client(live_app: Any) -> Iterator[TestClient]:
    with TestClient(live_app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def bare_client(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``with bare_client(**settings) as client``: middleware and validation only, no model loaded."""
    from fluxserve.api.app import create_app

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        app = create_app(make_settings(**overrides), manage_runtime=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            client.fastapi_app = app  # type: ignore[attr-defined]
            yield client

    return factory
