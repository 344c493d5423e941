"""A loaded model as every layer above the engine sees it, wherever it runs.

Three things implement :class:`ModelHandle`: the in-process model (``fluxserve.engine.loading.LoadedModel``),
the parent's view of a model in a worker process (``fluxserve.engine.workers.RemoteModel``) and the ingress's
view of a model on a Ray Serve replica (``fluxserve.distributed.ingress.RemoteModel``). The engines return
handles (``Engine.get/loaded/load``), the catalogs hand them to the routes (``model_info``), and the routes read
only what is declared here: no ``Any``, no ``hasattr``.

The methods may cross a process boundary (a pipe to the worker, a Ray call to a replica): call them off the
event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.devices import DevicePlan
from fluxserve.models.spec import ModelSpec

if TYPE_CHECKING:
    from fluxserve.loras import LoraInfo

WarmupRuns = dict[str, dict[str, Any]]
"""Warm-up size (``"64x64"``) → ``{"seconds": float, "outcome": str}``."""


@dataclass(frozen=True)
class PromptCacheStats:
    """The prompt-embedding cache of one loaded model."""

    hits: int
    misses: int
    capacity: int


class LoraControl(Protocol):
    """The LoRA adapters held by one loaded model."""

    def loaded_names(self) -> list[str]:
        """Adapters loaded on the model now (active or kept for later)."""
        ...

    def preload(self, info: LoraInfo) -> float:
        """Load ``info`` now; the seconds it took (0 when already loaded). Raises ``AdapterError``."""
        ...

    def unload(self, name: str) -> bool:
        """Drop ``name`` from the model; False when it was not loaded."""
        ...


class ModelHandle(Protocol):
    """One model loaded somewhere: on a device of this process, in a worker process, or on a Ray replica."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def descriptor(self) -> FamilyDescriptor:
        """Its family, as declared (guidance parameter, tokenizers, edit modes, ...)."""
        ...

    @property
    def plan(self) -> DevicePlan:
        """Where it runs (a split group: its first device's plan)."""
        ...

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device that holds its weights (several for a split group)."""
        ...

    @property
    def modes(self) -> Sequence[str]:
        """Memory modes and optimizations applied at load (``offload_model``, ``compile_regional``, ...)."""
        ...

    @property
    def load_seconds(self) -> float: ...

    @property
    def loaded_at(self) -> float:
        """Monotonic time the load finished in this process (0 where unknown: a Ray replica's)."""
        ...

    @property
    def warmup(self) -> WarmupRuns:
        """Warm-up runs by size; the catalog records them here."""
        ...

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        """Its prompt cache's figures; None where they are not known here (a Ray replica's own)."""
        ...

    def token_count(self, prompt: str) -> dict[str, int]:
        """Tokens ``prompt`` takes in each tokenizer of the model (``descriptor.tokenizers``)."""
        ...

    @property
    def loras(self) -> LoraControl | None:
        """Its adapters; None where adapters cannot be loaded on it from here (see :attr:`loras_unavailable`)."""
        ...

    @property
    def loras_unavailable(self) -> str | None:
        """Why :attr:`loras` is None, for the client."""
        ...
