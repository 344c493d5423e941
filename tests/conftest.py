"""Shared fixtures: tiny models built once per run, settings, in-process app, real server processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("FLUX_TEST_CACHE_DIR", ROOT / ".cache" / "test"))
ARTIFACTS = ROOT / "test-artifacts"

# Tests never read a developer's .env or environment: each builds its own settings.
for _name in [n for n in os.environ if n.startswith("FLUX_") and n != "FLUX_TEST_CACHE_DIR"]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Tiny models are built here once and shared by every test (and every server subprocess)."""
    from fluxserve.engine.registry import BUILTIN_MODELS
    from fluxserve.engine.tiny import ensure_tiny_model

    for key, spec in BUILTIN_MODELS.items():  # every family's tiny-<key> (tiny-flux, tiny-qwen, tiny-klein, ...)
        if spec.tiny is not None:
            ensure_tiny_model(CACHE_DIR / "models" / key, spec.tiny)
    return CACHE_DIR


@pytest.fixture
def make_settings(cache_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    from fluxserve.settings import Settings

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"model": "tiny-flux", "cache_dir": cache_dir, "output_dir": tmp_path / "outputs",
                                  "device": "cpu", "warmup_sizes": ["64x64"], "_env_file": None}
        values.update(overrides)
        return Settings(**values)

    return make


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.get("/ready")
        if response.status_code == 200:
            return
        body = response.json()
        if any("failed" in r for r in body.get("reasons", [])):
            raise RuntimeError(f"server failed to start: {body}")
        await asyncio.sleep(0.05)
    raise TimeoutError("server did not become ready")


@asynccontextmanager
async def running_app(settings: Any, *, ready: bool = True, runtime: Any = None) -> AsyncIterator[httpx.AsyncClient]:
    """A started in-process app and an httpx client on it (``client.app`` is the FastAPI app)."""
    from fluxserve.api.app import create_app

    app = create_app(settings, runtime)
    async with (LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver",
                                  timeout=120) as client):
        client.app = app  # type: ignore[attr-defined]
        if ready:
            await wait_ready(client)
        yield client


@pytest.fixture
def app_factory(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``async with app_factory(**settings) as client`` → an httpx client on a started in-process app."""

    def factory(*, ready: bool = True, **overrides: Any) -> Any:
        return running_app(make_settings(**overrides), ready=ready)

    return factory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_process_ready(base_url: str, proc: subprocess.Popen[bytes], logs: Callable[[], str],
                       timeout: float = 120) -> None:
    """Until a server subprocess answers /ready with 200 (it publishes no event: poll, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{logs()[-3000:]}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready:\n{logs()[-3000:]}")


class ServerProcess:
    """``fluxserve serve`` in a real subprocess on loopback, logs captured to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
        full_env.update({"FLUX_PORT": str(self.port), "FLUX_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxserve", "serve", *(args or [])], env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=str(log_path.parent))

    def wait_ready(self, timeout: float = 120) -> None:
        wait_process_ready(self.base_url, self.proc, self.logs, timeout)

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def server_factory(cache_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; every one started is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, *, args: list[str] | None = None, ready: bool = True,
              name: str = "server") -> ServerProcess:
        base = {"FLUX_MODEL": "tiny-flux", "FLUX_CACHE_DIR": str(cache_dir), "FLUX_DEVICE": "cpu",
                "FLUX_OUTPUT_DIR": str(tmp_path / "outputs"), "FLUX_WARMUP_SIZES": "64x64"}
        base.update(env or {})
        server = ServerProcess(base, tmp_path / f"{name}.log", args)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One real server on tiny-flux with default settings."""
    return server_factory()
