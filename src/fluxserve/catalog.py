"""Model catalogs: which models a request may name, where they are loaded, and how they load.

* :class:`ModelNames` — the rules for names (configured models, the active model, registry keys, and
  FLUX_ALLOW_ANY_MODEL), shared by every catalog.
* :class:`LocalCatalog` — models on this process's engines: start-up loading and warm-up, select,
  unload, release, memory, readiness. The Ray Serve ingress has its own catalog over its replicas
  (:mod:`fluxserve.distributed.ingress`); both satisfy :class:`fluxserve.scheduler.protocols.ModelCatalog`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxserve.generation import GenerationParams, ImageRequest, OutOfMemory
from fluxserve.models.aliases import parse_model_aliases
from fluxserve.models.devices import DevicePlan, in_use_of
from fluxserve.models.handle import ModelHandle
from fluxserve.models.registry import BUILTIN_MODELS, ModelNotAllowedError, UnknownModelError, resolve_model
from fluxserve.models.spec import ModelSpec
from fluxserve.observability.metrics import Metrics
from fluxserve.scheduler.jobs import JobError
from fluxserve.scheduler.scheduler import Scheduler
from fluxserve.settings import Settings

log = logging.getLogger(__name__)


class ModelNames:
    """The models a server knows by name: the default, the preloaded ones, and the active one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_spec = resolve_model(settings.model)
        self.configured: dict[str, ModelSpec] = {self.default_spec.key: self.default_spec}
        for name in settings.preload_models:
            spec = resolve_model(name)
            self.configured[spec.key] = spec
        self.active_key = self.default_spec.key
        self.allowed: dict[str, ModelSpec] = {spec.key: spec for spec in map(resolve_model, settings.models)}
        self.aliases = parse_model_aliases(settings.model_aliases)
        for target in filter(None, self.aliases.values()):  # a bad alias target stops start-up
            resolve_model(target)

    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec:
        """Model a request names (None: the active one). Requests may only name the models of
        :meth:`may_serve` (others: :class:`ModelNotAllowedError`) unless FLUX_ALLOW_ANY_MODEL=1;
        ``operator`` requests (an admin's select/unload) may name any registry key. An alias
        (FLUX_MODEL_ALIASES) names the model the operator chose for it; a bare one the active model."""
        if name and name.strip() in self.aliases:
            name, from_request = self.aliases[name.strip()], False
        if not name:
            return self.configured.get(self.active_key) or resolve_model(self.active_key)
        if name in self.configured:
            return self.configured[name]
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
            for spec in (*self.configured.values(), *self.allowed.values()):
                if Path(spec.key).is_absolute() and name == f"local/{Path(spec.key).name}":
                    return spec
        return None

    def _enabled_names(self) -> str:
        return ", ".join(sorted({*self.configured, *self.allowed}))

    def may_serve(self, key: str) -> bool:
        """Whether requests may name ``key``: FLUX_MODEL, FLUX_PRELOAD_MODELS, FLUX_MODELS, and what an
        admin selected."""
        return key in self.configured or key in self.allowed

    def activate(self, spec: ModelSpec) -> None:
        self.configured.setdefault(spec.key, spec)
        self.active_key = spec.key


@dataclass
class WarmupRecord:
    model: str
    size: str
    seconds: float
    outcome: str
    text_length: int
    """The ``max_sequence_length`` warmed up (part of a compiled transformer's shape)."""


def warmup_text_lengths(spec: ModelSpec, configured: Sequence[str]) -> tuple[list[int], list[int]]:
    """(lengths to warm up, lengths refused): FLUX_WARMUP_TEXT_LENGTHS within the model's limit, or its default
    length when none is set or none fits."""
    lengths = [int(value) for value in configured]
    fitting = [n for n in lengths if n <= spec.max_sequence_length_limit]
    return fitting or [spec.max_sequence_length], [n for n in lengths if n > spec.max_sequence_length_limit]


class LocalCatalog:
    """The models of this process's engines."""

    def __init__(self, settings: Settings, plans: list[DevicePlan], engines: Sequence[Any], scheduler: Scheduler,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.plans = plans
        self.engines = list(engines)
        self.scheduler = scheduler
        self.metrics = metrics
        self.names = ModelNames(settings)
        self.warmups: list[WarmupRecord] = []
        self.startup_error: str | None = None
        self._startup_done = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load (and warm up) the configured models in the background; /ready waits for it."""
        threading.Thread(target=self._startup, name="startup", daemon=True).start()

    def _startup(self) -> None:
        try:
            for spec in self.names.configured.values():
                self.scheduler.ensure_loaded(spec, wait=True)
                if self.settings.warmup_enable:
                    self.warmup(spec)
        except JobError as exc:
            self.startup_error = exc.message
            log.error("start-up failed: %s", exc.message)
        except Exception as exc:  # keep serving /health and explain in /ready
            self.startup_error = f"unexpected {type(exc).__name__} (see the server log)"
            log.exception("start-up failed")
        finally:
            self._startup_done.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._startup_done.wait(timeout)

    def close(self) -> None:
        """In-process engines' memory goes with the process; worker processes are stopped."""
        for engine in self.engines:
            close = getattr(engine, "close", None)
            if close is not None:
                close()

    def readiness_problems(self) -> list[str]:
        """Start-up gates readiness (load and warm-up). Afterwards a model that is not resident is no reason:
        an admin who unloads or releases the served model asked for its memory back, and the next request
        that needs it loads it, so a ready-only load balancer never strands the server (docs/reliability.md)."""
        if self.startup_error:
            return [f"start-up failed: {without_paths(self.startup_error)}"]
        if not self._startup_done.is_set():
            return ["loading and warming up the default model"]
        return []

    def warmup(self, spec: ModelSpec) -> None:
        """One 1-step generation per engine, warmup size and warmup text length; logs duration and outcome.
        Each engine's model is held as a batch holds it: an unload waits for its warm-up."""
        sizes = self.settings.warmup_sizes or [f"{spec.width}x{spec.height}"]
        lengths, too_long = warmup_text_lengths(spec, self.settings.warmup_text_lengths)
        if too_long:
            log.warning("warmup text lengths above the model's limit are not warmed up (requests cannot use them)",
                        extra={"ctx": {"model": spec.key, "lengths": too_long,
                                       "limit": spec.max_sequence_length_limit}})
        for index, model in self.scheduler.holding(spec.key):
            engine = self.engines[index]
            for size in sizes:
                width, height = (int(x) for x in size.split("x"))
                for length in lengths:
                    self._warm_one(engine, model, spec, width, height, length)

    def _warm_one(self, engine: Any, model: Any, spec: ModelSpec, width: int, height: int, length: int) -> None:
        # The text length is part of a compiled transformer's shape: the one real requests use.
        params = GenerationParams(spec.key, width, height, 1, spec.guidance, length)
        size = f"{width}x{height}"
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
        self.warmups.append(WarmupRecord(spec.key, size, seconds, outcome, length))
        self.metrics.warmup.labels(model=self.metrics.model_label(spec.key)).set(seconds)
        key = size if length == spec.max_sequence_length else f"{size}, {length} tokens"
        model.warmup[key] = {"seconds": round(seconds, 4), "outcome": outcome, "text_length": length}
        log.info("warmup", extra={"ctx": {"model": spec.key, "device": engine.device, "size": size,
                                           "text_length": length, "seconds": round(seconds, 4),
                                           "outcome": outcome, **({"fallback_reason": fallback} if fallback else {})}})

    # --- models ----------------------------------------------------------------------------------
    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec:
        return self.names.resolve(name, from_request=from_request, operator=operator)

    def known_models(self) -> list[ModelSpec]:
        specs = dict(BUILTIN_MODELS)
        specs.update(self.names.configured)
        for engine in self.engines:
            for key, model in engine.loaded().items():
                specs[key] = model.spec
        return list(specs.values())

    def select(self, name: str) -> ModelSpec:
        """Make ``name`` the default for requests that name none, loading it first (blocking)."""
        spec = self.resolve(name, operator=True)
        self.scheduler.ensure_loaded(spec, wait=True)
        self.names.activate(spec)
        return spec

    def model_info(self, key: str) -> dict[str, ModelHandle]:
        loaded = {engine.device: engine.get(key) for engine in self.engines}
        return {device: model for device, model in loaded.items() if model is not None}

    def replicas(self, key: str) -> list[dict[str, Any]] | None:
        return None  # one process: no replicas

    def memory(self) -> list[dict[str, Any]]:
        """Memory per device, for /v1/models, /v1/memory/release and the gauges."""
        return [engine.memory() for engine in self.engines]

    def unload(self, key: str) -> tuple[list[str], int]:
        """Drop ``key`` everywhere once no batch uses it (blocking: call off the event loop). (devices, bytes
        freed, counted after the batches that used it ended). Queued jobs for it load it again."""
        with self.scheduler.retiring(key=key):
            before = self._in_use()
            devices = [engine.device for engine in self.engines if engine.unload(key)]
            return devices, max(0, before - self._in_use())

    def release(self, keep: set[str]) -> tuple[list[str], int]:
        """Drop every model not in ``keep`` once no batch uses it, and free caches (blocking). (models
        dropped, bytes freed). Queued jobs for a dropped model load it again."""
        with self.scheduler.retiring(keep=keep):
            before = self._in_use()
            dropped = sorted({key for engine in self.engines for key in engine.release(keep)})
            return dropped, max(0, before - self._in_use())

    def _in_use(self) -> int:
        """Bytes in use, counted once per device (``cpu,cpu`` engines share one process RSS)."""
        first = {engine.device: engine for engine in reversed(self.engines)}
        return sum(in_use_of(engine.memory()) for engine in first.values())


_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~]+){2,}[/\\]?")


def without_paths(text: str) -> str:
    """What reaches /ready: a reason without the file paths it may quote (the log keeps them)."""
    return _PATHS.sub("<path>", text)
