"""The small protocols that connect the layers (no torch, no FastAPI).

* :class:`Engine` — what the scheduler needs of one device's engine. ``fluxserve.engine.DeviceEngine``
  is the real one; tests drive a fake engine whose steps they control.
* :class:`JobQueue` — what the HTTP layer needs of whatever runs jobs: the local :class:`Scheduler`
  or the Ray Serve ingress's remote dispatcher.
* :class:`ModelCatalog` — what the HTTP layer needs to know about models: which a request may name,
  which are loaded where, and how to load, unload and release them.

Scale-out plugs in by providing another ``JobQueue``/``ModelCatalog``, never by subclassing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fluxserve.generation import GenerationParams, ImageRequest, ImageResult
from fluxserve.models.devices import DevicePlan
from fluxserve.models.handle import ModelHandle
from fluxserve.models.spec import ModelSpec
from fluxserve.scheduler.jobs import Job
from fluxserve.scheduler.table import JobTable


class Engine(Protocol):
    @property
    def device(self) -> str: ...

    @property
    def consecutive_oom_failures(self) -> int: ...

    def get(self, key: str) -> ModelHandle | None: ...

    def loaded(self) -> Mapping[str, ModelHandle]: ...

    def load(self, spec: ModelSpec) -> tuple[ModelHandle, bool]:
        """Load unless loaded; (model, loaded_now). Raises ModelLoadError / ModelLockTimeout."""
        ...

    def unload(self, key: str) -> bool: ...

    def release(self, keep: set[str]) -> list[str]:
        """Drop every loaded model not in ``keep`` and free caches; returns the keys dropped."""
        ...

    def generate(self, model: ModelHandle, params: GenerationParams,
                 requests: list[ImageRequest]) -> list[ImageResult]:
        """One batch. Raises GenerationCancelled, OutOfMemory, BadOutput, or anything else (a bug)."""
        ...


class JobQueue(Protocol):
    table: JobTable

    @property
    def accepting(self) -> bool: ...

    def start(self) -> None: ...

    def submit(self, job: Job) -> Job:
        """Queue ``job`` or raise JobError (429 queue_full, 503 shutting_down / model_unavailable)."""
        ...

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a live job; None when unknown or already over."""
        ...

    def stats(self) -> dict[str, Any]: ...

    @property
    def consecutive_oom_failures(self) -> int: ...

    def readiness_problems(self) -> list[str]:
        """Why this queue cannot serve now (dead or stalled workers...); empty when it can."""
        ...

    def stop_accepting(self) -> None: ...

    def drain(self, timeout: float) -> int: ...

    def shutdown(self) -> None: ...


class ModelCatalog(Protocol):
    """What a runtime serves: names, where models are loaded, loading and memory, readiness."""

    names: Any
    """A :class:`fluxserve.catalog.ModelNames` (the default, configured and active models)."""

    @property
    def plans(self) -> Sequence[DevicePlan]:
        """The device plans of the devices (or replicas) serving."""
        ...

    def start(self) -> None: ...

    def wait_started(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...

    def readiness_problems(self) -> list[str]: ...

    def resolve(self, name: str | None, *, from_request: bool = True, operator: bool = False) -> ModelSpec: ...

    def known_models(self) -> Sequence[ModelSpec]: ...

    def select(self, name: str) -> ModelSpec: ...

    def model_info(self, key: str) -> dict[str, ModelHandle]:
        """Where ``key`` is loaded: device or replica → the loaded model."""
        ...

    def replicas(self, key: str) -> list[dict[str, Any]] | None: ...

    def memory(self) -> list[dict[str, Any]]: ...

    def unload(self, key: str) -> tuple[list[str], int]: ...

    def release(self, keep: set[str]) -> tuple[list[str], int]: ...
