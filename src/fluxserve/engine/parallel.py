"""One request split over several GPUs: ``FLUX_PARALLEL=ulysses:N|ring:N`` (diffusers' context parallelism).

diffusers 0.42 ships context parallelism for FLUX (``ModelMixin.enable_parallelism`` with a
``ContextParallelConfig``: Ulysses all-to-all over heads, or ring attention over the sequence). It needs
``torch.distributed`` with one process per rank, each on its own accelerator: ``_resolve_parallel_config``
computes ``rank % torch.accelerator.device_count()``, which on a machine without an accelerator is a
division by zero, so it does not run on CPU with gloo (probed with two gloo ranks on torch 2.13 CPU:
``ZeroDivisionError``). The configuration is therefore checked here, at start-up, against the CUDA
devices present, and refused with a message naming the setting when it cannot run. The ranks' side
(process group, agreeing cancel flags per step, enabling the split) is at the end of this module; the
processes are started by :mod:`fluxserve.engine.workers`.

How split groups and per-GPU replicas mix (docs/parallel.md): ``FLUX_DEVICES`` is cut into groups of
``N`` consecutive devices; each group is one engine to the scheduler (one slot, one batch at a time,
every rank running the same denoising step on its share of the tokens). So ``FLUX_DEVICES=cuda:0,...,
cuda:3`` with ``FLUX_PARALLEL=ulysses:2`` serves two groups of two GPUs, both taking jobs from the one
queue. Requests are not routed by size: every job of a group runs split.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("ulysses", "ring")
RING_BACKENDS = ("flash", "_native_cudnn", "_native_flash", "sage", "_flash_3_hub", "flash_hub")
"""Attention backends diffusers' ring attention can use: it needs the log-sum-exp of each block
(diffusers' ``native`` refuses: "Native attention does not support return_lse=True")."""


class ParallelConfigError(ValueError):
    """``FLUX_PARALLEL`` cannot run with these settings on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class ParallelPlan:
    """A parsed ``FLUX_PARALLEL``."""

    kind: str
    """off | ulysses | ring."""
    degree: int = 1

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def groups(self, devices: list[str]) -> list[list[str]]:
        """``devices`` cut into split groups of ``degree`` consecutive devices."""
        return [devices[i:i + self.degree] for i in range(0, len(devices), self.degree)]


def parse_parallel(value: str) -> ParallelPlan:
    """``off`` or ``ulysses:N`` / ``ring:N`` with N ≥ 2."""
    text = value.strip().lower()
    if text in ("", "off", "none", "0", "false", "1"):
        return ParallelPlan("off")
    kind, _, degree_text = text.partition(":")
    if kind not in KINDS:
        raise ParallelConfigError(f"FLUX_PARALLEL={value!r}: must be off, ulysses:<gpus> or ring:<gpus>")
    try:
        degree = int(degree_text)
    except ValueError:
        raise ParallelConfigError(f"FLUX_PARALLEL={value!r}: the number of GPUs after ':' must be an integer "
                                  "(e.g. ulysses:2)") from None
    if degree < 2:
        raise ParallelConfigError(f"FLUX_PARALLEL={value!r}: splitting needs at least 2 GPUs; use off for one")
    return ParallelPlan(kind, degree)


def check_parallel(value: str, devices: list[str], cuda_devices: int, *, worker_processes: bool,
                   attention_backend: str | None) -> ParallelPlan:
    """Parse ``FLUX_PARALLEL`` and refuse what cannot run: fewer CUDA devices than the split needs,
    devices that are not CUDA, a device list that does not cut into whole groups, ring attention with
    an attention backend that cannot return the log-sum-exp, and the one-process mode (every rank is its
    own process: FLUX_WORKER_PROCESSES=1)."""
    plan = parse_parallel(value)
    if not plan.enabled:
        return plan
    setting = f"FLUX_PARALLEL={value}"
    if cuda_devices < plan.degree:
        found = "no CUDA device" if cuda_devices == 0 else f"{cuda_devices} CUDA device(s)"
        raise ParallelConfigError(
            f"{setting} splits each request over {plan.degree} CUDA GPUs, and this machine has {found} "
            "(diffusers' context parallelism needs one CUDA device per rank; it does not run on CPU). "
            "Unset FLUX_PARALLEL (or set it to off).")
    not_cuda = [d for d in devices if not d.startswith("cuda")]
    if not devices or not_cuda:
        raise ParallelConfigError(
            f"{setting} needs FLUX_DEVICES to list the CUDA GPUs to split over (e.g. "
            f"{','.join(f'cuda:{i}' for i in range(plan.degree))}); got {','.join(devices) or 'none'}.")
    if len(devices) % plan.degree:
        raise ParallelConfigError(
            f"{setting}: FLUX_DEVICES lists {len(devices)} devices, which do not cut into groups of "
            f"{plan.degree}; list a multiple of {plan.degree}.")
    if len(set(devices)) != len(devices):
        raise ParallelConfigError(f"{setting}: FLUX_DEVICES lists a GPU twice; each rank needs its own GPU.")
    if not worker_processes:
        raise ParallelConfigError(f"{setting} runs one process per GPU: set FLUX_WORKER_PROCESSES=1 too.")
    if plan.kind == "ring" and (attention_backend or "native") not in RING_BACKENDS:
        raise ParallelConfigError(
            f"{setting}: ring attention needs an attention kernel that returns the log-sum-exp, and "
            f"FLUX_ATTENTION_BACKEND={attention_backend or 'native (the default)'} does not; set "
            f"FLUX_ATTENTION_BACKEND to one of {', '.join(RING_BACKENDS[:4])}, or use ulysses:{plan.degree}.")
    return plan


# --- the ranks of a split group (inside the worker processes; torch from here on) -------------------
_active: ParallelPlan | None = None
"""The split this process is a rank of (set by :func:`join_group`); None outside split groups."""


def active_plan() -> ParallelPlan | None:
    return _active


def join_group(plan: ParallelPlan, rank: int, world: int, device: str, port: int) -> None:
    """Join the group's process group (NCCL on CUDA, gloo otherwise), with a short collective timeout so
    that a rank left alone in a collective fails instead of hanging for NCCL's default 10 minutes."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    global _active
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    options: dict[str, object] = {"timeout": datetime.timedelta(seconds=GROUP_TIMEOUT_S)}
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
        options["device_id"] = torch.device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, **options)  # type: ignore[arg-type]
    _active = plan


GROUP_TIMEOUT_S = 120
"""Seconds a rank waits in one collective before it fails (and the group is restarted)."""


def enable_context_parallel(transformer: object) -> str:
    """``transformer.enable_parallelism`` with this process's split; returns the mode's name."""
    from diffusers import ContextParallelConfig

    plan = _active
    assert plan is not None and plan.enabled
    degree = {"ulysses_degree": plan.degree} if plan.kind == "ulysses" else {"ring_degree": plan.degree}
    transformer.enable_parallelism(config=ContextParallelConfig(**degree))  # type: ignore[attr-defined]
    return f"context_parallel_{plan.kind}{plan.degree}"


def agree_flags(flags: list[bool], device: str) -> list[bool]:
    """Every rank gets rank 0's cancel flags (one broadcast per denoising step), so all interrupt at the
    same step: a rank that stopped alone would leave the others waiting in the next all-to-all."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32,
                          device=device if device.startswith("cuda") else "cpu")
    dist.broadcast(tensor, src=0)
    return [bool(v) for v in tensor.tolist()]
