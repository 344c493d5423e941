"""The durable layer is light: the job store, the result store and webhook delivery load without torch,
FastAPI or the optional database and object-store drivers (those load only when configured)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "fastapi", "psycopg", "psycopg_pool", "boto3")


def test_the_durable_layer_loads_without_the_engine_the_http_layer_or_optional_drivers() -> None:
    modules = "fluxserve.storage.jobstore.sqlite, fluxserve.storage.results.local, fluxserve.webhooks.delivery"
    code = (f"import sys, {modules}; from fluxserve.storage.jobstore import open_job_store; "
            f"from fluxserve.storage.results import open_result_store; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == []
