"""ASGI middleware: request ids, body-size limit, API-key auth and per-request metrics.

Written as plain ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect
detection keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.errors import error_message_parts
from fluxserve.api.protocol import REQUEST_ID_PATTERN
from fluxserve.observability.metrics import Metrics

log = logging.getLogger("fluxserve.access")
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

_ENDPOINT_NAMES = (
    ("/v1/images/generations", "generations"), ("/v1/images/jobs", "jobs"), ("/v1/images/files", "files"),
    ("/v1/images/cancel", "cancel"), ("/v1/models", "models"), ("/v1/memory", "memory"),
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
            self.metrics.requests.labels(endpoint=endpoint, status=str(status_holder["status"]), model=model).inc()
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

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        # No "Connection: close": closing while the client is still sending makes the kernel reset the
        # connection, and the reset can destroy the 413 before the client reads it (seen in the soak
        # test). The server reads and drops the rest of the body instead.
        await _send_error(send, 413, f"request body is larger than {self.max_bytes} bytes (FLUX_MAX_BODY_BYTES)",
                          "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "invalid_request")
                return
            if declared > self.max_bytes:
                await self._too_large(send)
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
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if too_large:  # the app answered the aborted read its own way (e.g. 400): answer 413 instead
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await self._too_large(send)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                response_started = True
                await self._too_large(send)


class _BodyTooLarge(Exception):
    pass


class _InvalidJson(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _InvalidJson(f"the request body is not valid JSON: duplicate key {key[:40]!r}", key[:40])
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise _InvalidJson(f"the request body is not valid JSON: {name} is not a JSON value (send a finite number)")


def strict_json_error(body: bytes) -> tuple[str, str | None] | None:
    """Why ``body`` is not strict JSON, as (message, param); None when it is.

    Stricter than Python's ``json``: duplicate keys (which ``json`` resolves silently, last one wins),
    ``NaN``/``Infinity`` (not JSON at all), bytes that are not UTF-8, nesting too deep to parse and
    integers too long to convert are all refused.
    """
    try:
        json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except _InvalidJson as exc:
        return exc.message, exc.param
    except json.JSONDecodeError as exc:
        return f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", None
    except UnicodeDecodeError:
        return "the request body is not valid JSON: it is not UTF-8 text", None
    except RecursionError:
        return "the request body is not valid JSON: nested too deeply", None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return f"the request body is not valid JSON: {str(exc)[:120]}", None
    return None


class StrictJsonMiddleware:
    """Reads JSON request bodies before the app does and answers 400 for anything but strict JSON.

    Python's parser (and so FastAPI's) accepts ``NaN``/``Infinity`` and silently keeps the last of
    duplicate keys; both are refused here with the OpenAI error shape. The body is then replayed to
    the app unchanged; later ``receive`` calls (disconnect detection) go to the server as before.
    Runs inside the body limit, so what it reads is bounded by FLUX_MAX_BODY_BYTES.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def _is_json(headers: dict[bytes, bytes]) -> bool:
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not self._is_json(headers):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            problem = strict_json_error(body)
            if problem is not None:
                await _send_error(send, 400, problem[0], "invalid_json", param=problem[1])
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """Bearer-token auth for /v1/* (and /metrics when configured); constant-time comparison."""

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        # Compared as SHA-256 digests: equal lengths, so not even a key's length leaks through timing.
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.protect_metrics = protect_metrics

    def _protected(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys
        if scope["type"] != "http" or not keys or not self._protected(scope.get("path", "")) \
                or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        ok = False
        if scheme.lower() == "bearer" and token:
            presented = hashlib.sha256(token.strip().encode("latin-1")).digest()
            for digest in self._digests:  # check all keys: timing does not reveal which one matched
                ok |= hmac.compare_digest(presented, digest)
        if not ok:
            message = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "invalid API key"
            await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        # The owner of the jobs and files this request creates: a digest of its key, never the key itself.
        scope.setdefault("state", {})["owner"] = hashlib.sha256(b"owner:" + presented).hexdigest()[:24]
        await self.app(scope, receive, send)

