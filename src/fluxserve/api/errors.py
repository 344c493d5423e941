"""Every error leaves the server in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

One function builds the body; exception handlers map each failure to a status: validation → 400
(never FastAPI's 422), unknown thing → 404, queue full → 429, unavailable → 503, anything unexpected
→ 500 with a generic message and the request id (details go to the log only).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.scheduler.jobs import JobError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          499: "invalid_request_error"}
_MAX_ECHO = 120


class APIError(Exception):
    """An error with everything the response needs."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": sanitize(message), "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_message_parts(status: int, message: str, *, param: str | None = None,
                        code: str | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of an error for plain ASGI senders: the same serializer as every other answer."""
    response = error_response(status, message, param=param, code=code)
    return list(response.raw_headers), bytes(response.body)


_PATHS = re.compile(r"(/[\w.\-]+){2,}")
_ADDRESSES = re.compile(r"0x[0-9a-fA-F]{6,}")


def sanitize(message: str) -> str:
    """Strip file paths and memory addresses from text that reaches clients."""
    return _ADDRESSES.sub("0x…", _PATHS.sub("<path>", message))


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "…"


def _param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) if parts else None


def validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    """One readable line from a pydantic error, with the bad value echoed (truncated)."""
    param = _param_of(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")), None
    if kind in ("model_attributes_type", "dict_type") and param is None:
        return ("the request body must be a JSON object; send it with 'Content-Type: application/json'"), None
    if kind == "missing" and param is None:
        return "a request body is required: send a JSON object with 'Content-Type: application/json'", None
    if kind == "missing":
        return f"invalid '{param}': is required, got nothing", param
    msg = _BOUNDS.get(kind, "").format(**err.get("ctx", {})) or _reason(str(err.get("msg", "invalid value")))
    if not param:
        return msg, None
    got = f", got {_echo(err['input'])}" if "input" in err else ""
    return f"invalid '{param}': {msg}{got}", param


_BOUNDS = {"greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
           "greater_than": "must be greater than {gt}", "less_than": "must be less than {lt}",
           "string_too_short": "must be at least {min_length} characters", "literal_error": "must be {expected}",
           "string_too_long": "must be at most {max_length} characters",
           "string_pattern_mismatch": "must match {pattern}"}


def _reason(msg: str) -> str:
    """pydantic's "Input should be a valid integer" → "must be a valid integer" (one form for all)."""
    msg = msg.removeprefix("Value error, ")
    for prefix in ("Input should be ", "Input should "):
        if msg.startswith(prefix):
            return "must be " + msg.removeprefix(prefix) if prefix.endswith("be ") else "must " + msg[len(prefix):]
    return msg[:1].lower() + msg[1:]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(JobError)
    async def _job_error(_request: Request, exc: JobError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        return error_response(exc.status, exc.message, code=exc.code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if not errors:
            return error_response(400, "invalid request", code="invalid_request")
        message, param = validation_message(errors[0])
        code = "invalid_json" if errors[0].get("type") == "json_invalid" else "invalid_value"
        if errors[0].get("type") == "missing":
            code = "missing_required_parameter"
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                415: "unsupported_media_type"}.get(status)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if status == 404 and message == "Not Found":
            message = "no such endpoint"
        return error_response(status, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None) or request.headers.get("x-request-id") or "unknown"
        log.error("unhandled error", exc_info=exc, extra={"ctx": {"request_id": request_id,
                                                                   "path": request.url.path}})
        return error_response(500, f"internal server error (request id {request_id}); see the server log",
                              code="internal_error")
