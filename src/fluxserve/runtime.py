"""The composition root: settings → a model catalog and a job queue → storage and observability.

One :class:`Runtime` exists per server process (the HTTP app, the CLI's ``generate`` and the Ray
replicas all build one). By default it serves the models of this process's devices: a
:class:`~fluxserve.catalog.LocalCatalog` over one :class:`~fluxserve.engine.engine.DeviceEngine` per
device and the :class:`~fluxserve.scheduler.scheduler.Scheduler` in front of them. Scale-out plugs in
another catalog and queue (``backend=``), never a subclass: the Ray Serve ingress passes a catalog of
replicas and a queue that dispatches to them. Readiness, shutdown and the metrics hooks are written
once, here, for both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fluxserve import __version__
from fluxserve.catalog import LocalCatalog
from fluxserve.models.devices import BackendProbe, DevicePlan
from fluxserve.models.handle import ModelHandle
from fluxserve.models.sources import ModelSources
from fluxserve.models.spec import ModelSpec
from fluxserve.observability.events import job_ended
from fluxserve.observability.logs import register_secrets
from fluxserve.observability.metrics import Metrics
from fluxserve.scheduler.jobs import Job
from fluxserve.scheduler.protocols import Engine, JobQueue, ModelCatalog
from fluxserve.scheduler.scheduler import Hook, Scheduler
from fluxserve.settings import Settings
from fluxserve.storage.files import FileRegistry
from fluxserve.storage.outputs import OutputStore

log = logging.getLogger(__name__)

Backend = Callable[[Settings, Hook], tuple[ModelCatalog, JobQueue]]
"""Builds the catalog and queue a runtime serves with; gets the runtime's metrics hook."""


class Runtime:
    """Everything a server process owns, wired together."""

    def __init__(self, settings: Settings, probe: BackendProbe | None = None, *,
                 engines: Sequence[Engine] | None = None, backend: Backend | None = None) -> None:
        """``engines`` replaces the local devices' engines (tests drive a fake engine through the real app);
        ``backend`` replaces the local catalog and scheduler altogether (the Ray Serve ingress)."""
        self.settings = settings
        register_secrets([settings.hf_token_value(), *settings.all_api_keys()])
        self.metrics = Metrics(settings.metrics_window)
        if backend is not None:
            self.models, self.scheduler = backend(settings, self._on_event)
        else:
            self.models, self.scheduler = _local_backend(settings, probe, engines, self._on_event, self.metrics)
        names = self.models.names
        self.metrics.allow_models([*names.configured.values(), *names.allowed.values()])
        self.outputs = OutputStore(settings.output_dir, settings.output_max_bytes)
        self.files = FileRegistry(settings.file_ttl, settings.files_max_bytes, settings.files_max_bytes_per_key)
        self.encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self.sources = ModelSources(cache_dir=settings.cache_dir, revision=settings.revision,
                                    hub_downloads=settings.hub_downloads, hub_token=settings.hf_token_value())
        self.started_at = time.time()
        self.shutting_down = False

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait: bool = False) -> None:
        for plan in self.plans:
            log.info("device selected", extra={"ctx": {"device": plan.device, "dtype": plan.dtype,
                                                         "vae_dtype": plan.vae_dtype,
                                                         "generator_device": plan.generator_device,
                                                         "reasons": list(plan.reasons)}})
        log.info("settings", extra={"ctx": {"settings": self.settings.redacted(), "version": __version__}})
        removed = self.outputs.cleanup_temporaries()
        if removed:
            log.info("removed %d partial files left by an earlier crash", removed)
        self.scheduler.start()
        self.models.start()
        if wait:
            self.models.wait_started()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self.models.wait_started(timeout)

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not): shutdown, the catalog's models, the queue's workers, repeated OOM."""
        reasons = ["shutting down"] if self.shutting_down else []
        reasons += self.models.readiness_problems()
        reasons += self.scheduler.readiness_problems()
        problem = self.outputs.problem() if self.settings.store_local else None
        if problem:
            reasons.append(problem)
        failures = self.scheduler.consecutive_oom_failures
        if failures >= self.settings.oom_max_consecutive:
            reasons.append(f"{failures} requests in a row failed out of memory")
        return not reasons, reasons

    def readiness_warnings(self) -> list[str]:
        """What /ready reports without answering 503: a full output directory (with FLUX_STORE_LOCAL=1), which
        refuses saves (answered as ``save_error``) while generation goes on."""
        warning = self.outputs.space_warning() if self.settings.store_local else None
        return [warning] if warning else []

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.scheduler.stop_accepting()

    def close(self, timeout: float | None = None) -> int:
        """Finish queued/running jobs up to FLUX_SHUTDOWN_TIMEOUT, cancel the rest, stop threads."""
        self.begin_shutdown()
        cancelled = self.scheduler.drain(self.settings.shutdown_timeout if timeout is None else timeout)
        self.scheduler.shutdown()
        self.models.close()
        self.encoder.shutdown(wait=True)
        log.info("shut down", extra={"ctx": {"cancelled_jobs": cancelled}})
        return cancelled

    # --- what the routes ask of the catalog ------------------------------------------------------
    @property
    def plans(self) -> list[DevicePlan]:
        return list(self.models.plans)

    @property
    def startup_error(self) -> str | None:
        error: str | None = getattr(self.models, "startup_error", None)
        return error

    @property
    def warmups(self) -> list[Any]:
        return list(getattr(self.models, "warmups", []))

    @property
    def active_key(self) -> str:
        return self.models.names.active_key

    @property
    def default_spec(self) -> ModelSpec:
        return self.models.names.default_spec

    @property
    def model_aliases(self) -> dict[str, str | None]:
        aliases: dict[str, str | None] = self.models.names.aliases
        return aliases

    @property
    def engines(self) -> list[Any]:
        return list(getattr(self.models, "engines", []))

    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec:
        return self.models.resolve(name, from_request=from_request, operator=operator)

    def may_serve(self, key: str) -> bool:
        allowed: bool = self.models.names.may_serve(key)
        return allowed

    def known_models(self) -> list[ModelSpec]:
        return list(self.models.known_models())

    def loadable(self, spec: ModelSpec) -> bool:
        """Whether ``spec`` is loaded here or can be (blocking: see :class:`ModelSources`)."""
        return bool(self.model_info(spec.key)) or spec.key in self.models.names.configured or \
            self.sources.loadable(spec)

    def usable_models(self, *, admin: bool) -> list[ModelSpec]:
        """The models a caller can use here (blocking: see :meth:`loadable`): those it may name (an admin any
        registry model, by selecting it; others the models requests may name, FLUX_MODELS) that are loaded or
        loadable. The active model is always among them."""
        may_name = admin or self.settings.allow_any_model
        return [spec for spec in self.known_models()
                if spec.key == self.active_key or ((may_name or self.may_serve(spec.key)) and self.loadable(spec))]

    def select(self, name: str) -> ModelSpec:
        spec = self.models.select(name)
        self.metrics.allow_models([spec])
        return spec

    def memory(self) -> list[dict[str, Any]]:
        return self.models.memory()

    def unload(self, key: str) -> tuple[list[str], int]:
        return self.models.unload(key)

    def release(self, keep: set[str]) -> tuple[list[str], int]:
        return self.models.release(keep)

    def model_info(self, key: str) -> dict[str, ModelHandle]:
        return self.models.model_info(key)

    def replicas(self, key: str) -> list[dict[str, Any]] | None:
        return self.models.replicas(key)

    def plan_for(self, device: str | None) -> DevicePlan:
        """The device plan of the engine that ran a job (the first one if unknown)."""
        return next((plan for plan in self.plans if plan.device == device), self.plans[0])

    def submit(self, job: Job) -> Job:
        return self.scheduler.submit(job)

    # --- observability ---------------------------------------------------------------------------
    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "batch_started":
            self.metrics.batch_size.observe(data["size"])
        elif name in ("job_cancelled", "job_failed"):  # one log line and the counters, per job
            job_ended(self.metrics, data["job"], log_prompts=self.settings.log_prompts)
        elif name == "model_loaded":
            self.metrics.model_load.labels(model=self.metrics.model_label(data["model"])).set(data["seconds"])

    def refresh_gauges(self) -> None:
        stats = self.scheduler.stats()
        self.metrics.queue_depth.set(stats["queue_depth"])
        self.metrics.in_flight.set(stats["jobs_in_flight"])
        for memory in self.models.memory():
            device = memory.get("device", "?")
            for kind, value in memory.items():
                if kind.endswith("_bytes"):
                    self.metrics.device_memory.labels(device=device, kind=kind[:-6]).set(value)


def _local_backend(settings: Settings, probe: BackendProbe | None, engines: Sequence[Engine] | None, hook: Hook,
                   metrics: Metrics) -> tuple[LocalCatalog, Scheduler]:
    """This process's devices: a plan and an engine each, one scheduler in front of them."""
    from fluxserve.engine.device import select_device_dtype
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.engine.faults import FaultInjector
    from fluxserve.engine.memory import check_memory_modes
    from fluxserve.engine.optimize import check_attention_backend

    engine = settings.engine  # what every engine gets (worker processes receive it across their pipe)
    devices = settings.devices or [settings.device]
    split = _check_parallel(settings, devices) if settings.parallel.strip().lower() not in ("", "off") else None
    plans = [select_device_dtype(device, settings.dtype, settings.generator_device, probe) for device in devices]
    for plan in plans:  # a memory mode that cannot work here stops start-up, naming FLUX_OFFLOAD etc.
        for warning in check_memory_modes(engine, plan):
            log.warning(warning)
        check_attention_backend(engine, plan)  # likewise an attention kernel that is not installed
    if any(plan.backend == "cpu" for plan in plans):
        _leave_a_core_for_the_server()
    if engines is None and split is not None:  # FLUX_PARALLEL: one engine per group of GPUs
        from fluxserve.engine.workers import ProcessEngine

        by_device = dict(zip(devices, plans, strict=True))
        engines = [ProcessEngine(engine, by_device[group[0]], group=[by_device[d] for d in group], split=split)
                   for group in split.groups(devices)]
        plans = [by_device[group[0]] for group in split.groups(devices)]
    if engines is None and settings.worker_processes:
        from fluxserve.engine.workers import ProcessEngine, cpu_threads_per_worker

        cpu_workers = sum(1 for plan in plans if plan.backend == "cpu")
        engines = [ProcessEngine(engine, plan, torch_threads=cpu_threads_per_worker(cpu_workers)
                                 if plan.backend == "cpu" else None) for plan in plans]
    if engines is None:
        faults = FaultInjector(settings.fault_injection, settings.faults)
        engines = [DeviceEngine(engine, plan, faults) for plan in plans]
    scheduler = Scheduler(settings.scheduler, engines, hook=hook)
    return LocalCatalog(settings, plans, engines, scheduler, metrics), scheduler


def _check_parallel(settings: Settings, devices: list[str]) -> Any:
    """FLUX_PARALLEL: the split plan, or refuse at start-up what cannot run here (docs/parallel.md)."""
    import torch

    from fluxserve.engine.parallel import check_parallel

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return check_parallel(settings.parallel, devices, cuda, worker_processes=settings.worker_processes,
                          attention_backend=settings.attention_backend)


def _leave_a_core_for_the_server() -> None:
    """On the CPU backend torch would use every core and starve the event loop (health checks stall).
    Keep one core for the HTTP server and the encoders."""
    import os

    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
