"""Family runners: one module per family, behind the contract in :mod:`fluxserve.engine.families.base`.

A family is declared in the model layer (:mod:`fluxserve.models.families`, registered in
:mod:`fluxserve.models.registry`); its descriptor names its runner here by import path, and
:func:`runner_for` imports it on first use. So this package imports no family module at import time, and the
model layer never imports the engine. Adding a family is a descriptor, a runner and one registry line (see
``docs/families.md``).
"""

from __future__ import annotations

import importlib
import threading

from fluxserve.engine.families.base import (
    DenoiseArgs,
    FamilyRunner,
    PromptEmbedding,
    to_uint8,
)
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.registry import family_descriptor

_runners: dict[str, FamilyRunner] = {}
_lock = threading.Lock()


def runner_for(family: str | FamilyDescriptor) -> FamilyRunner:
    """The runner of ``family`` (a name or a descriptor), one instance per family: it caches the edit pipelines
    it makes per loaded pipeline. Raises ``UnknownFamilyError`` for a family that is not registered."""
    descriptor = family if isinstance(family, FamilyDescriptor) else family_descriptor(family)
    with _lock:
        runner = _runners.get(descriptor.name)
        if runner is None or runner.descriptor is not descriptor:
            module_name, _, class_name = descriptor.runner.partition(":")
            runner_class = getattr(importlib.import_module(module_name), class_name)
            runner = runner_class()
            if not isinstance(runner, FamilyRunner) or runner.descriptor is not descriptor:
                raise TypeError(f"{descriptor.runner} is not the runner of the {descriptor.name} family")
            _runners[descriptor.name] = runner
    return runner


__all__ = ["DenoiseArgs", "FamilyRunner", "PromptEmbedding", "runner_for", "to_uint8"]
