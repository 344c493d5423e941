"""Graceful shutdown of a real ``fluxserve serve`` process.

SIGTERM/SIGINT: new work gets 503 ``shutting_down`` and /ready turns 503 while the server still
listens; in-flight and queued jobs finish (up to FLUX_SHUTDOWN_TIMEOUT); what is left then is
cancelled with a clear 503; files and logs are flushed; the process exits 0.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

GEN = "/v1/images/generations"
# One job ≈ 1-3 s on a busy 2-core machine; one slot and no batching, so jobs queue behind each other.
SLOW = {"size": "256x256", "num_inference_steps": 40, "store_local": True, "write_metadata": True}
ENV = {"FLUX_MAX_BATCH": "1", "FLUX_MAX_CONCURRENT": "1", "FLUX_LOG_LEVEL": "INFO"}


def _post(base_url: str, prompt: str, **extra: Any) -> httpx.Response:
    return httpx.post(base_url + GEN, json={"prompt": prompt, **SLOW, **extra}, timeout=120)


def _wait_for_backlog(base_url: str, running: int = 1, queued: int = 1, timeout: float = 60) -> None:
    """Until the server has ``running`` jobs in flight and ``queued`` more waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = httpx.get(base_url + "/v1/metrics/summary", timeout=10).json()["queue"]
        if queue["jobs_in_flight"] >= running and queue["queue_depth"] >= queued:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no backlog: {queue}")


def _assert_image(response: httpx.Response, output_dir: Path) -> None:
    assert response.status_code == 200, response.text[:300]
    item = response.json()["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (256, 256)
    saved, meta = output_dir / item["saved_path"], output_dir / item["metadata_path"]  # relative names
    assert saved.resolve().is_relative_to(output_dir.resolve())
    with Image.open(saved) as img:
        img.load()
        assert img.size == (256, 256)
    assert json.loads(meta.read_text(encoding="utf-8"))["image"] == saved.name


def _wait_exit(server: Any, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = server.proc.wait(timeout)
    return code, time.monotonic() - started


def test_sigterm_finishes_in_flight_and_queued_jobs_then_exits_0(server_factory: Callable[..., Any],
                                                                  tmp_path: Path) -> None:
    output_dir = tmp_path / "outputs"
    leftover = output_dir / "2020-01-01" / ".tmp-crashed-write"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an image")  # what a crash mid-write leaves behind
    server = server_factory({**ENV, "FLUX_SHUTDOWN_TIMEOUT": "120", "FLUX_MAX_STEPS": "1000"}, name="sigterm")
    assert not leftover.exists()  # removed at start-up

    with ThreadPoolExecutor(4) as pool:
        futures: list[Future[httpx.Response]] = [pool.submit(_post, server.base_url, f"job {i}",
                                                             num_inference_steps=120) for i in range(4)]
        _wait_for_backlog(server.base_url, running=1, queued=3)  # all four accepted before the signal
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)

        # still listening, but refusing new work
        ready = httpx.get(server.base_url + "/ready", timeout=10)
        assert ready.status_code == 503 and "shutting down" in ready.json()["reasons"]
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        late = httpx.post(server.base_url + GEN, json={"prompt": "too late", "size": "64x64"}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"

        for future in futures:  # every accepted job, running or queued at the signal, completes
            _assert_image(future.result(timeout=180), output_dir)

    code, _ = _wait_exit(server, 60)
    assert code == 0
    logs = server.logs()
    assert "shutdown requested" in logs and "exited cleanly" in logs
    assert "Traceback" not in logs
    assert not list(output_dir.rglob(".tmp-*"))


def test_jobs_left_at_the_timeout_are_cancelled_with_a_clear_error(server_factory: Callable[..., Any]) -> None:
    server = server_factory({**ENV, "FLUX_SHUTDOWN_TIMEOUT": "1"}, name="timeout")
    with ThreadPoolExecutor(6) as pool:
        # 100 steps: each job takes seconds, so the 1 s timeout leaves most of them unfinished
        futures = [pool.submit(_post, server.base_url, f"job {i}", num_inference_steps=100) for i in range(6)]
        _wait_for_backlog(server.base_url, running=1, queued=4)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        responses = [future.result(timeout=120) for future in futures]
        answered = time.monotonic() - signalled
    code, _ = _wait_exit(server, 60)
    total = time.monotonic() - signalled
    assert code == 0

    cancelled = [r for r in responses if r.status_code == 503]
    assert len(cancelled) >= 3, [r.status_code for r in responses]  # the queued ones at least
    assert all(r.status_code in (200, 503) for r in responses)
    for response in cancelled:
        error = response.json()["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
        assert error["type"] == "server_error"
    assert answered < 1 + 10, answered  # the timeout, plus a running step to notice the cancel
    assert total < 1 + 5 + 15, total  # + response grace + process teardown, with room for a busy machine
    assert "cancelled" in server.logs()


class _FakeScheduler:
    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.drained: list[float] = []

    def stats(self) -> dict[str, int]:
        return {"queue_depth": 3 if self.busy else 0, "jobs_in_flight": 1 if self.busy else 0}

    def drain(self, timeout: float) -> int:
        self.drained.append(timeout)
        return 4 if self.busy else 0


class _FakeRuntime:
    def __init__(self, busy: bool, timeout: float) -> None:
        self.settings = SimpleNamespace(shutdown_timeout=timeout, notify_socket=None)
        self.scheduler = _FakeScheduler(busy)
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        self.shutting_down = True


def _server(runtime: _FakeRuntime) -> Any:
    import uvicorn

    from fluxserve.server import GracefulServer

    return GracefulServer(uvicorn.Config(app=lambda *_: None), runtime)  # type: ignore[arg-type]


def test_drain_waits_while_busy_and_a_second_signal_cancels_at_once() -> None:
    runtime = _FakeRuntime(busy=True, timeout=300)
    server = _server(runtime)
    server.handle_exit(signal.SIGTERM, None)
    assert runtime.shutting_down  # refusing new work from the first signal on
    time.sleep(0.3)
    assert not server.should_exit  # still listening while jobs run (300 s allowed)
    server.handle_exit(signal.SIGTERM, None)
    server._drainer.join(5)
    assert server.should_exit and server.cancelled_jobs == 4 and runtime.scheduler.drained == [0]


def test_drain_of_an_idle_server_stops_at_once() -> None:
    runtime = _FakeRuntime(busy=False, timeout=300)
    server = _server(runtime)
    server.handle_exit(signal.SIGINT, None)
    server._drainer.join(60)  # a drain that waited for its 300 s budget would still be running here
    assert server.should_exit and server.cancelled_jobs == 0 and not server._drainer.is_alive()
