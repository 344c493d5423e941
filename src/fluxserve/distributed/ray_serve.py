"""fluxserve on Ray Serve: the application builder and ``fluxserve serve --ray``.

Three ways to start the same application:

* ``fluxserve serve --ray`` → :func:`run_ray`: joins the cluster at ``RAY_ADDRESS`` or starts a
  local one, starts Serve's HTTP proxy on ``FLUX_HOST:FLUX_PORT`` and deploys the app;
* ``serve run fluxserve.distributed.ray_serve:app_builder [model=schnell ...]`` (Ray's CLI);
* a Serve config YAML (``deploy/ray/serve-config.yaml``; KubeRay's ``RayService`` embeds one) whose
  ``import_path`` is ``fluxserve.distributed.ray_serve:app_builder``.

Every path reads the same settings (``FLUX_*`` environment, ``.env``, and for the builder its
``args``, which override them) and builds the graph with :func:`build_app`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from fluxserve.distributed.config import (
    ingress_deployment_options,
    ingress_settings,
    model_deployment_options,
    model_keys,
    replica_settings,
)
from fluxserve.distributed.messages import deployment_name
from fluxserve.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from ray.serve import Application, Deployment

log = logging.getLogger(__name__)

APP_NAME = "fluxserve"
INSTALL_HINT = "Ray Serve is not installed: pip install 'fluxserve[ray]'"


def build_app(settings: Settings, *, model_deployment: Any = None) -> Application:
    """The Serve application: one ``FluxModel-<key>`` deployment per model (FLUX_MODEL and
    FLUX_PRELOAD_MODELS) behind the ``FluxIngress`` HTTP deployment.

    ``model_deployment`` replaces the model deployment class (benchmarks); it must answer
    ``generate(RemoteRequest)`` with the event stream of :mod:`fluxserve.distributed.messages`.
    """
    from fluxserve.distributed.deployments import FluxIngress, FluxModel

    model_cls = cast("Deployment", model_deployment or FluxModel)  # @serve.deployment made these Deployments
    ingress_cls = cast("Deployment", FluxIngress)
    options = model_deployment_options(settings)
    models = {key: model_cls.options(name=deployment_name(key), **options).bind(replica_settings(settings, key))
              for key in model_keys(settings)}
    return ingress_cls.options(**ingress_deployment_options(settings)).bind(ingress_settings(settings), models)


def app_builder(args: dict[str, str]) -> Application:
    """Entry point for ``serve run`` and Serve config files: ``args`` are settings overrides by field
    name (``model: schnell``, ``ray_max_replicas: "4"``), on top of the ``FLUX_*`` environment."""
    overrides = {str(k).lower().removeprefix("flux_"): v for k, v in (args or {}).items()}
    return build_app(load_settings(**overrides))


def run_ray(settings: Settings) -> int:
    """``fluxserve serve --ray``: deploy on Ray Serve and serve until SIGINT/SIGTERM. Returns the exit code."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print(f"fluxserve: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        model_keys(settings)
    except (SettingsError, ValueError) as exc:
        print(f"fluxserve: {exc}", file=sys.stderr)
        return 2

    address = os.environ.get("RAY_ADDRESS")  # Ray's own variable: join that cluster
    joining = bool(address)
    if not ray.is_initialized():
        if joining:
            ray.init(address=address, log_to_driver=True)
        else:  # "local": never the last cluster `ray start` left on this machine, which may be gone
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    stop = threading.Event()

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        log.info("shutdown requested (signal %s)", sig)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a deployment failed (e.g. its model cannot load)
            reasons = "".join(f"\n  {reason}" for reason in _deployment_failures())
            print(f"fluxserve: Ray Serve could not deploy fluxserve: {exc}{reasons}", file=sys.stderr)
            return 1
        deployments = ", ".join(deployment_name(k) for k in model_keys(settings))
        log.info("fluxserve is serving on Ray Serve", extra={"ctx": {
            "url": f"http://{settings.host}:{settings.port}", "cluster": "joined" if joining else "local",
            "deployments": deployments}})
        print(f"fluxserve on Ray Serve: http://{settings.host}:{settings.port} ({deployments}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(APP_NAME)
            if not joining:
                serve.shutdown()
        finally:
            if not joining:
                ray.shutdown()
    return 0


def _deployment_failures() -> list[str]:
    """``<deployment>: <last error line>`` for each deployment Ray could not start (its replicas' error)."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # the reason is also in the replicas' logs
        return []
    if app is None:
        return []
    failures = []
    for name, deployment in app.deployments.items():
        lines = [line.strip() for line in str(deployment.message or "").splitlines() if line.strip()]
        if str(getattr(deployment.status, "value", deployment.status)) != "HEALTHY" and lines:
            errors = [line for line in lines if "Error" in line]
            failures.append(f"{name}: {(errors or lines)[-1][:300]}")
    return failures
