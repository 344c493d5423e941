"""The composition root: settings → device plans → scheduler (engines) → storage and observability.

One :class:`Runtime` exists per server process (the HTTP app, the CLI's ``generate`` and the Ray
replicas all build one). It starts the workers, preloads and warms models in the background, tracks
readiness and shuts down gracefully.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxserve import __version__
from fluxserve.engine.device import BackendProbe, DevicePlan, select_device_dtype
from fluxserve.engine.memory import check_memory_modes
from fluxserve.engine.registry import BUILTIN_MODELS, ModelSpec, UnknownModelError, resolve_model
from fluxserve.generation import GenerationParams, ImageRequest, OutOfMemory
from fluxserve.observability.events import job_ended
from fluxserve.observability.logs import register_secrets
from fluxserve.observability.metrics import Metrics
from fluxserve.scheduler.jobs import Job, JobError
from fluxserve.scheduler.scheduler import Scheduler
from fluxserve.settings import Settings
from fluxserve.storage.files import FileRegistry
from fluxserve.storage.outputs import OutputStore

log = logging.getLogger(__name__)


class ModelNotAllowedError(UnknownModelError):
    """The model exists but requests may not name it here (FLUX_MODELS): the HTTP layer answers 403."""


@dataclass
class WarmupRecord:
    model: str
    size: str
    seconds: float
    outcome: str


class Runtime:
    """Everything a server process owns, wired together."""

    def __init__(self, settings: Settings, probe: BackendProbe | None = None) -> None:
        self.settings = settings
        register_secrets([settings.hf_token_value(), *settings.all_api_keys()])
        devices = settings.devices or [settings.device]
        self.plans: list[DevicePlan] = [
            select_device_dtype(device, settings.dtype, settings.generator_device, probe) for device in devices
        ]
        for plan in self.plans:  # a memory mode that cannot work here stops start-up, naming FLUX_OFFLOAD etc.
            for warning in check_memory_modes(settings, plan):
                log.warning(warning)
        if any(plan.backend == "cpu" for plan in self.plans):
            _leave_a_core_for_the_server()
        self.default_spec = resolve_model(settings.model)
        self._configured: dict[str, ModelSpec] = {self.default_spec.key: self.default_spec}
        for name in settings.preload_models:
            spec = resolve_model(name)
            self._configured[spec.key] = spec
        self.active_key = self.default_spec.key
        self.allowed: dict[str, ModelSpec] = {spec.key: spec for spec in map(resolve_model, settings.models)}
        self.metrics = Metrics(settings.metrics_window)
        self.metrics.allow_models([*self._configured.values(), *self.allowed.values()])
        self.scheduler = Scheduler(settings, self.plans, hook=self._on_event)
        self.outputs = OutputStore(settings.output_dir, settings.output_max_bytes)
        self.files = FileRegistry(settings.file_ttl)
        self.encoder = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self.warmups: list[WarmupRecord] = []
        self.startup_error: str | None = None
        self.started_at = time.time()
        self._startup_done = threading.Event()
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
        thread = threading.Thread(target=self._startup, name="startup", daemon=True)
        thread.start()
        if wait:
            thread.join()

    def _startup(self) -> None:
        try:
            for spec in self._configured.values():
                self.scheduler.ensure_loaded(spec, wait=True)
                if self.settings.warmup_enable:
                    self.warmup(spec)
        except JobError as exc:
            self.startup_error = exc.message
            log.error("start-up failed: %s", exc.message)
        except Exception as exc:  # keep serving /health and explain in /ready (by its kind: details in the log)
            self.startup_error = f"unexpected {type(exc).__name__} (see the server log)"
            log.exception("start-up failed")
        finally:
            self._startup_done.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._startup_done.wait(timeout)

    def warmup(self, spec: ModelSpec) -> None:
        """One 1-step generation per engine and warmup size; logs duration and outcome."""
        sizes = self.settings.warmup_sizes or [f"{spec.width}x{spec.height}"]
        for engine in self.scheduler.engines:
            model = engine.get(spec.key)
            if model is None:
                continue
            for size in sizes:
                width, height = (int(x) for x in size.split("x"))
                # The default text length, so a compiled transformer meets the shape real requests use.
                params = GenerationParams(spec.key, width, height, 1, spec.guidance, spec.max_sequence_length)
                started = time.perf_counter()
                fallback: str | None = None
                try:
                    with engine.faults.suspended():  # injected faults are for requests, not warm-up
                        result = engine.generate(model, params, [ImageRequest("warmup", [0])])[0]
                    outcome = "ok"
                    fallback = result.fallback_reason if result.fallback_applied else None
                except OutOfMemory as exc:
                    outcome = f"out of memory: {exc.reason}"
                    fallback = exc.reason
                seconds = time.perf_counter() - started
                if fallback:
                    self.metrics.record_fallback(fallback, failed=outcome != "ok")
                self.warmups.append(WarmupRecord(spec.key, size, seconds, outcome))
                self.metrics.warmup.labels(model=self.metrics.model_label(spec.key)).set(seconds)
                model.warmup[size] = {"seconds": round(seconds, 4), "outcome": outcome}
                log.info("warmup", extra={"ctx": {"model": spec.key, "device": engine.device, "size": size,
                                                   "seconds": round(seconds, 4), "outcome": outcome,
                                                   **({"fallback_reason": fallback} if fallback else {})}})

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not)."""
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if self.startup_error:
            reasons.append(f"start-up failed: {_without_paths(self.startup_error)}")
        elif not self._startup_done.is_set():
            reasons.append("loading and warming up the default model")
        elif not self.scheduler.is_loaded(self.active_key):
            reasons.append(f"model {self.active_key} is not loaded")
        if self.settings.store_local and (output_problem := self.outputs.problem()):  # unwritable or full
            reasons.append(output_problem)
        failures = self.scheduler.consecutive_oom_failures
        if failures >= self.settings.oom_max_consecutive:
            reasons.append(f"{failures} requests in a row failed out of memory")
        return not reasons, reasons

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.scheduler.stop_accepting()

    def close(self, timeout: float | None = None) -> int:
        """Finish queued/running jobs up to FLUX_SHUTDOWN_TIMEOUT, cancel the rest, stop threads."""
        self.begin_shutdown()
        cancelled = self.scheduler.drain(self.settings.shutdown_timeout if timeout is None else timeout)
        self.scheduler.shutdown()
        self.encoder.shutdown(wait=True)
        log.info("shut down", extra={"ctx": {"cancelled_jobs": cancelled}})
        return cancelled

    # --- models ----------------------------------------------------------------------------------
    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec:
        """Model a request names (None: the active one). Requests may only name the models of
        :meth:`may_serve` (others: :class:`ModelNotAllowedError`) unless FLUX_ALLOW_ANY_MODEL=1;
        ``operator`` requests (an admin's select/unload) may name any registry key."""
        if not name:
            return self._configured.get(self.active_key) or resolve_model(self.active_key)
        if name in self._configured:
            return self._configured[name]
        spec = self._public_alias(name) or self.allowed.get(name) or self._resolve_name(name, from_request)
        if from_request and not operator and not self.settings.allow_any_model and not self.may_serve(spec.key):
            raise ModelNotAllowedError(f"model {name[:80]!r} is not enabled on this server; requests may name: "
                                       f"{self._enabled_names()} (FLUX_MODELS)")
        return spec

    def _resolve_name(self, name: str, from_request: bool) -> ModelSpec:
        """The registry's answer; for requests, one message for every name that is no model here, so a
        request cannot learn whether a directory exists or what is in it."""
        try:
            return resolve_model(name, allow_unregistered=self.settings.allow_any_model or not from_request)
        except UnknownModelError:
            if not from_request:
                raise
        known = ", ".join(BUILTIN_MODELS)
        if self.settings.allow_any_model:
            message = f"not a registry key ({known}), a hub repo id (owner/name) or a local diffusers directory"
        else:
            message = f"not a registry key ({known}); requests may name {self._enabled_names()} (FLUX_MODELS)"
        raise UnknownModelError(f"model {name[:80]!r} is unknown here: {message}") from None

    def _public_alias(self, name: str) -> ModelSpec | None:
        """``local/<dir>``: how clients see (and may name) a local pipeline configured by its absolute path."""
        if name.startswith("local/"):
            for spec in (*self._configured.values(), *self.allowed.values()):
                if Path(spec.key).is_absolute() and name == f"local/{Path(spec.key).name}":
                    return spec
        return None

    def _enabled_names(self) -> str:
        return ", ".join(sorted({*self._configured, *self.allowed}))

    def may_serve(self, key: str) -> bool:
        """Whether requests may name ``key``: FLUX_MODEL, FLUX_PRELOAD_MODELS, FLUX_MODELS, and what an
        admin selected."""
        return key in self._configured or key in self.allowed

    def known_models(self) -> list[ModelSpec]:
        specs = dict(BUILTIN_MODELS)
        specs.update(self._configured)
        for engine in self.scheduler.engines:
            for key, model in engine.loaded().items():
                specs[key] = model.spec
        return list(specs.values())

    def select(self, name: str) -> ModelSpec:
        spec = self.resolve(name, operator=True)
        self.scheduler.ensure_loaded(spec, wait=True)
        self._configured.setdefault(spec.key, spec)
        self.metrics.allow_models([spec])
        self.active_key = spec.key
        return spec

    def model_info(self, key: str) -> dict[str, Any]:
        loaded = {engine.device: engine.get(key) for engine in self.scheduler.engines}
        return {k: v for k, v in loaded.items() if v is not None}

    def replicas(self, key: str) -> list[dict[str, Any]] | None:
        """Replicas serving ``key`` on Ray Serve (fluxserve.distributed.ingress); None on a single server."""
        return None

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
        for engine in self.scheduler.engines:
            for kind, value in engine.memory().items():
                if kind.endswith("_bytes"):
                    self.metrics.device_memory.labels(device=engine.device, kind=kind[:-6]).set(value)

    def submit(self, job: Job) -> Job:
        return self.scheduler.submit(job)


_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~]+){2,}[/\\]?")


def _without_paths(text: str) -> str:
    """What reaches /ready: a reason without the file paths it may quote (the log keeps them)."""
    return _PATHS.sub("<path>", text)


def _leave_a_core_for_the_server() -> None:
    """On the CPU backend torch would use every core and starve the event loop (health checks stall).
    Keep one core for the HTTP server and the encoders."""
    import os

    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
