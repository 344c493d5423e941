"""Against a real ``fluxserve serve`` on loopback, over raw sockets where an HTTP client would tidy
the request up (dot segments, framing): API keys never reach the logs, chunked and oversized bodies
get 413, raw traversal paths get nothing."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

KEY = "sk-live-ABCDEFGHIJKLMNOP0123456789"
OTHER_KEY = "sk-other-zyxwvutsrqponm98765"
HF_TOKEN = "hf_DoNotLogThisTokenEver12345"
MAX_BODY = 32 * 1024


def _raw(port: int, request: bytes, *, read_timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are; return (status, response) once the response is complete (the server may
    keep the connection open, e.g. to drain a body it refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        # the server may answer before reading everything: that is the point
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        response = b""
        while True:
            head, sep, body = response.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?im)^content-length: *(\d+)", head)
                if (match and len(body) >= int(match.group(1))) or (not match and b"chunked" not in head.lower()):
                    break
                if b"chunked" in head.lower() and body.endswith(b"0\r\n\r\n"):
                    break
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12]), response


def _auth(key: str = KEY) -> bytes:
    return f"Authorization: Bearer {key}\r\n".encode()


def test_real_server_security(server_factory: Callable[..., Any]) -> None:
    server = server_factory({"FLUX_API_KEYS": f"{KEY},{OTHER_KEY}", "HF_TOKEN": HF_TOKEN, "FLUX_LOG_LEVEL": "DEBUG",
                             "FLUX_STRUCTURED_LOGS": "1", "FLUX_MAX_BODY_BYTES": str(MAX_BODY),
                             "FLUX_LOG_PROMPTS": "1"}, name="secured")
    port, base = server.port, server.base_url
    headers = {"Authorization": f"Bearer {KEY}"}

    # --- auth, with keys in every place a client might put them --------------------------------
    ok = httpx.post(base + "/v1/images/generations", headers={**headers, "X-Request-ID": f"id-{OTHER_KEY}"},
                    json={"prompt": f"a key in the prompt {KEY}", "size": "64x64", "num_inference_steps": 1,
                          "user": OTHER_KEY}, timeout=60)
    assert ok.status_code == 200, ok.text[:300]
    for bad in (KEY + "x", KEY[:-1], "Basic " + KEY):
        denied = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {bad}"}, timeout=30)
        assert denied.status_code == 401 and KEY not in denied.text
    other = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
    assert other.status_code == 200
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert httpx.get(base + "/ready", timeout=10).status_code == 200

    # --- bodies: 413 before reading them, chunked or not -----------------------------------------
    status, _ = _raw(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + _auth() +
                     b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
    assert status == 413  # answered without waiting for 10 GB
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b" " * 16 * 1024)
    status, response = _raw(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + _auth() +
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" +
                            chunk * (MAX_BODY // (16 * 1024) + 4) + b"0\r\n\r\n")
    assert status == 413 and b"request_too_large" in response
    small = json.dumps({"prompt": "chunked", "size": "64x64", "num_inference_steps": 1}).encode()
    status, response = _raw(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" +
                            _auth() + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" +
                            b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small))
    assert status == 200, response[:300]  # chunked bodies under the limit are fine

    # --- raw paths no client would send ----------------------------------------------------------
    for path in (b"/v1/images/files/../../../../etc/passwd", b"/v1/images/files/..%2f..%2f..%2fetc%2fpasswd",
                 b"/v1/images/files/%2e%2e/%2e%2e/etc/passwd", b"/v1/images/files/file_" + b"A" * 30 + b"/../../x",
                 b"/v1/../../../etc/passwd", b"/static/../../../../etc/passwd", b"//etc/passwd",
                 b"/v1/images/files/\xff\xfe"):
        status, response = _raw(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + _auth() +
                                b"\r\n")
        assert status in (400, 401, 404), (path, status)
        assert b"root:" not in response, path

    # --- headers with bytes that are not ASCII ---------------------------------------------------
    status, response = _raw(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" +
                            _auth() + b"X-Request-ID: \xff\xfe\xfd\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(small), small))
    assert status in (200, 400), response[:300]

    # --- the logs: nothing secret, even with DEBUG, prompts logged and keys sent in odd places --
    assert server.stop() == 0
    logs = server.log_path.read_text(errors="replace")
    assert "generation finished" in logs and "a key in the prompt" in logs  # prompts are logged, keys are not
    for secret in (KEY, OTHER_KEY, HF_TOKEN):
        assert secret not in logs, secret
    assert "Traceback" not in logs
