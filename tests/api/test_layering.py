"""The layering the README describes holds: the HTTP layer and the scheduler load without the engine."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers")


def _modules_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split()


def test_the_http_layer_never_imports_torch() -> None:
    assert _modules_after_import("fluxserve.api.app") == []


def test_the_scheduler_and_the_shared_types_never_import_torch() -> None:
    assert _modules_after_import("fluxserve.scheduler.scheduler") == []
    assert _modules_after_import("fluxserve.generation") == []


def test_the_engine_never_imports_fastapi() -> None:
    code = "import sys, fluxserve.engine.engine, fluxserve.engine.loading; print('fastapi' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
