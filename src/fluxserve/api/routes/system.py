"""System routes: root, liveness, readiness, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from fluxserve.api.protocol import public_model_source
from fluxserve.api.routes.models import public_source, runtime_snapshot

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

router = APIRouter()

ENDPOINTS = [
    "GET /", "GET /health", "GET /ready", "POST /v1/images/generations", "POST /v1/images/jobs",
    "GET /v1/images/jobs/{id}", "DELETE /v1/images/jobs/{id}", "GET /v1/images/jobs/{id}/events",
    "POST /v1/images/cancel", "GET /v1/images/files/{id}", "GET /v1/models", "GET /v1/models/{id}",
    "POST /v1/models/select", "POST /v1/models/unload", "POST /v1/memory/release", "POST /v1/tokenize",
    "GET /metrics", "GET /v1/metrics/summary", "GET /docs", "GET /openapi.json",
]


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.get("/", summary="Web page for browsers, JSON status for API clients", response_model=None)
async def root(request: Request) -> Response:
    runtime = _runtime(request)
    accept = request.headers.get("accept", "")
    index = request.app.state.static_dir / "index.html"
    if "text/html" in accept and request.app.state.http.web_ui and index.is_file():
        return FileResponse(index, media_type="text/html")
    active = runtime.resolve(None)
    return JSONResponse({"status": "ok", "message": "fluxserve: OpenAI-compatible image generation",
                         "model": {"active_key": public_model_source(active.key), "active_id": public_source(active),
                                   "active_type": active.family},
                         "endpoints": ENDPOINTS})


@router.get("/health", summary="Liveness: the process answers")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: default model loaded, warmed up, not shutting down, not failing OOM")
async def ready(request: Request) -> JSONResponse:
    """200 or 503 with the reasons; ``warnings`` (a full output directory, an unreachable job store: synchronous
    requests still work) never make it 503."""
    runtime = _runtime(request)
    ok, reasons = runtime.readiness()
    found = [*runtime.readiness_warnings(), *request.app.state.jobs.problems()]
    warnings = {"warnings": found} if found else {}
    if ok:
        return JSONResponse({"status": "ready", **warnings})
    return JSONResponse({"status": "not_ready", "reasons": reasons, **warnings,
                         "error": {"message": "; ".join(reasons), "type": "server_error", "param": None,
                                   "code": "not_ready"}}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    runtime = _runtime(request)
    runtime.refresh_gauges()
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/metrics/summary", summary="Rolling averages of the last requests (JSON)")
async def metrics_summary(request: Request) -> JSONResponse:
    runtime = _runtime(request)
    data = runtime.metrics.summary()
    data["queue"] = runtime.scheduler.stats()
    data["runtime"] = {"devices": runtime_snapshot(runtime)["devices"]}
    return JSONResponse(data)
