"""Limits that hold before a request exists, on a real uvicorn server with fluxserve's protocol
(:func:`fluxserve.server.http_limits`) on loopback, driven over raw sockets: header bytes and count,
the header read timeout, the connection cap (slow or idle connections make room; when every one is
busy, probes still get in and anything else gets a JSON 503), and the 413 that closes the connection
instead of reading the body.

The server runs in a thread around an app whose runtime is never started (no model is loaded): these
limits never reach a route. Every wait is on a socket the server answers or closes, never a sleep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .helpers import connect, read_all, serve_in_thread, status_and_error

MAX_HEADER_BYTES = 4096
MAX_CONNECTIONS = 6
MAX_BODY = 4096


@pytest.fixture(params=[30.0])
def limited(make_settings: Callable[..., Any], request: pytest.FixtureRequest) -> Iterator[tuple[int, Any]]:
    """A server with small limits; the header timeout is long unless a test asks for a short one."""
    settings = make_settings(max_header_bytes=MAX_HEADER_BYTES, max_header_count=20, header_timeout=request.param,
                             keep_alive_timeout=30, max_connections=MAX_CONNECTIONS, max_connections_per_client=3,
                             max_streams_per_client=2, max_body_bytes=MAX_BODY)
    with serve_in_thread(settings) as served:
        yield served


def test_a_head_over_the_byte_limit_gets_431_and_is_not_read(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 256 * 1024 * 1024:  # a 256 MiB header, sent until the server stops reading
                sock.sendall(b"X-Filler-" + str(sent).encode() + b": " + b"a" * 8000 + b"\r\n")
                sent += 8000
        response = read_all(sock)
    assert sent < 64 * 1024 * 1024, sent  # refused within kernel buffers, not after reading it all
    if response:  # the answer usually survives; a reset may eat it, never the limit
        status, error = status_and_error(response)
        assert status == 431 and error["code"] == "headers_too_large"


def test_too_many_header_lines_get_431(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with connect(port) as sock:
        lines = b"".join(b"X-H%d: v\r\n" % i for i in range(30))  # 30 short lines: bytes fine, count not
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        status, error = status_and_error(read_all(sock))
    assert status == 431 and error["code"] == "too_many_headers" and "FLUX_MAX_HEADER_COUNT" in error["message"]


@pytest.mark.parametrize("limited", [0.5], indirect=True)
def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(limited: tuple[int, Any]) -> None:
    port, _ = limited
    with connect(port) as slow, connect(port) as idle:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        status, error = status_and_error(read_all(slow))
        assert status == 408 and error["code"] == "request_timeout"
        assert read_all(idle) == b""  # connected, sent nothing: closed without an answer


def test_half_open_connections_make_room_for_real_requests(limited: tuple[int, Any]) -> None:
    port, _ = limited
    flood = [connect(port) for _ in range(MAX_CONNECTIONS * 3)]
    try:
        for sock in flood:
            sock.sendall(b"GET /heal")  # half a request line, then silence
        for _ in range(5):  # every legitimate request is served although the flood holds 3× the cap
            with connect(port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_all(sock).startswith(b"HTTP/1.1 200 "), "legitimate request not served"
        for sock in flood[:MAX_CONNECTIONS * 2]:  # the oldest were closed to make room, without an answer
            assert read_all(sock) == b""
    finally:
        for sock in flood:
            sock.close()


def test_when_every_connection_is_busy_only_probes_get_in(make_settings: Callable[..., Any]) -> None:
    """Two keys hold every connection (each within its own share); a request past the cap gets the JSON
    503, while /health and /ready still reach their routes on connections kept for probes."""
    keys = ["sk-busy-one-0123456789", "sk-busy-two-0123456789"]
    settings = make_settings(api_keys=keys, max_connections=MAX_CONNECTIONS, max_connections_per_client=3,
                             max_streams_per_client=2, header_timeout=30)
    with serve_in_thread(settings) as (port, _):
        busy = [connect(port) for _ in range(MAX_CONNECTIONS)]
        try:
            for index, sock in enumerate(busy):  # each waits inside a request: the app asked for the body
                sock.sendall(b"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + keys[index % 2].encode() + b"\r\n"
                             b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
            with connect(port) as extra:
                extra.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + keys[0].encode()
                              + b"\r\n\r\n")
                status, error = status_and_error(read_all(extra))
            assert status == 503 and error["code"] == "too_many_connections"
            for probe in (b"/health", b"/ready"):
                with connect(port) as sock:
                    sock.sendall(b"GET " + probe + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    response = read_all(sock)
                # /ready reaches its route: 503 "not_ready" here, where no model was ever loaded
                assert response.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 ")) and b'"status":' in response, response
        finally:
            for sock in busy:
                sock.close()


def test_413_closes_the_connection_instead_of_reading_the_body(limited: tuple[int, Any]) -> None:
    port, _ = limited
    for framing in (b"Content-Length: 100000000000\r\n", b"Transfer-Encoding: chunked\r\n"):
        with connect(port) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + framing + b"\r\n")
            chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536) if b"chunked" in framing else b" " * 65536
            sent = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while sent < 1024 * 1024 * 1024:  # the client would send 1 GiB; the server stops it early
                    sock.sendall(chunk)
                    sent += len(chunk)
            response = read_all(sock)
        assert sent < 64 * 1024 * 1024, (framing, sent)
        status, error = status_and_error(response)
        assert status == 413 and error["code"] == "request_too_large"
        assert b"connection: close" in response.lower()


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
        make_settings: Callable[..., Any]) -> None:
    with serve_in_thread(make_settings(keep_alive_timeout=0.3, header_timeout=30)) as (port, _), connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the server may keep it open
        response = read_all(sock)  # ... but closes it once idle for FLUX_KEEP_ALIVE_TIMEOUT
    assert response.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in response.lower()
