"""One process-wide lock around everything that builds modules from weights.

transformers, accelerate and PEFT build modules under process-global "empty weights" patches (they swap
``nn.Module.register_parameter`` for the duration of a load). Two such loads in different threads corrupt
each other: one restores the other's patch, and from then on every module of the process is created on
the meta device ("Cannot copy out of meta tensor"). So pipeline loads, LoRA loads and the offline tiny
builds all take :data:`MODEL_BUILD_LOCK`. Generation never takes it: loading B never stops A from
generating. Re-entrant, because a load may build a tiny adapter inside it.
"""

from __future__ import annotations

import threading

MODEL_BUILD_LOCK = threading.RLock()
