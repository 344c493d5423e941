"""ASGI middleware: request ids, body-size limit, API-key auth and per-request metrics.

Written as plain ASGI (not BaseHTTPMiddleware) so that streaming responses and client-disconnect
detection keep working.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.errors import error_body
from fluxserve.observability.metrics import Metrics

log = logging.getLogger("fluxserve.access")

_ENDPOINT_NAMES = (
    ("/v1/images/generations", "generations"), ("/v1/images/jobs", "jobs"), ("/v1/images/files", "files"),
    ("/v1/images/cancel", "cancel"), ("/v1/models", "models"), ("/v1/memory", "memory"),
    ("/v1/metrics", "metrics_summary"), ("/v1/tokenize", "tokenize"), ("/metrics", "metrics"),
    ("/health", "health"), ("/ready", "ready"), ("/static", "static"),
)


def endpoint_name(path: str) -> str:
    for prefix, name in _ENDPOINT_NAMES:
        if path.startswith(prefix):
            return name
    return "root" if path == "/" else "other"


async def _send_error(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]]
                      | None = None, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
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
        request_id = given if given and len(given) <= 128 and given.isprintable() else "req_" + uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                raw = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in raw):
                    raw.append((b"x-request-id", state.get("job_id", request_id).encode("latin-1")))
                message["headers"] = raw
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = endpoint_name(path)
            duration = time.perf_counter() - started
            model = state.get("model", "")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status_holder["status"]), model=model).inc()
            if endpoint not in ("metrics", "static", "health"):
                self.metrics.request_duration.labels(endpoint=endpoint).observe(duration)
            log.info("request", extra={"ctx": {
                "request_id": request_id, "method": scope.get("method"), "path": path,
                "status": status_holder["status"], "duration_s": round(duration, 6)}})


class BodyLimitMiddleware:
    """413 for bodies over the limit, judged by Content-Length or, for chunked bodies, while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "invalid_request")
                return
            if too_big:
                await _send_error(send, 413, f"request body is larger than {self.max_bytes} bytes "
                                             "(FLUX_MAX_BODY_BYTES)", "request_too_large")
                return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await _send_error(send, 413, f"request body is larger than {self.max_bytes} bytes "
                                             "(FLUX_MAX_BODY_BYTES)", "request_too_large")


class _BodyTooLarge(Exception):
    pass


class ApiKeyMiddleware:
    """Bearer-token auth for /v1/* (and /metrics when configured); constant-time comparison."""

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool) -> None:
        self.app = app
        self.keys = keys
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
            presented = token.strip().encode()
            for key in keys:  # check all keys: timing does not reveal which one matched
                ok |= hmac.compare_digest(presented, key.encode())
        if not ok:
            message = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "invalid API key"
            await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)

