"""One client cannot take the server's connections from the others: slow request bodies and held event
streams meet the client's own budget (FLUX_MAX_CONNECTIONS_PER_CLIENT, FLUX_MAX_STREAMS_PER_CLIENT) and the
body rate (FLUX_BODY_TIMEOUT, FLUX_BODY_MIN_RATE), well before the server-wide FLUX_MAX_CONNECTIONS, while
another key and /health are served.

A real uvicorn with fluxserve's protocol on loopback, driven over raw sockets; the app's runtime is never
started (no model is loaded). The attacker paces its own bytes; every assertion waits on what the server
sends (a status line, a closed connection), never on the clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import socket
from collections.abc import Callable
from typing import Any

import httpx

from .helpers import connect, read_all, serve_in_thread, status_and_error

ATTACKER = "sk-attacker-0123456789abcdef"
LEGIT = "sk-legit-0123456789abcdefghi"
MAX_CONNECTIONS = 16
PER_CLIENT = 4
STREAMS_PER_CLIENT = 2
LIMITS = {"api_keys": [ATTACKER, LEGIT], "max_connections": MAX_CONNECTIONS, "max_connections_per_client": PER_CLIENT,
          "max_streams_per_client": STREAMS_PER_CLIENT, "body_timeout": 1.0, "body_min_rate": 1000,
          "header_timeout": 30}


def _head(method: str, path: str, key: str, *extra: bytes) -> bytes:
    return b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), b"Host: x", f"Authorization: Bearer {key}".encode(),
                         *extra]) + b"\r\n\r\n"


def _read_head(sock: socket.socket) -> bytes:
    """A response's status line and headers (the server sends them before anything else)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _owner(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # what ApiKeyMiddleware records


def test_slow_bodies_meet_their_clients_own_limit_and_time_out(make_settings: Callable[..., Any]) -> None:
    with serve_in_thread(make_settings(**LIMITS)) as (port, _):
        base = f"http://127.0.0.1:{port}"
        admitted: list[socket.socket] = []
        refused: list[str] = []
        # 1. Three times the server's connections from one key, each offering a 1000-byte body to a route that
        #    reads it (the client waits for "100 Continue": the app is then reading its body).
        for _ in range(3 * MAX_CONNECTIONS):
            sock = connect(port)
            sock.sendall(_head("POST", "/v1/tokenize", ATTACKER, b"Content-Type: application/json",
                               b"Content-Length: 1000", b"Expect: 100-continue"))
            head = _read_head(sock)
            if head.startswith(b"HTTP/1.1 100 "):
                admitted.append(sock)
                continue
            status, error = status_and_error(head + read_all(sock))
            refused.append(f"{status} {error['code']}")
            sock.close()
        try:
            assert len(admitted) == PER_CLIENT, (len(admitted), refused[:3])
            assert set(refused) == {"429 connection_limit_exceeded"}, set(refused)
            # 2. While the attacker holds its share, the other key and the probes are served.
            legit = {"Authorization": f"Bearer {LEGIT}"}
            assert httpx.get(base + "/health", timeout=30).status_code == 200
            assert httpx.get(base + "/v1/models", headers=legit, timeout=30).status_code == 200
            cancel = httpx.post(base + "/v1/images/cancel", json={"request_id": "none-such"}, headers=legit, timeout=30)
            assert cancel.json()["error"]["code"] == "job_not_found"  # a route with a body: read and answered
            # 3. The attacker dribbles one byte per connection at its own pace; the body rate ends each one.
            answers: dict[socket.socket, bytes] = {}
            while len(answers) < len(admitted):
                waiting = [sock for sock in admitted if sock not in answers]
                readable, _, _ = select.select(waiting, [], [], 0.2)
                for sock in readable:
                    answers[sock] = read_all(sock)
                for sock in waiting:
                    if sock not in readable:
                        with contextlib.suppress(OSError):
                            sock.sendall(b" ")
            for response in answers.values():
                status, error = status_and_error(response)
                assert status == 408 and error["code"] == "body_timeout", error
                assert "FLUX_BODY_MIN_RATE" in error["message"]
        finally:
            for sock in admitted:
                sock.close()
        # 4. The attacker's share was given back: its next request is served.
        again = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {ATTACKER}"}, timeout=30)
        assert again.status_code == 200


def test_held_event_streams_meet_their_clients_own_limit(make_settings: Callable[..., Any]) -> None:
    from fluxserve.api.protocol import ImageGenerationRequest

    with serve_in_thread(make_settings(**LIMITS)) as (port, app):
        images, table = app.state.images, app.state.runtime.scheduler.table
        jobs = {}
        for key in (ATTACKER, LEGIT):  # one queued job each that never runs (no worker): its stream stays open
            jobs[key] = images.build_job(ImageGenerationRequest(prompt="a long wait", size="64x64"), owner=_owner(key))
            table.add(jobs[key])
        held: list[socket.socket] = []
        refused: list[str] = []
        try:
            for _ in range(3 * STREAMS_PER_CLIENT):
                sock = connect(port)
                sock.sendall(_head("GET", f"/v1/images/jobs/{jobs[ATTACKER].id}/events", ATTACKER))
                head = _read_head(sock)
                if head.startswith(b"HTTP/1.1 200 "):
                    assert b"text/event-stream" in head.lower()
                    held.append(sock)
                    continue
                body = head.partition(b"\r\n\r\n")[2]
                while len(body) < int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
                    body += sock.recv(4096)
                refused.append(f"{int(head[9:12])} {json.loads(body)['error']['code']}")
                sock.close()
            assert len(held) == STREAMS_PER_CLIENT, (len(held), refused)
            assert set(refused) == {"429 stream_limit_exceeded"}, refused
            # The other key still streams its own job, and the probes answer.
            with connect(port) as sock:
                sock.sendall(_head("GET", f"/v1/images/jobs/{jobs[LEGIT].id}/events", LEGIT))
                head = _read_head(sock)
                assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head.lower(), head
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        finally:
            for sock in held:
                sock.close()
