"""Speed optimizations applied to a loaded pipeline (FLUX_COMPILE, FLUX_QUANTIZE, ...).

Placeholder kept deliberately small until the performance work lands: returns the list of
optimizations applied so far (none).
"""

from __future__ import annotations

from typing import Any

from fluxserve.engine.device import DevicePlan
from fluxserve.settings import Settings


def apply_optimizations(pipe: Any, settings: Settings, plan: DevicePlan) -> list[str]:
    return []
