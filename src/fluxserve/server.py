"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM/SIGINT:

1. the runtime stops accepting jobs at once: new generation requests get 503 ``shutting_down`` and
   ``/ready`` turns 503, while the server keeps listening (a load balancer sees the 503s, not refused
   connections);
2. queued and running jobs go on, for up to FLUX_SHUTDOWN_TIMEOUT seconds; what is still unfinished
   then is cancelled, and its clients get 503 ``shutting_down`` ("the server is shutting down; the job
   was cancelled"). A second signal cancels at once;
3. uvicorn then stops listening and gives open responses up to ``RESPONSE_GRACE`` seconds to be sent;
4. the lifespan closes the runtime: encoder threads finish (every image being saved is complete),
   workers stop, logs are flushed, and the process exits 0.

A client still uploading its body when the signal comes gets the JSON 503 ``shutting_down`` at once
(:class:`fluxserve.api.middleware.UploadGuardMiddleware`).

Connections are bounded before any request exists (:class:`GuardedH11Protocol`, uvicorn's h11 protocol
with limits; httptools has no limit on header size, so it is never used):

- a request head larger than FLUX_MAX_HEADER_BYTES gets 431 and the connection is closed;
- a head not complete FLUX_HEADER_TIMEOUT seconds after connecting (or after the previous response)
  gets 408 and is closed; idle keep-alive connections close after FLUX_KEEP_ALIVE_TIMEOUT;
- at most FLUX_MAX_CONNECTIONS connections are open: a new one closes the oldest connection that has
  not sent a complete head (idle or slow), or, when every connection is busy with a request, is let in
  as one of ``PROBE_RESERVE`` connections that may only ask for ``/health`` or ``/ready`` (anything else
  gets 503 ``too_many_connections``), or, with those taken too, gets that 503 at once and is closed. So
  probes are answered while every data-plane connection is busy (one client's share of those is bounded
  further up, per API key: :class:`fluxserve.api.middleware.ClientBudgetMiddleware`);
- when a response closes the connection while the client is still sending (a 413, a 431), the server
  half-closes and discards at most ``LINGER_BYTES`` more for at most ``LINGER_SECONDS`` ("lingering
  close": the client gets to read the answer instead of a reset), then closes: it never reads the
  rest of a refused body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.server import HANDLED_SIGNALS

from fluxserve.api.app import create_app
from fluxserve.api.errors import error_body, error_message_parts
from fluxserve.api.middleware import PROBE_PATHS
from fluxserve.config import HttpConfig
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings, SettingsError

log = logging.getLogger(__name__)

RESPONSE_GRACE = 5
"""Seconds uvicorn waits, after the jobs are drained, for responses still being written."""


LINGER_SECONDS = 2.0
"""Most seconds a connection closed mid-body keeps discarding what the client still sends."""
PROBE_RESERVE = 4
"""Connections past FLUX_MAX_CONNECTIONS that may still be opened, for liveness and readiness probes only."""
LINGER_BYTES = 16 * 1024 * 1024
"""Most bytes it discards then (or FLUX_MAX_BODY_BYTES, if larger): enough for a client that sends a
body somewhat over the limit before reading the answer to finish and read its 413; a flood is cut off."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    max_connections: int
    linger_bytes: int

    @classmethod
    def from_settings(cls, settings: HttpConfig) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout, settings.max_connections,
                   linger_bytes=max(settings.max_body_bytes, LINGER_BYTES))


def _raw_error(status: int, message: str, code: str, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A complete HTTP/1.1 error response (OpenAI shape, Connection: close) for answers written before or
    outside a request/response cycle."""
    body = json.dumps(error_body(status, message, None, code)).encode()
    head = [b"HTTP/1.1 %d %s" % (status, STATUS_PHRASES[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    head += [name + b": " + value for name, value in extra or []]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _probes_only(app: ASGIApp, max_connections: int) -> ASGIApp:
    """``app`` for a connection let in past FLUX_MAX_CONNECTIONS: probes go through, anything else gets the
    503 a connection over the limit gets (and the connection is closed)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method") in ("GET", "HEAD") and scope.get("path") in PROBE_PATHS):
            await app(scope, receive, send)
            return
        headers, body = error_message_parts(503, f"too many open connections (FLUX_MAX_CONNECTIONS={max_connections}); "
                                            "retry later", code="too_many_connections")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [*headers, (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return guarded


class _GuardedTransport:
    """The connection's transport as uvicorn sees it: ``close()`` becomes a lingering close while the
    client may still be sending (see the module docstring); everything else is passed through."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._protocol.lingering:
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        if self._protocol.conn.their_state in (h11.SEND_BODY, h11.ERROR) or self._protocol.head_pending():
            self._protocol.linger()
        else:
            self._transport.close()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection limits of the module docstring. ``limits`` is set on
    the subclass :func:`guarded_protocol` makes."""

    limits: ConnectionLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.raw_transport = transport
        self.lingering = False
        self.opened_at = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: Any = None
        self._in_head = True
        self._head_bytes = 0
        self._discarded = 0
        self.probes_only = False
        super().connection_made(_GuardedTransport(transport, self))  # type: ignore[arg-type]
        self._arm_head_timer()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    # --- limits ----------------------------------------------------------------------------------
    def head_pending(self) -> bool:
        """Some bytes of a request head arrived, not all of it."""
        return self._in_head and self._head_bytes > 0

    def _make_room(self) -> None:
        """Over FLUX_MAX_CONNECTIONS: close the oldest connection that is not busy with a request, or let
        this one in for probes only (``PROBE_RESERVE``), or refuse it."""
        others = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self
                  and not c.raw_transport.is_closing()]
        waiting = [c for c in others if c.lingering or c._in_head]
        if waiting:
            oldest = min(waiting, key=lambda c: (not c.lingering, c.opened_at))
            oldest.raw_transport.abort()
            return
        if sum(1 for c in others if c.probes_only) < PROBE_RESERVE:
            self.probes_only = True
            self.app = _probes_only(self.app, self.limits.max_connections)
            return
        log.warning("connection refused: %d open connections (FLUX_MAX_CONNECTIONS)", len(self.connections))
        self.raw_transport.write(_raw_error(
            503, f"too many open connections (FLUX_MAX_CONNECTIONS={self.limits.max_connections}); retry later",
            "too_many_connections", [(b"retry-after", b"1")]))
        self.linger()

    def _arm_head_timer(self) -> None:
        self._cancel(self._head_timer)
        self._in_head, self._head_bytes = True, 0
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        if not self._in_head or self.lingering or self.raw_transport.is_closing():
            return
        if self._head_bytes:
            self.raw_transport.write(_raw_error(
                408, f"the request head took longer than {self.limits.header_timeout:g} s (FLUX_HEADER_TIMEOUT)",
                "request_timeout"))
            self.linger()
        else:
            self.raw_transport.close()

    def _track(self) -> None:
        """After uvicorn handled data: a new request cycle means its head is complete."""
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle
            self._in_head = False
            self._cancel(self._head_timer)

    def linger(self) -> None:
        """Half-close (the client sees the end of our answer), discard what it still sends up to the
        limits, then close."""
        if self.lingering or self.raw_transport.is_closing():
            return
        self.lingering = True
        self._cancel(self._head_timer)
        self._unset_keepalive_if_required()
        try:
            if self.raw_transport.can_write_eof():
                self.raw_transport.write_eof()
            self.raw_transport.resume_reading()
        except (OSError, RuntimeError):
            self.raw_transport.abort()
            return
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.raw_transport.abort)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    # --- uvicorn's protocol interface ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > self.limits.linger_bytes:
                self.raw_transport.abort()
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        self._track()

    def eof_received(self) -> None:
        if self.lingering:  # the client read our answer and is done: close now
            self.raw_transport.close()

    def on_response_complete(self) -> None:
        if not self.lingering and not self.raw_transport.is_closing():
            self._arm_head_timer()
        super().on_response_complete()
        self._track()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: a head over FLUX_MAX_HEADER_BYTES (431) or malformed (400), in JSON."""
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            response = _raw_error(431, f"the request head is larger than {self.limits.max_header_bytes} bytes "
                                       "(FLUX_MAX_HEADER_BYTES)", "headers_too_large")
        else:
            response = _raw_error(400, "malformed HTTP request", "invalid_request")
        self.raw_transport.write(response)
        self.linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._linger_timer)
        super().connection_lost(exc)


def guarded_protocol(settings: HttpConfig) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this server's limits."""
    return type("FluxHTTPProtocol", (GuardedH11Protocol,), {"limits": ConnectionLimits.from_settings(settings)})


def notify_service_manager(address: str | None, message: str) -> None:
    """systemd's sd_notify protocol: one datagram to ``address`` (``$NOTIFY_SOCKET``: a socket path, or
    ``@name`` in the abstract namespace). Nothing without an address; a failure is logged, never raised."""
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), target)
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", address, exc)


def browser_url(host: str, port: int, public_url: str | None = None) -> str:
    """The URL to open for a server bound to ``host:port``: FLUX_PUBLIC_URL when set; a wildcard bind
    (``0.0.0.0``, ``::``) is reached on loopback; IPv6 addresses go in brackets."""
    if public_url:
        return public_url.rstrip("/") + "/"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.cancelled_jobs = 0
        self._drainer: threading.Thread | None = None
        self._hurry = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the lifespan has started the runtime, the sockets listen), then, off the event
        loop, once the models are loaded and warmed up: one log line saying where to open the server (or why
        it is not ready) and ``READY=1`` for a service manager."""
        await super().startup(sockets)
        if self.started:
            url = self.open_url()
            threading.Thread(target=self._announce_ready, args=(url,), name="announce-ready", daemon=True).start()

    def open_url(self) -> str:
        """Where a browser reaches this server: the address uvicorn really bound (its first TCP socket)."""
        settings = self.runtime.settings
        addresses = [sock.getsockname() for server in self.servers for sock in server.sockets]
        host, port = next(((a[0], a[1]) for a in addresses if isinstance(a, tuple)), (settings.host, settings.port))
        return browser_url(host, port, settings.public_url)

    def _announce_ready(self, url: str) -> None:
        """The moment ``/ready`` first answers 200 (or start-up ended without it): uvicorn's own "running on"
        line comes seconds earlier, while the model is still loading."""
        self.runtime.wait_started()
        ready, reasons = self.runtime.readiness()
        if ready:
            log.info("ready — open %s", url)
            status = "ready"
        else:
            status = "not ready: " + "; ".join(reasons)
            log.warning("start-up finished %s (GET /ready says why)", status)
        notify_service_manager(self.runtime.settings.notify_socket, f"READY=1\nSTATUS={status}")

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's own version re-raises the signal after its shutdown, so the process would die of
        SIGTERM (status -15) instead of exiting 0 after a clean drain; this one only installs handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drainer is None:
            log.info("shutdown requested (signal %s): finishing in-flight and queued jobs for up to %gs", sig,
                     self.runtime.settings.shutdown_timeout)
            self.runtime.begin_shutdown()
            notify_service_manager(self.runtime.settings.notify_socket, "STOPPING=1")
            self._drainer = threading.Thread(target=self._drain, name="shutdown-drain", daemon=True)
            self._drainer.start()
        else:
            log.warning("second signal (%s): cancelling the remaining jobs now", sig)
            self._hurry.set()

    def _drain(self) -> None:
        """Wait for queued and running jobs (up to FLUX_SHUTDOWN_TIMEOUT), cancel the rest, then let
        uvicorn stop."""
        scheduler = self.runtime.scheduler
        deadline = time.monotonic() + self.runtime.settings.shutdown_timeout
        try:
            while time.monotonic() < deadline and not self._hurry.is_set():
                stats = scheduler.stats()
                if not stats["queue_depth"] and not stats["jobs_in_flight"]:
                    break
                self._hurry.wait(0.05)
            self.cancelled_jobs = scheduler.drain(0)
            if self.cancelled_jobs:
                log.warning("shutdown timeout: cancelled %d unfinished job(s)", self.cancelled_jobs)
        finally:
            self.should_exit = True


def _check_auth_settings(settings: Settings) -> None:
    """An API-keys file that is missing or empty must stop start-up, not silently turn auth off."""
    try:
        keys = settings.all_api_keys()
    except OSError as exc:
        raise SettingsError(f"FLUX_API_KEYS_FILE={settings.api_keys_file}: cannot read it ({exc.strerror})") from None
    if settings.api_keys_file is not None and not keys:
        raise SettingsError(f"FLUX_API_KEYS_FILE={settings.api_keys_file}: no keys in it (one key per line); "
                            "refusing to start without authentication")
    if not keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without API keys: anyone who can reach this address can use the server "
                    "(set FLUX_API_KEYS or FLUX_API_KEYS_FILE)", settings.host)


def http_limits(settings: HttpConfig) -> dict[str, Any]:
    """uvicorn.Config arguments that bound each connection (see the module docstring)."""
    return {"http": guarded_protocol(settings), "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_keep_alive": settings.keep_alive_timeout, "ws": "none"}


def serve(settings: Settings) -> int:
    _check_auth_settings(settings)
    runtime = Runtime(settings)  # resolves devices now: a bad FLUX_DEVICE/FLUX_DTYPE stops start-up here
    app = create_app(settings, runtime)
    app.state.jobs.open()  # a job store that cannot be used stops the start here, with the reason
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=RESPONSE_GRACE,
                            access_log=False, proxy_headers=False, **http_limits(settings.http))
    server = GracefulServer(config, runtime)
    try:
        server.run()
    finally:
        app.state.jobs.close()  # already closed by the app's lifespan, unless the server never served
    log.info("exited cleanly", extra={"ctx": {"cancelled_jobs": server.cancelled_jobs}})
    for handler in logging.getLogger().handlers:
        handler.flush()
    return 0
