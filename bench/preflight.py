"""Fail fast, before a GPU benchmark spends minutes building a model: import everything ``fluxserve serve``,
``fluxserve bench`` and the official ``openai`` client need, the way their subprocesses will, and print
the versions found. A missing package is named with the import that needs it; exit status 1.

    PYTHONPATH=src python3 bench/preflight.py

(Two GPU runs of 2026-12-01 lost their HTTP rows to packages missing from the machine's environment —
FastAPI's ``opentelemetry-api``, the openai client's ``httpx2`` — found only after the model build.)
"""

from __future__ import annotations

import importlib
import sys

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "fastapi", "starlette",
            "uvicorn", "h11", "pydantic", "pydantic_settings", "python_multipart", "prometheus_client", "psutil",
            "isal", "PIL", "numpy", "openai")
CHAINS = ("fluxserve.server", "fluxserve.api.app", "fluxserve.engine.engine", "fluxbench.serving")
"""What ``fluxserve serve`` and ``fluxserve bench`` import, with everything those import in turn."""
OPTIONAL = ("torchao", "cache_dit", "flash_attn_interface")
"""What the bench's peer paths use where installed (recipe-fp8, cache-dit, FlashAttention-3); without them
those rows are skipped with the reason, so their absence is reported, not an error."""


def main() -> int:
    problems: list[str] = []
    versions: dict[str, str] = {}
    for name in (*PACKAGES, *CHAINS):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # an ImportError deep in a chain names the missing package
            problems.append(f"import {name}: {type(exc).__name__}: {exc}")
            continue
        if name in PACKAGES:
            versions[name] = str(getattr(module, "__version__", getattr(module, "VERSION", "?")))
    if not problems:
        import openai

        openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="preflight", max_retries=0)  # builds its HTTP stack
    print(" ".join(f"{k}={v}" for k, v in versions.items()))
    optional = []
    for name in OPTIONAL:
        try:
            module = importlib.import_module(name)
            optional.append(f"{name}={getattr(module, '__version__', '?')}")
        except Exception as exc:  # reported, not fatal: the bench skips the rows that need it
            optional.append(f"{name}=missing ({type(exc).__name__})")
    print("optional, for the bench's peer rows:", " ".join(optional))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
