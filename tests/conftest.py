"""Shared fixtures: tiny models built once per run, settings, in-process app, real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

pytest_plugins = ["tests.services", "tests.webhooks.receiver"]  # PostgreSQL, S3, job store, webhook receivers

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("FLUX_TEST_CACHE_DIR", ROOT / ".cache" / "test"))
ARTIFACTS = ROOT / "test-artifacts"

# Tests never read a developer's .env or environment: each builds its own settings.
for _name in [n for n in os.environ if n.startswith("FLUX_") and n != "FLUX_TEST_CACHE_DIR"]:
    del os.environ[_name]
# Settings built without make_settings keep their job store in a directory of this run, never in the
# developer's own state directory.
os.environ["FLUX_STATE_DIR"] = tempfile.mkdtemp(prefix="fluxserve-test-state-")
# One torch (OpenMP) thread in each test process and in the processes it starts, unless the environment says
# otherwise. The suite runs in parallel processes, each with servers of its own, that share the machine's cores:
# with a thread per core in each, OpenMP threads spin while they wait for descheduled ones, and two processes
# computing at once took ~10x as long as one. The tiny models gain nothing from a second thread, and a server on
# the CPU leaves a core to its event loop anyway (one thread on two cores). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's settings keep their job store in a directory of that test: no job of one test is ever
    found by another's server."""
    monkeypatch.setenv("FLUX_STATE_DIR", str(tmp_path / "state-env"))


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Held by one test process at a time on this machine (the suite runs in parallel processes): for what
    two processes must not do at once, such as building the tiny models or running a local Ray cluster."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / f"fluxserve-tests-{name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Tiny models are built here once and shared by every test (and every server subprocess)."""
    from fluxserve.engine.tiny import ensure_tiny_model
    from fluxserve.models.registry import BUILTIN_MODELS

    with exclusive("tiny-models"):
        for key, spec in BUILTIN_MODELS.items():  # every family's tiny-<key> (tiny-flux, tiny-qwen, ...)
            if spec.tiny is not None:
                ensure_tiny_model(CACHE_DIR / "models" / key, spec.tiny)
    return CACHE_DIR


@pytest.fixture
def make_settings(cache_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    from fluxserve.settings import Settings

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"model": "tiny-flux", "cache_dir": cache_dir, "output_dir": tmp_path / "outputs",
                                  "state_dir": tmp_path / "state", "device": "cpu", "warmup_sizes": ["64x64"],
                                  "hub_downloads": "off", "_env_file": None}  # tests never download (nor ask the hub)
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


# A batch, another thread count or another process does not compute bit for bit like one image alone; the README
# documents the difference as at most this many levels of 255 on the CPU. Byte identity is asserted only where the
# computation is the same.
ROUNDING_LEVELS = 2


def assert_same_image_within_rounding(first: Any, second: Any) -> None:
    """Two images (PNG bytes or pixel arrays) of the same request computed differently: equal within rounding."""
    import io

    import numpy as np
    from PIL import Image

    def pixels(image: Any) -> Any:
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image)).convert("RGB")
        return np.asarray(image, dtype=np.int16)

    a, b = pixels(first), pixels(second)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert int(np.abs(a - b).max()) <= ROUNDING_LEVELS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ReadinessSocket:
    """A ``NOTIFY_SOCKET`` for one server subprocess: fluxserve speaks systemd's readiness protocol, so waiting
    for a server is one blocking receive of its ``READY=1`` (no polling). A watcher thread sends a datagram of
    its own when the process exits first, so a crashed start-up is reported at once."""

    EXITED = b"EXITED"

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fxn")  # short: a socket path has room for ~100 bytes
        self.address = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)

    def wait_ready(self, proc: subprocess.Popen[bytes], logs: Callable[[], str], timeout: float = 120) -> None:
        """Until the server announces it is ready; raises with its log if it exits, is not ready or is late."""

        def watch() -> None:
            proc.wait()
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(self.EXITED, self.address)

        threading.Thread(target=watch, name="server-exit-watch", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                message = self._sock.recv(4096)
            except TimeoutError:
                raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{logs()[-3000:]}") from None
            if message == self.EXITED:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{logs()[-3000:]}")
            fields = dict(line.partition("=")[::2] for line in message.decode().splitlines())
            if fields.get("READY") == "1":
                if fields.get("STATUS") != "ready":
                    raise RuntimeError(f"server up but {fields.get('STATUS')}:\n{logs()[-3000:]}")
                return

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class ServerProcess:
    """``fluxserve serve`` in a real subprocess on loopback. Its output is copied line by line to ``log_path``
    by a reader thread, which also wakes :meth:`wait_for_log`; readiness comes by :class:`ReadinessSocket`."""

    def __init__(self, env: dict[str, str], log_path: Path, args: list[str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._readiness = ReadinessSocket()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
        full_env.update({"FLUX_PORT": str(self.port), "FLUX_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
                         "NOTIFY_SOCKET": self._readiness.address, "FLUX_HUB_DOWNLOADS": "off",
                         # a job store of its own unless the test names one (one SQLite store serves one process)
                         "FLUX_STATE_DIR": tempfile.mkdtemp(prefix="fluxserve-state-")})
        full_env.update(env)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._lines: list[str] = []
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxserve", "serve", *(args or [])], env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(log_path.parent))
        self._reader = threading.Thread(target=self._copy_output, name="server-log", daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # until the process (and anything holding its stdout) is gone
            with self._new_line:
                if not self._log.closed:
                    self._log.write(raw)
                    self._log.flush()
                self._lines.append(raw.decode(errors="replace"))
                self._new_line.notify_all()

    def wait_ready(self, timeout: float = 120) -> None:
        self._readiness.wait_ready(self.proc, self.logs, timeout)

    def logs(self) -> str:
        """The output so far (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(30)
        with self._new_line:
            return "".join(self._lines)

    def log_mark(self) -> int:
        """A position in the output: :meth:`wait_for_log` with ``since`` looks only at lines after it."""
        with self._new_line:
            return len(self._lines)

    def wait_for_log(self, matches: Callable[[str], bool], *, since: int = 0, timeout: float = 60) -> str:
        """The first output line after ``since`` that ``matches``, waiting (on the reader's notifications)
        for it to be written."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self._lines[since:]:
                    if matches(line):
                        return line
                since = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._new_line.wait(remaining):
                    raise TimeoutError(f"no such log line after {timeout:.0f}s:\n{''.join(self._lines)[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(30)
        with self._new_line:
            self._log.close()
        self._readiness.close()
        return self.proc.returncode


@pytest.fixture
def server_factory(cache_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; every one started is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, *, args: list[str] | None = None, ready: bool = True,
              name: str = "server") -> ServerProcess:
        base = {"FLUX_MODEL": "tiny-flux", "FLUX_CACHE_DIR": str(cache_dir), "FLUX_DEVICE": "cpu",
                "FLUX_OUTPUT_DIR": str(tmp_path / "outputs"), "FLUX_WARMUP_SIZES": "64x64",
                # each server its own job store (one SQLite file serves one process); a test that restarts a
                # server on the same store passes FLUX_STATE_DIR or FLUX_JOB_STORE itself
                "FLUX_STATE_DIR": str(tmp_path / f"state-{len(started)}")}
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
