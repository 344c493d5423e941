"""The FastAPI application: routes, middleware, error handlers, static web page, lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from fluxserve import __version__
from fluxserve.api.editing import EditService
from fluxserve.api.errors import install_error_handlers
from fluxserve.api.jobs import AsyncJobs, build_async_jobs
from fluxserve.api.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    BodyMemory,
    ClientBudgetMiddleware,
    HeaderLimitMiddleware,
    HeadMiddleware,
    RateLimitMiddleware,
    RequestContextMiddleware,
    StrictJsonMiddleware,
    UploadGuardMiddleware,
)
from fluxserve.api.routes import edits, images, loras, models, system
from fluxserve.api.serving import ImageService
from fluxserve.settings import Settings

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"


def create_app(settings: Settings, runtime: Runtime | None = None, *, manage_runtime: bool = True) -> FastAPI:
    """Build the app. ``runtime`` defaults to a new one started/stopped by the app's lifespan."""
    if runtime is None:
        from fluxserve.runtime import Runtime  # the engine (torch) loads only when an app really serves

        runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs: AsyncJobs = app.state.jobs
        if manage_runtime:
            runtime.start()
        await jobs.start()  # opens the job store: a store that cannot be used stops the start here
        yield
        jobs.stop_claiming()
        if manage_runtime:
            await asyncio.get_running_loop().run_in_executor(None, runtime.close)
        await jobs.stop()

    app = FastAPI(
        title="fluxserve", version=__version__, lifespan=lifespan,
        description="Self-hosted, OpenAI-compatible image generation on diffusers. Every error is "
                    '`{"error": {"message", "type", "param", "code"}}`.',
    )
    app.state.runtime = runtime
    app.state.http = runtime.settings.http  # the HTTP layer's section, as the routes and services read it
    app.state.images = ImageService(runtime, app.state.http)
    app.state.edits = EditService(app.state.images)
    app.state.jobs = build_async_jobs(app.state.images, app.state.edits)
    app.state.static_dir = STATIC_DIR
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(images.router)
    app.include_router(edits.router)
    app.include_router(models.router)
    app.include_router(loras.router)
    http = settings.http
    if http.web_ui and STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Outermost last: request context → CORS → header limits → body limit → upload guard (slow bodies,
    # shutdown) → auth and roles → per-client budget → rate limit → strict JSON → HEAD → app. CORS wraps the
    # limits and auth so that their 401/403/408/413/431/429 reach pages on allowed origins (the web page asks
    # for a key).
    edit_paths = ("/v1/images/edits", "/v1/images/edits/jobs", "/v1/images/variations")
    app.add_middleware(HeadMiddleware)
    app.add_middleware(StrictJsonMiddleware, parse_threads=http.json_parse_threads, parsed_paths=edit_paths,
                       memory=BodyMemory(http.body_memory_bytes))
    app.add_middleware(RateLimitMiddleware, per_minute=http.rate_limit_per_minute, burst=http.rate_limit_burst)
    app.add_middleware(ClientBudgetMiddleware, max_requests=http.max_connections_per_client,
                       max_streams=http.max_streams_per_client)
    app.add_middleware(ApiKeyMiddleware, keys=http.all_api_keys(), protect_metrics=http.metrics_require_auth,
                       admin_keys=list(http.admin_keys))
    app.add_middleware(UploadGuardMiddleware, shutting_down=lambda: runtime.shutting_down,
                       grace=http.body_timeout, min_rate=http.body_min_rate)
    edit_limit = max(http.max_body_bytes, http.max_edit_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=http.max_body_bytes,
                       path_limits=dict.fromkeys(edit_paths, edit_limit))
    app.add_middleware(HeaderLimitMiddleware, max_count=http.max_header_count,
                       max_bytes=http.max_header_bytes)
    if http.cors_origins:
        allow_all = "*" in http.cors_origins
        app.add_middleware(CORSMiddleware, allow_origins=http.cors_origins,
                           allow_credentials=not allow_all,  # never '*' together with credentials
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Job-ID", "Retry-After"])
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)
    return app
