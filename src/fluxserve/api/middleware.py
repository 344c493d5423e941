"""ASGI middleware: request ids, header and body limits, API-key auth and roles, rate limits, each client's
share of connections and event streams, strict and bounded JSON (parsed once, large bodies within a memory
budget), bodies cut short when too slow or by a shutdown, and per-request metrics.

Written as plain ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect
detection keep working. Limits that must hold before a request exists at all (header bytes, header
read time, open connections, what is read after a 413) live in :mod:`fluxserve.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.errors import error_message_parts
from fluxserve.api.jsontext import JsonRefused, loads_strict
from fluxserve.api.protocol import REQUEST_ID_PATTERN
from fluxserve.observability.metrics import Metrics

log = logging.getLogger("fluxserve.access")
CLOSE = (b"connection", b"close")
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

_ENDPOINT_NAMES = (
    ("/v1/images/generations", "generations"), ("/v1/images/jobs", "jobs"), ("/v1/images/files", "files"),
    ("/v1/images/cancel", "cancel"), ("/v1/images/edits", "edits"), ("/v1/images/variations", "variations"),
    ("/v1/models", "models"), ("/v1/memory", "memory"),
    ("/v1/metrics", "metrics_summary"), ("/v1/tokenize", "tokenize"), ("/metrics", "metrics"),
    ("/health", "health"), ("/ready", "ready"), ("/static", "static"),
)


_PROBES = ("health", "ready")
CLIENT_CLOSED = 499
"""Status logged and counted for a request whose client went away before the answer was complete."""


def endpoint_name(path: str) -> str:
    for prefix, name in _ENDPOINT_NAMES:
        if path.startswith(prefix):
            return name
    return "root" if path == "/" else "other"


PROBE_PATHS = ("/health", "/ready")
"""Liveness and readiness: answered whatever a client's (or the server's) connection budget says."""


def client_key(scope: Scope) -> str:
    """Whom a request counts against: its API key (as :class:`ApiKeyMiddleware` recorded it), else its
    address."""
    state = scope.get("state") or {}
    return str(state.get("client_id") or "addr:" + str((scope.get("client") or ("local",))[0]))


async def _send_error(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]]
                      | None = None, param: str | None = None) -> None:
    raw, body = error_message_parts(status, message, param=param, code=code)  # the serializer of every answer
    await send({"type": "http.response.start", "status": status, "headers": [*raw, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Request id (client's X-Request-ID or a new one, echoed back), access log and request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else "req_" + uuid.uuid4().hex
        state = scope["state"] = dict(scope.get("state") or {})  # per-request copy (asgi-lifespan shares one)
        state["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}
        progress = {"complete": False, "client_left": False}

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not progress["complete"]:
                progress["client_left"] = True  # before the answer was complete: a cancelled (streamed) request
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                progress["complete"] = True
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                raw = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in raw):
                    raw.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = raw
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = endpoint_name(path)
            duration = time.perf_counter() - started
            model = state.get("model", "")
            if progress["client_left"]:  # a 200 stream the client hung up on was cancelled, not served
                status_holder["status"] = CLIENT_CLOSED
            self.metrics.requests.labels(endpoint=endpoint, status=str(status_holder["status"]),
                                         model=self.metrics.model_label(model)).inc()
            if endpoint not in ("metrics", "static", "health"):
                self.metrics.request_duration.labels(endpoint=endpoint).observe(duration)
            level = logging.DEBUG if endpoint in _PROBES else logging.INFO  # probes every few seconds: no flood
            log.log(level, "request", extra={"ctx": {
                "request_id": request_id, "method": scope.get("method"), "path": path, "endpoint": endpoint,
                "model": model or None, "status": status_holder["status"], "duration_s": round(duration, 6)}})


class HeadMiddleware:
    """HEAD on every GET route (load balancers and uptime probes use it): the GET's status and headers,
    no body. FastAPI routes answer GET only; doing it here keeps HEAD out of the OpenAPI schema."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        finished = False

        async def headers_only(message: Message) -> None:
            nonlocal finished
            if finished:
                return
            if message["type"] == "http.response.body":  # drop the body, end the answer at its first part
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class BodyLimitMiddleware:
    """413 for bodies over the limit, judged by Content-Length before reading a byte or, for chunked
    bodies, while reading (never reading past the limit).

    Whatever the inner app makes of the aborted read (FastAPI turns any error while reading the body
    into a 400), the client gets the 413: once the limit is crossed, the app's own response is dropped.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}
        """Larger limits for routes that carry images (exact paths), e.g. /v1/images/edits."""

    async def _too_large(self, send: Send, limit: int | None = None) -> None:
        # "Connection: close": the server stops reading the body. Closing while the client is still
        # sending would make the kernel reset the connection, and the reset can destroy the 413 before
        # the client reads it, so the server half-closes and discards a bounded amount first
        # (fluxserve.server: lingering close) instead of reading the whole body.
        limit = self.max_bytes if limit is None else limit
        setting = "FLUX_MAX_BODY_BYTES" if limit == self.max_bytes else "FLUX_MAX_EDIT_BODY_BYTES"
        await _send_error(send, 413, f"request body is larger than {limit} bytes ({setting})", "request_too_large",
                          [CLOSE])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "invalid_request")
                return
            if declared > limit:
                await self._too_large(send, limit)
                return
        received = 0
        too_large = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if too_large:  # the app answered the aborted read its own way (e.g. 400): answer 413 instead
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await self._too_large(send, limit)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                response_started = True
                await self._too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


def content_type_error(raw_headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why the Content-Type headers cannot be trusted, or None: more than one of them (each layer might
    read a different one: the JSON check the first, the app the last), or a charset other than UTF-8
    (the only one the API reads)."""
    values = [value for name, value in raw_headers if name.lower() == b"content-type"]
    if len(values) > 1:
        return "send one Content-Type header, not several"
    if not values:
        return None
    for part in values[0].split(b";")[1:]:
        name, _, value = part.partition(b"=")
        if name.strip().lower() == b"charset" and value.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return "request bodies must be UTF-8 (charset=utf-8)"
    return None


PARSE_INLINE_BYTES = 64 * 1024
"""JSON bodies up to this size are parsed on the event loop (well under a millisecond); larger ones in one of
the FLUX_JSON_PARSE_THREADS threads, and they count against FLUX_BODY_MEMORY_BYTES while read and parsed."""
_RESERVE_STEP = 1024 * 1024


class BodyMemory:
    """Bytes that large JSON bodies may hold in memory at once: ``limit`` for all requests together, half of
    it for any one client. Each body reserves twice its size (its bytes, then what parsing makes of them)
    while it is read and parsed. The counts live on the event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._by_client: dict[str, int] = {}

    def take(self, client: str, amount: int) -> int | None:
        """Reserve ``amount`` bytes for ``client``: None when granted, else the status of the refusal (503 when
        the server's budget is spent, 429 when this client's half is)."""
        if self.used + amount > self.limit:
            return 503
        if self._by_client.get(client, 0) + amount > self.limit // 2:
            return 429
        self.used += amount
        self._by_client[client] = self._by_client.get(client, 0) + amount
        return None

    def give_back(self, client: str, amount: int) -> None:
        if not amount:
            return
        self.used -= amount
        left = self._by_client[client] - amount
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class StrictJsonMiddleware:
    """Reads JSON request bodies before the app does, parses them once, and answers 400 for anything but
    strict, bounded JSON (:mod:`fluxserve.api.jsontext`).

    Python's parser (and so FastAPI's) accepts ``NaN``/``Infinity``, UTF-16 and UTF-32 bodies, silently
    keeps the last of duplicate keys and recurses once per nesting level; all of that is refused here with
    the OpenAI error shape, and so are requests with two Content-Type headers or a charset other than
    UTF-8.

    Large bodies (over ``PARSE_INLINE_BYTES``) have a memory budget: each reserves twice its size from
    ``memory`` (FLUX_BODY_MEMORY_BYTES: its Content-Length before a byte is read, a chunked body as it
    grows) until it is parsed; one that does not fit is answered 503 ``server_busy`` (429
    ``body_memory_limit_exceeded`` when its client already holds half the budget) without reading the rest.
    They are parsed in a small thread pool (``parse_threads`` at once), so a large body never stalls the
    event loop.

    Routes in ``parsed_paths`` (the edit routes, whose bodies may reach FLUX_MAX_EDIT_BODY_BYTES) take the
    parsed object from the scope's state (``json_body``) and get an empty body: the raw bytes are released
    as soon as they are parsed, and nothing is parsed twice. Other routes get the body replayed unchanged.
    Later ``receive`` calls (disconnect detection) go to the server as before. Runs inside the body limit,
    so what it reads is bounded by FLUX_MAX_BODY_BYTES (FLUX_MAX_EDIT_BODY_BYTES on the edit routes).
    """

    def __init__(self, app: ASGIApp, parse_threads: int = 2, parsed_paths: tuple[str, ...] = (),
                 memory: BodyMemory | None = None) -> None:
        self.app = app
        self.parsed_paths = frozenset(parsed_paths)
        self.memory = memory if memory is not None else BodyMemory(512 * 1024 * 1024)
        self._parser = ThreadPoolExecutor(parse_threads, thread_name_prefix="json-parse")

    @staticmethod
    def _is_json(headers: dict[bytes, bytes]) -> bool:
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))

    def _reserve(self, client: str, amount: int) -> None:
        refusal = self.memory.take(client, amount)
        if refusal == 503:
            raise _Refused(503, "too many large request bodies are being received at once (FLUX_BODY_MEMORY_BYTES="
                           f"{self.memory.limit}); retry shortly", "server_busy",
                           headers=[CLOSE, (b"retry-after", b"1")])
        if refusal == 429:
            raise _Refused(429, "this client's large request bodies already hold half of FLUX_BODY_MEMORY_BYTES="
                           f"{self.memory.limit}; send it when one of them is done", "body_memory_limit_exceeded",
                           headers=[CLOSE, (b"retry-after", b"1")])

    async def _read_and_parse(self, scope: Scope, receive: Receive) -> tuple[bytearray, Any] | None:
        """(body, parsed object) within the memory budget, None when the client left; raises :class:`_Refused`."""
        client = client_key(scope)
        declared = int(dict(scope.get("headers") or []).get(b"content-length", b"0") or 0)
        held = 0
        try:
            if declared > PARSE_INLINE_BYTES:
                self._reserve(client, 2 * declared)
                held = 2 * declared
            buffer = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                buffer += message.get("body", b"")
                if len(buffer) > PARSE_INLINE_BYTES and 2 * len(buffer) > held:  # chunked, or past its length
                    more = 2 * len(buffer) - held + _RESERVE_STEP
                    self._reserve(client, more)
                    held += more
                if not message.get("more_body", False):
                    break
            if not buffer:
                return buffer, None
            try:
                if len(buffer) <= PARSE_INLINE_BYTES:
                    return buffer, loads_strict(buffer)
                return buffer, await asyncio.get_running_loop().run_in_executor(self._parser, loads_strict, buffer)
            except JsonRefused as exc:
                raise _Refused(400, exc.message, exc.code, exc.param) from None
        finally:
            self.memory.give_back(client, held)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        raw_headers = list(scope.get("headers") or [])
        header_problem = content_type_error(raw_headers)
        if header_problem is not None:
            await _send_error(send, 400, header_problem, "invalid_content_type", param="Content-Type")
            return
        if not self._is_json(dict(raw_headers)):
            await self.app(scope, receive, send)
            return
        try:
            read = await self._read_and_parse(scope, receive)
        except _Refused as refused:
            await _send_error(send, refused.status, refused.message, refused.code, refused.headers, refused.param)
            return
        if read is None:
            return  # the client left while sending
        buffer, parsed = read
        del read
        if buffer and scope.get("path", "") in self.parsed_paths:
            scope.setdefault("state", {})["json_body"] = parsed
            body = b""
        else:
            body = bytes(buffer)
        del buffer, parsed
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message = {"type": "http.request", "body": body, "more_body": False}
                body = b""
                return message
            return await receive()

        await self.app(scope, replay, send)


ADMIN_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/models/select"), ("POST", "/v1/models/unload"), ("POST", "/v1/memory/release"),
)
"""(method, path) pairs that change what the server holds for everyone: admin keys only."""
ADMIN_PREFIXES: tuple[str, ...] = ("/v1/loras",)
"""Paths under which every method but GET and HEAD needs an admin key (the LoRA library)."""


def needs_admin(method: str, path: str) -> bool:
    """Whether this request may only come from an admin key (when keys are configured)."""
    path = path.rstrip("/") or "/"
    if (method, path) in ADMIN_ROUTES:
        return True
    return method not in ("GET", "HEAD", "OPTIONS") and any(
        path == prefix or path.startswith(prefix + "/") for prefix in ADMIN_PREFIXES)


def is_admin(state: Any) -> bool:
    """Whether the request came with an admin key (always true when no keys are configured).

    ``state`` is ``request.state`` or the ASGI scope's state dict; routes that show admin-only parts
    of an answer (the runtime snapshot of /v1/models) ask this."""
    role = state.get("role") if isinstance(state, dict) else getattr(state, "role", None)
    return role == "admin"


class ApiKeyMiddleware:
    """Bearer-token auth for /v1/* (and /metrics when configured); constant-time comparison; roles.

    Sets the request's ``role`` (``admin`` or ``user``) and ``client_id`` (a digest of the key, never
    the key; the client address when no keys are configured) in the scope's state. Without any key
    every client is an admin, as before keys existed (the server listens on loopback by default).
    With keys, the routes of :func:`needs_admin` answer 403 ``permission_denied`` to ordinary keys.
    """

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool,
                 admin_keys: list[str] | None = None) -> None:
        self.app = app
        self.keys = keys
        # Compared as SHA-256 digests: equal lengths, so not even a key's length leaks through timing.
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        admin = set(admin_keys or [])
        self._admin = [key in admin for key in keys]
        self.protect_metrics = protect_metrics

    def _protected(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or (self.protect_metrics and path == "/metrics")

    def _match(self, auth: str) -> int | None:
        """Index of the key ``auth`` carries, or None; every key is compared (timing reveals nothing)."""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = hashlib.sha256(token.strip().encode("latin-1")).digest()
        found = None
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(presented, digest):
                found = index
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys:
            client = scope.get("client") or ("local", 0)
            state["role"], state["client_id"] = "admin", f"addr:{client[0]}"
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        index = self._match(auth)
        if index is not None:
            state["role"] = "admin" if self._admin[index] else "user"
            state["client_id"] = "key:" + self._digests[index].hex()[:16]
            state["owner"] = state["client_id"]  # jobs and files this request creates belong to its key
        else:
            state["role"], state["client_id"] = "anonymous", None
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if not self._protected(path) or method == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if index is None:
            message = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "invalid API key"
            await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        if needs_admin(method, path) and state["role"] != "admin":
            await _send_error(send, 403, f"{method} {path} needs an admin key (FLUX_ADMIN_KEYS)", "permission_denied")
            return
        await self.app(scope, receive, send)


RATE_LIMITED_ROUTES = ("/v1/images/generations", "/v1/images/jobs", "/v1/images/edits")
"""POSTs to these start generations; they are what the rate limit counts."""


class TokenBuckets:
    """One token bucket per client: ``rate`` tokens a second up to ``burst``; thread-safe and bounded
    (at most ``max_clients`` buckets; the least recently used is forgotten, which only ever helps it)."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is there."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait


class RateLimitMiddleware:
    """429 ``rate_limit_exceeded`` with Retry-After once a client has started more generation requests
    than FLUX_RATE_LIMIT_PER_MINUTE allows (bursts up to FLUX_RATE_LIMIT_BURST). Counted per API key
    (the ``client_id`` that :class:`ApiKeyMiddleware` sets), before the body is read: refused
    requests cost the server nothing but this answer."""

    def __init__(self, app: ASGIApp, per_minute: float, burst: int) -> None:
        self.app = app
        self.per_minute = per_minute
        self.buckets = TokenBuckets(per_minute / 60.0, burst) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.buckets is not None and scope["type"] == "http" and scope.get("method") == "POST"
                and (scope.get("path", "").rstrip("/")) in RATE_LIMITED_ROUTES):
            state = scope.get("state") or {}
            client = state.get("client_id") or "addr:" + str((scope.get("client") or ("local",))[0])
            wait = self.buckets.take(client)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await _send_error(send, 429, f"rate limit exceeded: {self.per_minute:g} generation requests per "
                                  f"minute per key (FLUX_RATE_LIMIT_PER_MINUTE); retry in {retry} s",
                                  "rate_limit_exceeded", [(b"retry-after", str(retry).encode())])
                return
        await self.app(scope, receive, send)


class HeaderLimitMiddleware:
    """431 for requests with more than FLUX_MAX_HEADER_COUNT header lines or a head over
    FLUX_MAX_HEADER_BYTES. The server (fluxserve.server) enforces the byte limit while reading, before
    a request exists; this is the same rule for any other ASGI server and for in-process apps."""

    def __init__(self, app: ASGIApp, max_count: int, max_bytes: int) -> None:
        self.app = app
        self.max_count = max_count
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            if len(headers) > self.max_count:
                await _send_error(send, 431, f"too many header lines ({len(headers)}); the limit is "
                                  f"{self.max_count} (FLUX_MAX_HEADER_COUNT)", "too_many_headers", [CLOSE])
                return
            size = sum(len(name) + len(value) + 4 for name, value in headers)
            if size > self.max_bytes:
                await _send_error(send, 431, f"request headers are larger than {self.max_bytes} bytes "
                                  "(FLUX_MAX_HEADER_BYTES)", "headers_too_large", [CLOSE])
                return
        await self.app(scope, receive, send)


class _UploadCutShort(Exception):
    pass


class UploadGuardMiddleware:
    """Request bodies that arrive too slowly, or while a shutdown begins, are cut short with a JSON
    answer and the connection is closed.

    Too slow: after a grace period of ``grace`` seconds (FLUX_BODY_TIMEOUT) a body must keep arriving at
    ``min_rate`` bytes a second on average (FLUX_BODY_MIN_RATE): the body may keep the server waiting
    ``grace + received / min_rate`` seconds in all, and only the time the app spends waiting for body
    bytes counts. A slower body gets 408 ``body_timeout`` (a few bytes every few seconds would otherwise
    hold a connection, and its request, for as long as the client likes).

    Shutdown: a client still sending its body when a shutdown begins gets the JSON 503 ``shutting_down``
    at once, instead of waiting for the server's grace period to run out and its request task to be
    cancelled (which uvicorn answers with a plain-text 500). ``shutting_down`` is polled every 0.1 s, and
    only while the app waits for body bytes that have not arrived."""

    POLL = 0.1

    def __init__(self, app: ASGIApp, shutting_down: Callable[[], bool], grace: float = 10.0,
                 min_rate: float = 4096.0) -> None:
        self.app = app
        self.shutting_down = shutting_down
        self.grace = grace
        self.min_rate = min_rate

    async def _answer(self, send: Send, reason: str) -> None:
        if reason == "slow":
            await _send_error(send, 408, f"the request body arrived too slowly: after {self.grace:g} s it must "
                              f"average at least {self.min_rate:g} bytes/s (FLUX_BODY_TIMEOUT, FLUX_BODY_MIN_RATE)",
                              "body_timeout", [CLOSE])
            return
        await _send_error(send, 503, "the server is shutting down; send the request again to another instance "
                          "or after the restart", "shutting_down", [CLOSE, (b"retry-after", b"1")])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not headers.get(b"content-length", b"0").strip(b"0 ") and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body to wait for
            return
        loop = asyncio.get_running_loop()
        body_done = response_started = False
        cut_short: str | None = None
        received = 0
        waited = 0.0

        async def guarded_receive() -> Message:
            nonlocal body_done, cut_short, received, waited
            if cut_short:
                raise _UploadCutShort
            if body_done:
                return await receive()
            allowed = self.grace + received / self.min_rate - waited
            pending = asyncio.ensure_future(receive())
            began = loop.time()
            try:
                while not pending.done():
                    left = allowed - (loop.time() - began)
                    if left <= 0:
                        cut_short = "slow"
                        raise _UploadCutShort
                    await asyncio.wait({pending}, timeout=min(self.POLL, left))
                    if not pending.done() and self.shutting_down():
                        cut_short = "shutdown"
                        raise _UploadCutShort
            finally:
                waited += loop.time() - began
                if not pending.done():
                    pending.cancel()
            message = pending.result()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            received += len(message.get("body", b""))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if cut_short:  # the app answered the aborted read its own way: answer 408 or 503 instead
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await self._answer(send, cut_short)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        with contextlib.suppress(_UploadCutShort):
            await self.app(scope, guarded_receive, tracking_send)
        if cut_short and not response_started:
            response_started = True
            await self._answer(send, cut_short)


def _is_event_stream(message: Message) -> bool:
    return any(name.lower() == b"content-type" and value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
               for name, value in message.get("headers") or [])


class ClientBudgetMiddleware:
    """One client's share of the server's connections: at most ``max_requests`` requests in progress
    (FLUX_MAX_CONNECTIONS_PER_CLIENT) and ``max_streams`` event streams open (FLUX_MAX_STREAMS_PER_CLIENT),
    per API key, or per address without keys. Both are below the server-wide FLUX_MAX_CONNECTIONS, so a
    client that holds many connections (slow bodies, long streams) meets its own limit while the server
    still has room for everyone else.

    A request over the first limit gets 429 ``connection_limit_exceeded`` before its body is read, and its
    connection is closed. An event stream over the second gets 429 ``stream_limit_exceeded`` instead of its
    first byte; the app then sees the client gone (its job is cancelled as for any client that leaves).
    /health and /ready are never counted nor refused. The counts live on the event loop: no lock."""

    def __init__(self, app: ASGIApp, max_requests: int, max_streams: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.max_streams = max_streams
        self._requests: dict[str, int] = {}
        self._streams: dict[str, int] = {}

    @staticmethod
    def _release(counts: dict[str, int], client: str) -> None:
        left = counts[client] - 1
        if left:
            counts[client] = left
        else:
            del counts[client]  # no entry for a client with nothing open: the dicts stay small

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        if self._requests.get(client, 0) >= self.max_requests:
            await _send_error(send, 429, f"this client already has {self.max_requests} requests in progress "
                              "(FLUX_MAX_CONNECTIONS_PER_CLIENT); retry when one of them is done",
                              "connection_limit_exceeded", [CLOSE, (b"retry-after", b"1")])
            return
        self._requests[client] = self._requests.get(client, 0) + 1
        streaming = refused = False

        async def counting_send(message: Message) -> None:
            nonlocal streaming, refused
            if refused:
                return  # the app's refused stream goes nowhere
            if message["type"] == "http.response.start" and _is_event_stream(message):
                if self._streams.get(client, 0) >= self.max_streams:
                    refused = True
                    await _send_error(send, 429, f"this client already has {self.max_streams} event streams open "
                                      "(FLUX_MAX_STREAMS_PER_CLIENT); close one or poll the job instead",
                                      "stream_limit_exceeded", [(b"retry-after", b"1")])
                    return
                self._streams[client] = self._streams.get(client, 0) + 1
                streaming = True
            await send(message)

        async def watching_receive() -> Message:
            if refused:  # a refused stream's app hears that its client left
                return {"type": "http.disconnect"}
            return await receive()

        try:
            await self.app(scope, watching_receive, counting_send)
        finally:
            self._release(self._requests, client)
            if streaming:
                self._release(self._streams, client)
