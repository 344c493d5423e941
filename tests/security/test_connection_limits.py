"""Limits that hold before a request exists, on a real uvicorn server with fluxserve's protocol
(:func:`fluxserve.server.http_limits`) on loopback, driven over raw sockets: header bytes and count,
the header read timeout, the connection cap (slow or idle connections make room; busy ones are
refused with a JSON 503), and the 413 that closes the connection instead of reading the body.

The server runs in a thread around an app whose runtime is never started (no model is loaded): these
limits never reach a route. Every wait is on a socket the server answers or closes, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MAX_HEADER_BYTES = 4096
MAX_CONNECTIONS = 6
MAX_BODY = 4096


@contextlib.contextmanager
def _serve(settings: Any) -> Iterator[tuple[int, Any]]:
    import uvicorn

    from fluxserve.api.app import create_app
    from fluxserve.server import http_limits

    app = create_app(settings, manage_runtime=False)
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
        yield port, server
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(params=[30.0])
def limited(make_settings: Callable[..., Any], request: pytest.FixtureRequest) -> Iterator[tuple[int, Any]]:
    """A server with small limits; the header timeout is long unless a test asks for a short one."""
    settings = make_settings(max_header_bytes=MAX_HEADER_BYTES, max_header_count=20, header_timeout=request.param,
                             keep_alive_timeout=30, max_connections=MAX_CONNECTIONS, max_body_bytes=MAX_BODY)
    with _serve(settings) as served:
        yield served


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a reset ends it too); a server that keeps it
    open for the socket's 30 s timeout fails the test."""
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


def _status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), response[:200]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return int(head[9:12]), error


def test_a_head_over_the_byte_limit_gets_431_and_is_not_read(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with _connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 256 * 1024 * 1024:  # a 256 MiB header, sent until the server stops reading
                sock.sendall(b"X-Filler-" + str(sent).encode() + b": " + b"a" * 8000 + b"\r\n")
                sent += 8000
        response = _read_all(sock)
    assert sent < 64 * 1024 * 1024, sent  # refused within kernel buffers, not after reading it all
    if response:  # the answer usually survives; a reset may eat it, never the limit
        status, error = _status_and_error(response)
        assert status == 431 and error["code"] == "headers_too_large"


def test_too_many_header_lines_get_431(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with _connect(port) as sock:
        lines = b"".join(b"X-H%d: v\r\n" % i for i in range(30))  # 30 short lines: bytes fine, count not
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        status, error = _status_and_error(_read_all(sock))
    assert status == 431 and error["code"] == "too_many_headers" and "FLUX_MAX_HEADER_COUNT" in error["message"]


@pytest.mark.parametrize("limited", [0.5], indirect=True)
def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with _connect(port) as slow, _connect(port) as idle:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        status, error = _status_and_error(_read_all(slow))
        assert status == 408 and error["code"] == "request_timeout"
        assert _read_all(idle) == b""  # connected, sent nothing: closed without an answer


def test_half_open_connections_make_room_for_real_requests(limited: tuple[int, Any]) -> None:
    port, _ = limited
    flood = [_connect(port) for _ in range(MAX_CONNECTIONS * 3)]
    try:
        for sock in flood:
            sock.sendall(b"GET /heal")  # half a request line, then silence
        for _ in range(5):  # every legitimate request is served although the flood holds 3× the cap
            with _connect(port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert _read_all(sock).startswith(b"HTTP/1.1 200 "), "legitimate request not served"
        for sock in flood[:MAX_CONNECTIONS * 2]:  # the oldest were closed to make room, without an answer
            assert _read_all(sock) == b""
    finally:
        for sock in flood:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_a_json_503(limited: tuple[int, Any]) -> None:
    port, _ = limited
    busy = [_connect(port) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in busy:  # each waits inside a request: the app asked for the body (100 Continue)
            sock.sendall(b"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
        with _connect(port) as extra:
            status, error = _status_and_error(_read_all(extra))
        assert status == 503 and error["code"] == "too_many_connections"
    finally:
        for sock in busy:
            sock.close()


def test_413_closes_the_connection_instead_of_reading_the_body(limited: tuple[int, Any]) -> None:
    port, _ = limited
    for framing in (b"Content-Length: 100000000000\r\n", b"Transfer-Encoding: chunked\r\n"):
        with _connect(port) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + framing + b"\r\n")
            chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536) if b"chunked" in framing else b" " * 65536
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < 1024 * 1024 * 1024:  # the client would send 1 GiB; the server stops it early
                    sock.sendall(chunk)
                    sent += len(chunk)
            response = _read_all(sock)
        assert sent < 64 * 1024 * 1024, (framing, sent)
        status, error = _status_and_error(response)
        assert status == 413 and error["code"] == "request_too_large"
        assert b"connection: close" in response.lower()


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
        make_settings: Callable[..., Any]) -> None:
    with _serve(make_settings(keep_alive_timeout=0.3, header_timeout=30)) as (port, _), _connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the server may keep it open
        response = _read_all(sock)  # ... but closes it once idle for FLUX_KEEP_ALIVE_TIMEOUT
    assert response.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in response.lower()
