"""The Ray Serve deployments: ``FluxIngress`` (HTTP, fluxserve's app) and one ``FluxModel-<key>`` per model.

Importing this module needs Ray Serve (``pip install "fluxserve[ray]"``).

::

    HTTP ─▶ Serve proxy ─▶ FluxIngress (create_app + IngressRuntime)
                              ├─ model=tiny-flux ─▶ FluxModel-tiny-flux  [replica 1 … N, one GPU each]
                              └─ model=tiny-qwen ─▶ FluxModel-tiny-qwen  [replica 1 … M]
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.config import ObservabilityConfig
from fluxserve.distributed.ingress import Backpressure, ReplicaLost, build_ingress_app
from fluxserve.distributed.messages import (
    FINAL_EVENTS,
    INGRESS_DEPLOYMENT,
    RemoteRequest,
    ReplicaInfo,
    ReplicaStatus,
    deployment_name,
)
from fluxserve.distributed.replica import ReplicaWorker
from fluxserve.settings import Settings

log = logging.getLogger(__name__)


def _replica_id() -> str:
    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_id.unique_id}"


def _configure_logging(observability: ObservabilityConfig) -> None:
    from fluxserve.observability.logs import configure_logging

    configure_logging(observability.log_level, observability.structured_logs)


@serve.deployment
class FluxModel:
    """One replica of one model: a :class:`ReplicaWorker` (engine + scheduler with dynamic batching).

    The constructor loads and warms the model, so Ray reports the replica RUNNING only when it can
    generate. Ray's health check calls :meth:`check_health`, which fails like the single server's
    ``/ready`` (start-up failed, repeated out-of-memory), and Ray then replaces the replica.
    """

    def __init__(self, settings: Settings) -> None:
        _configure_logging(settings.observability)
        self.worker = ReplicaWorker(settings, _replica_id())

    async def generate(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.worker.run(request):
            yield event

    def info(self) -> ReplicaInfo:
        return self.worker.info()

    def token_count(self, prompt: str) -> dict[str, int]:
        return self.worker.token_count(prompt)

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def check_health(self) -> None:
        reasons = self.worker.health()
        if reasons:
            raise RuntimeError("; ".join(reasons))

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


class RayModelClient:
    """:class:`~fluxserve.distributed.ingress.ModelClient` over a Serve deployment handle."""

    def __init__(self, handle: DeploymentHandle, *, token_timeout: float = 60.0) -> None:
        self.handle = handle
        self.token_timeout = token_timeout

    async def stream(self, request: RemoteRequest) -> AsyncIterator[dict[str, Any]]:
        responses = cast(DeploymentResponseGenerator, self.handle.options(stream=True).generate.remote(request))
        finished = False
        try:
            async for event in responses:
                if event["type"] in FINAL_EVENTS:
                    finished = True
                yield event
        except BackPressureError as exc:
            raise Backpressure(str(exc), exc.retry_after_s) from exc
        except (RayActorError, ObjectLostError, DeploymentUnavailableError) as exc:
            raise ReplicaLost(_first_line(exc)) from exc
        except RayTaskError as exc:
            if isinstance(exc.cause, RayActorError | ObjectLostError):
                raise ReplicaLost(_first_line(exc.cause)) from exc
            raise
        finally:
            if not finished:
                responses.cancel()  # the client went away or the job was cancelled: stop the replica's job

    def token_count(self, prompt: str) -> dict[str, int]:
        counts: dict[str, int] = self.handle.token_count.remote(prompt).result(timeout_s=self.token_timeout)
        return counts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}"


def serve_details() -> dict[str, Any]:
    """Ray's Serve instance details (what ``serve status`` and the dashboard show), as a dict.

    Uses the controller client that ``serve.status()`` uses; ``serve.status()`` itself drops the
    per-replica rows (ids, pids, nodes) that ``/v1/models`` shows.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        return {}
    details: dict[str, Any] = client.get_serve_details()
    return details


def replica_table(app_name: str, deployments: dict[str, str]) -> dict[str, list[ReplicaStatus]]:
    """model key → its deployment's replicas (id ``<deployment>#<unique id>``, state, pid, node)."""
    app = serve_details().get("applications", {}).get(app_name, {})
    table: dict[str, list[ReplicaStatus]] = {}
    for key, name in deployments.items():
        rows = app.get("deployments", {}).get(name, {}).get("replicas", [])
        table[key] = [ReplicaStatus(replica_id=f"{name}#{row['replica_id']}", state=_state(row.get("state")),
                                    pid=row.get("pid"), node_ip=row.get("node_ip")) for row in rows]
    return table


def _state(value: Any) -> str:
    """``ReplicaState.RUNNING`` (a str enum) or ``"RUNNING"`` → ``"RUNNING"``."""
    return str(getattr(value, "value", value))


class ProxyRequestIdDedup:
    """Serve's proxy appends ``X-Request-ID`` to every response; drop fluxserve's copy when it is the
    same id (it is, unless the body's ``request_id`` chose another), so clients see one header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        proxy_id = dict(scope.get("headers") or []).get(b"x-request-id")

        async def dedup(message: Message) -> None:
            if message["type"] == "http.response.start" and proxy_id is not None:
                message["headers"] = [(k, v) for k, v in message.get("headers") or []
                                      if not (k.lower() == b"x-request-id" and v == proxy_id)]
            await send(message)

        await self.app(scope, receive, dedup)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class FluxIngress:
    """HTTP ingress: fluxserve's FastAPI app, built on the replica (``__serve_build_asgi_app__``)."""

    def __init__(self, settings: Settings, models: dict[str, DeploymentHandle]) -> None:
        _configure_logging(settings.observability)
        self.settings = settings
        self.models = models

    def __serve_build_asgi_app__(self) -> FastAPI:
        app_name = serve.get_replica_context().app_name
        deployments = {key: deployment_name(key) for key in self.models}

        async def status() -> dict[str, list[ReplicaStatus]]:
            return await asyncio.to_thread(replica_table, app_name, deployments)

        clients = {key: RayModelClient(handle) for key, handle in self.models.items()}
        app = build_ingress_app(self.settings, clients, status)
        app.add_middleware(ProxyRequestIdDedup)
        return app
