"""The models resident on one device: the model table and the per-model load locks.

Lock order (never reversed, never two model locks at once):
  1. ``ModelStore._guard`` — a short lock around the model table and the per-model lock table;
  2. the per-model load lock of one model — held only while that model loads, waited on with
     ``FLUX_MODEL_LOCK_TIMEOUT``. Generation never takes it: a loaded model generates while another
     model loads.
The scheduler may hold its own lock while it calls :meth:`ModelStore.get` (only ``_guard`` is taken).
"""

from __future__ import annotations

import logging
import threading

from fluxserve.engine.loading import LoadedModel, load_model
from fluxserve.engine.memory import empty_cache, in_use_bytes
from fluxserve.generation import ModelLockTimeout
from fluxserve.models.devices import DevicePlan
from fluxserve.models.spec import ModelSpec
from fluxserve.settings import Settings

log = logging.getLogger(__name__)


class ModelStore:
    """Load, look up, unload and release the models of one device."""

    def __init__(self, settings: Settings, plan: DevicePlan) -> None:
        self.settings = settings
        self.plan = plan
        self._guard = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}

    def loaded(self) -> dict[str, LoadedModel]:
        with self._guard:
            return dict(self._models)

    def get(self, key: str) -> LoadedModel | None:
        with self._guard:
            return self._models.get(key)

    def load(self, spec: ModelSpec) -> tuple[LoadedModel, bool]:
        """Load ``spec`` unless already loaded; returns (model, loaded_now). One load per model at a time."""
        with self._guard:
            model = self._models.get(spec.key)
            if model is not None:
                return model, False
            lock = self._load_locks.setdefault(spec.key, threading.Lock())
        if not lock.acquire(timeout=self.settings.model_lock_timeout):
            raise ModelLockTimeout(
                f"timed out after {self.settings.model_lock_timeout:.0f}s waiting for {spec.key} to load "
                "(FLUX_MODEL_LOCK_TIMEOUT)"
            )
        try:
            with self._guard:
                model = self._models.get(spec.key)
            if model is not None:  # somebody else loaded it while we waited
                return model, False
            before = in_use_bytes(self.plan.device)
            model = load_model(spec, self.plan, self.settings, views=self.settings.max_concurrent)
            log.info("model loaded", extra={"ctx": {
                "model": spec.key, "device": self.plan.device, "seconds": round(model.load_seconds, 3),
                "pipeline": model.pipeline_class, "modes": model.modes,
                "memory_delta_bytes": in_use_bytes(self.plan.device) - before}})
            with self._guard:
                self._models[spec.key] = model
            return model, True
        finally:
            lock.release()

    def unload(self, key: str) -> bool:
        with self._guard:
            model = self._models.pop(key, None)
        if model is None:
            return False
        model.prompt_cache.clear()
        del model
        empty_cache(self.plan.backend)
        return True

    def release(self, keep: set[str]) -> list[str]:
        """Drop every loaded model not in ``keep``; free caches. Returns the keys dropped."""
        dropped = [k for k in self.loaded() if k not in keep]
        for key in dropped:
            self.unload(key)
        for model in self.loaded().values():
            model.prompt_cache.clear()
        empty_cache(self.plan.backend)
        return dropped
