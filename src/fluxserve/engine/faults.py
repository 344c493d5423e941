"""Test-only fault injection: make the engine fail on purpose at a chosen stage.

Enabled only with ``FLUX_FAULT_INJECTION=1``. ``FLUX_FAULTS="oom@denoise:2,nan@decode:1"`` means: the
next 2 denoise stages raise an out-of-memory error of the active backend's kind, and the next decode
returns NaN pixels. ``nan@denoise`` makes the denoiser's latents NaN (what an fp16 overflow in the
transformer looks like); ``error@<stage>`` raises a failure that is not out of memory. Tests may also
arm faults at run time through :meth:`FaultInjector.arm`. Warm-up generations run with injection
suspended (:meth:`FaultInjector.suspended`), so armed faults hit requests only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fluxserve.settings import SettingsError

STAGES = ("encode", "denoise", "decode")
KINDS = ("oom", "nan", "error")
NAN_STAGES = ("denoise", "decode")


class InjectedFault(RuntimeError):
    """A non-OOM failure raised on purpose (kind ``error``)."""


@dataclass
class _Armed:
    kind: str
    stage: str
    remaining: int


def parse_faults(spec: str) -> list[_Armed]:
    """Parse ``kind@stage[:count]`` items; a bad item raises :class:`SettingsError` naming FLUX_FAULTS."""
    armed = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, _, rest = part.partition("@")
        stage, _, count = rest.partition(":")
        if kind not in KINDS or stage not in STAGES or not (count or "1").isdigit() or int(count or "1") < 1:
            raise SettingsError(f"FLUX_FAULTS: bad fault {part!r}: expected "
                                f"<{'|'.join(KINDS)}>@<{'|'.join(STAGES)}>[:count ≥ 1]")
        if kind == "nan" and stage not in NAN_STAGES:
            raise SettingsError(f"FLUX_FAULTS: bad fault {part!r}: nan faults apply to {' or '.join(NAN_STAGES)}")
        armed.append(_Armed(kind, stage, int(count or "1")))
    return armed


def oom_error(backend: str) -> Exception:
    """An exception that looks exactly like the backend's own out-of-memory error."""
    if backend == "cuda":
        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    if backend == "mps":
        return RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, "
                            "max allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool (injected)")
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory) (injected)")


class FaultInjector:
    """Counts down armed faults; thread-safe. Inactive unless enabled."""

    def __init__(self, enabled: bool, spec: str = "") -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._armed: list[_Armed] = parse_faults(spec) if enabled and spec else []
        self._suspended = threading.local()

    def arm(self, spec: str) -> None:
        if not self.enabled:
            raise RuntimeError("fault injection is disabled (FLUX_FAULT_INJECTION=1 enables it)")
        with self._lock:
            self._armed.extend(parse_faults(spec))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def pending(self) -> int:
        """Faults still armed (sum of their counts)."""
        with self._lock:
            return sum(f.remaining for f in self._armed)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """No fault fires in this thread inside the block (warm-up runs this way)."""
        previous = getattr(self._suspended, "on", False)
        self._suspended.on = True
        try:
            yield
        finally:
            self._suspended.on = previous

    def take(self, stage: str) -> str | None:
        """Consume one armed fault for ``stage``; return its kind, or None."""
        if not self.enabled or getattr(self._suspended, "on", False):
            return None
        with self._lock:
            for fault in self._armed:
                if fault.stage == stage and fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._armed.remove(fault)
                    return fault.kind
        return None

    def raise_if_armed(self, stage: str, backend: str) -> bool:
        """Raise the armed OOM/error for ``stage``; return True if a NaN fault was armed."""
        kind = self.take(stage)
        if kind == "oom":
            raise oom_error(backend)
        if kind == "error":
            raise InjectedFault(f"injected failure at {stage}")
        return kind == "nan"
