"""The layering the README describes holds: everything above the engine loads without torch, diffusers or
transformers, and the engine loads without FastAPI. Each module is imported alone in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers")

TORCH_FREE = (
    "fluxserve.api.app",  # and through it every route, the serving layer and the middleware
    "fluxserve.models.registry",
    "fluxserve.models.handle",
    "fluxserve.models.devices",
    "fluxserve.models.sources",
    "fluxserve.scheduler.scheduler",
    "fluxserve.runtime",
    "fluxserve.catalog",
    "fluxserve.loras",
    "fluxserve.distributed.ingress",
    "fluxserve.distributed.remote_queue",
    "fluxserve.distributed.messages",
    "fluxserve.generation",
)
"""The HTTP layer, the model layer, the scheduler, the runtime and catalog, the LoRA library and the Ray ingress
(and what travels to its replicas)."""


def _loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {watched!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split()


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_layers_above_the_engine_never_import_torch(module: str) -> None:
    assert _loaded_after_import(module, HEAVY) == []


def test_the_engine_never_imports_fastapi() -> None:
    assert _loaded_after_import("fluxserve.engine.engine, fluxserve.engine.loading, fluxserve.engine.workers",
                                ("fastapi", "starlette")) == []
