"""Assertions and raw-socket tools shared by the security and reliability tests."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The response is ``status`` with OpenAI's error shape (and the given param/code when named)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@contextlib.contextmanager
def serve_in_thread(settings: Any, app: Any = None) -> Iterator[tuple[int, Any]]:
    """A real uvicorn server with fluxserve's protocol (:func:`fluxserve.server.http_limits`) on loopback, in a
    thread, around ``app`` (default: an app on ``settings`` whose runtime is never started, so no model is
    loaded). Yields (port, app); the server is stopped afterwards."""
    import uvicorn

    from fluxserve.api.app import create_app
    from fluxserve.server import http_limits

    app = app if app is not None else create_app(settings, manage_runtime=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False,
                                           lifespan="off", **http_limits(settings)))
    started = threading.Event()
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        started.set()

    server.startup = startup  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert started.wait(60), "server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(30)


def connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a reset ends it too); a server that keeps it
    open for the socket's timeout fails the test."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; got {data[:200]!r}") from None
        if not chunk:
            return data
        data += chunk


def status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    """(status, the OpenAI error object) of a raw error response, checking its shape."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), response[:200]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    return int(head[9:12]), error


_PROBE = """
import sys, threading, time, httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with httpx.Client(base_url=sys.argv[1], timeout=30) as client:
    while not stop.wait(0.05):
        started = time.perf_counter()
        try:
            status = client.get("/health").status_code
        except httpx.TransportError as exc:
            print("failed", type(exc).__name__, flush=True)
            continue
        print(status, time.perf_counter() - started, flush=True)
"""


class HealthProbe:
    """A load balancer's liveness probe of ``base_url``: ``GET /health`` every 50 ms, from a process of its
    own (so the latencies are the server's, not those of the test's busy threads), until :meth:`stop`."""

    def __init__(self, base_url: str) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE, base_url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def stop(self) -> HealthProbe:
        """Ends the probing (closing its stdin) and collects what it saw."""
        output, _ = self._proc.communicate("", timeout=60)
        for line in output.splitlines():
            status, _, value = line.partition(" ")
            if status == "200":
                self.latencies.append(float(value))
            else:
                self.failures.append(line)
        return self

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    @property
    def median(self) -> float:
        return sorted(self.latencies)[len(self.latencies) // 2] if self.latencies else 0.0
