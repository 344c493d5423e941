"""Logging set-up: human-readable lines by default, one JSON object per line with FLUX_STRUCTURED_LOGS=1.

Context travels in ``extra={"ctx": {...}}`` and is merged into the JSON object (or appended as
``key=value`` in human mode). Secrets are scrubbed from every record before it is written.

Every record of the process goes through one handler on the root logger: fluxserve's own loggers,
uvicorn's (``uvicorn.error``; ``uvicorn.access`` too if it is turned on), libraries, and Python
warnings (``py.warnings``), so that in structured mode every line of stderr is one JSON object.
The access log proper is written by :class:`fluxserve.api.middleware.RequestContextMiddleware`
(logger ``fluxserve.access``) because it knows the request id, the model and the duration; the
server turns uvicorn's own access log off so each request is logged once (see docs/observability.md).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
_RESERVED = ("timestamp", "level", "logger", "message")
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never appear in logs (tokens, API keys); very short values are ignored.

    Each secret is also registered in its JSON-escaped spellings, so a secret with quotes,
    backslashes or non-ASCII characters is caught after ``json.dumps`` too.
    """
    global _secrets
    new: set[str] = set(_secrets)
    for value in values:
        if not value or len(value) < 4:
            continue
        new.add(value)
        new.add(json.dumps(value)[1:-1])
        new.add(json.dumps(value, ensure_ascii=False)[1:-1])
    with _secrets_lock:
        _secrets = tuple(sorted(new, key=len, reverse=True))  # longest first: no partial leftovers


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    global _secrets
    with _secrets_lock:
        _secrets = ()


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {(scrub(k) if isinstance(k, str) else k): _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v) for v in value]
    return value


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _uvicorn_access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Structured fields of a uvicorn access record (its args are client, method, path, version, status)."""
    args = record.args
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return {}
    client, method, path, http_version, status = args
    return {"client": client, "method": method, "path": path, "http_version": http_version,
            "status": int(status) if isinstance(status, int | str) and str(status).isdigit() else status}


def record_context(record: logging.LogRecord) -> dict[str, Any]:
    """The structured context of a record: ``extra={"ctx": ...}`` plus uvicorn's access fields."""
    data = _uvicorn_access_fields(record)
    ctx = getattr(record, "ctx", None)
    if isinstance(ctx, dict):
        data.update(ctx)
    return data


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, then the context keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_context(record).items():
            data[f"ctx_{key}" if key in _RESERVED else key] = value  # context never hides the basics
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return scrub(json.dumps(_scrub_value(data), default=str, ensure_ascii=False))


class HumanFormatter(logging.Formatter):
    """``2025-01-01 12:00:00,000 INFO    logger: message key=value ...`` with secrets scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = getattr(record, "ctx", None)  # uvicorn access records already read well as text
        if isinstance(ctx, dict) and ctx:
            text += " " + " ".join(f"{k}={json.dumps(v, default=str, ensure_ascii=False)}" for k, v in ctx.items())
        return scrub(text)


def make_formatter(structured: bool) -> logging.Formatter:
    return JsonFormatter() if structured else HumanFormatter()


def configure_logging(level: str = "INFO", structured: bool = False) -> logging.Handler:
    """Route fluxserve, uvicorn (access log included), warnings and library logs through one formatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(structured))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "py.warnings"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.captureWarnings(True)  # warnings.warn(...) from libraries: a log record, not a raw stderr line
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_libraries()
    return handler


def _quiet_libraries() -> None:
    """diffusers/transformers print progress bars and chatty warnings of their own; keep them out."""
    try:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        dlog.disable_default_handler()  # their own stderr handler would bypass our format
        dlog.enable_propagation()
    except ImportError:  # pragma: no cover
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_default_handler()
        tlog.enable_propagation()
    except ImportError:  # pragma: no cover
        pass
    try:
        import huggingface_hub.utils.logging as hlog

        hub = hlog.get_logger()  # configured on import, with a stderr handler of its own
        hub.handlers[:] = [h for h in hub.handlers if type(h) is not logging.StreamHandler]
        hub.propagate = True
    except ImportError:  # pragma: no cover
        pass
