"""Out-of-memory recovery: the ladder of FLUX_OOM_POLICY, and the NaN/black-output checks.

One :class:`Attempt` follows a batch through its retries and becomes its fallback story ("cuda_oom:
retried at 768x768 after cache cleanup and VAE tiling/slicing"). :class:`OomLadder` applies the rungs in
the configured order, each at most once (downscale up to :data:`MAX_DOWNSCALES` times), and undoes what
they turned on. Modules every pipeline view shares are changed only where no other view can see it: the
VAE's temporary modes around this batch's own decode under the model's shared lock, attention slicing
and CPU offload only with one view. Steps are never changed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxserve.engine.families import FamilyRunner
from fluxserve.engine.loading import LoadedModel, PipelineView
from fluxserve.engine.memory import apply_attention_slicing, empty_cache
from fluxserve.generation import BadOutput, GenerationParams
from fluxserve.models.devices import DevicePlan
from fluxserve.settings import Settings

log = logging.getLogger(__name__)

MAX_DOWNSCALES = 2
"""The downscale rung lowers the size by a quarter per side at most this many times (1024 → 768 → 576)."""
DOWNSCALE_FACTOR = 0.75



class RetryInFloat32(Exception):
    """Internal: half precision produced NaN/black images; run the whole generation again in float32."""


@dataclass
class Attempt:
    """One batch's way through the OOM ladder and the NaN checks; becomes the fallback story."""

    params: GenerationParams
    actions: list[str] = field(default_factory=list)
    """Recovery steps taken for out-of-memory, in order (cache cleanup, VAE tiling and slicing, ...)."""
    notes: list[str] = field(default_factory=list)
    """Recovery from NaN/black output."""
    temporary_modes: list[str] = field(default_factory=list)
    vae_modes: list[str] = field(default_factory=list)
    """VAE tiling/slicing this batch decodes with (applied and undone around its decode, under the lock)."""
    offloaded: bool = False
    in_float32: bool = False
    float32_restore: dict[str, torch.dtype] = field(default_factory=dict)
    """Components moved to float32 for the NaN retry, with the dtype to restore."""
    ooms: int = 0
    downscales: int = 0
    downscale_refused: bool = False
    kind: str | None = None
    """What went wrong first: cuda_oom, mps_oom, cpu_oom or nan_output."""

    @property
    def reasons(self) -> list[str]:
        return self.actions + self.notes

    def fallback_reason(self, original: GenerationParams) -> str | None:
        """e.g. ``cuda_oom: retried at 768x768 after cache cleanup, VAE tiling and slicing``."""
        parts = []
        if self.ooms:
            resized = (self.params.width, self.params.height) != (original.width, original.height)
            steps = [a for a in self.actions if not a.startswith("downscale")]
            parts.append("retried" + (f" at {self.params.width}x{self.params.height}" if resized else "")
                         + (f" after {and_join(steps)}" if steps else ""))
        parts += self.notes
        if not parts:
            return None
        return f"{self.kind}: " + "; ".join(parts)

    def failure_reason(self, kind: str) -> str:
        """Why the ladder gave up, e.g. ``cpu_oom: still out of memory after cache cleanup, ...``."""
        tried = and_join(self.actions) if self.actions else "nothing (no rung of FLUX_OOM_POLICY applied)"
        text = f"{kind}: still out of memory at {self.params.width}x{self.params.height} after {tried}"
        if self.downscale_refused:
            text += "; a lower resolution was not allowed (allow_fallback=false)"
        return text


def and_join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class OomLadder:
    """The recovery steps of one device's engine."""

    def __init__(self, settings: Settings, plan: DevicePlan) -> None:
        self.settings = settings
        self.plan = plan
        self.oom_events: deque[str] = deque(maxlen=256)
        """The latest out-of-memory kinds seen (bounded: a long-running server must not grow it)."""

    def record_oom(self, model: LoadedModel, attempt: Attempt, kind: str) -> None:
        self.oom_events.append(kind)
        attempt.kind = attempt.kind or kind
        attempt.ooms += 1
        log.warning("out of memory", extra={"ctx": {"model": model.spec.key, "kind": kind, "attempt": attempt.ooms,
                                                     "params": attempt.params.__dict__}})
        # A full collection on the batch's first OOM; later retries only made young garbage.
        empty_cache(self.plan.backend, full_gc=attempt.ooms == 1)

    def next_rung(self, model: LoadedModel, view: PipelineView, attempt: Attempt, rungs: list[str]) -> bool:
        """Apply the next rung that changes something; False when none is left."""
        while rungs:
            rung = rungs.pop(0)
            try:
                applied = self._apply_rung(rung, model, view, attempt)
            except Exception:  # a rung that cannot be applied is skipped, never the end of the worker
                log.exception("OOM recovery step %s could not be applied", rung)
                empty_cache(self.plan.backend)
                applied = False
            if applied:
                if rung == "downscale" and attempt.downscales < MAX_DOWNSCALES:
                    rungs.insert(0, "downscale")  # may shrink once more if this size fails too
                return True
        return False

    def _apply_rung(self, rung: str, model: LoadedModel, view: PipelineView, attempt: Attempt) -> bool:
        pipe = view.pipeline
        if rung == "clear_cache":  # the cache was emptied when the OOM was recorded; retry as asked
            attempt.actions.append("cache cleanup")
            return True
        if rung == "slicing":
            # VAE modes are applied around this batch's decode only, under the model's shared lock (see _decode).
            vae = getattr(pipe, "vae", None)
            applied = [mode for mode, attr in (("vae_tiling", "use_tiling"), ("vae_slicing", "use_slicing"))
                       if vae is not None and hasattr(vae, "enable_" + mode[4:]) and not getattr(vae, attr, False)
                       and mode not in attempt.vae_modes]
            attempt.vae_modes += applied
            # Attention slicing swaps the processors of the transformer all views share: only with one view.
            if (self.settings.attention_slicing == "off" and self.settings.max_concurrent == 1
                    and apply_attention_slicing(pipe, "auto")):
                attempt.temporary_modes.append("attention_slicing")
                applied.append("attention_slicing")
            if not applied:
                return False  # everything was on already: no retry spent on it
            vae_modes = [m.removeprefix("vae_") for m in sorted(applied, reverse=True) if m.startswith("vae_")]
            described = ["VAE " + "/".join(vae_modes)] if vae_modes else []
            if "attention_slicing" in applied:
                described.append("attention slicing")
            attempt.actions.append(" + ".join(described))  # e.g. "VAE tiling/slicing + attention slicing"
            return True
        if rung == "offload":
            # Offload helps only where weights can leave a CUDA device; with several concurrent views it would
            # move shared modules under another generation's feet.
            if self.plan.backend != "cuda" or self.settings.offload != "none" or self.settings.max_concurrent > 1:
                return False
            attempt.offloaded = True
            pipe.enable_model_cpu_offload(device=self.plan.device)
            attempt.actions.append("model CPU offload")
            return True
        if rung == "downscale":
            if not attempt.params.allow_fallback:
                attempt.downscale_refused = True
                return False
            multiple = model.spec.size_multiple
            smaller = attempt.params.scaled(DOWNSCALE_FACTOR, multiple, max(self.settings.min_size, multiple))
            if smaller is None:
                return False
            attempt.params = smaller
            attempt.downscales += 1
            attempt.actions.append(f"downscale to {smaller.width}x{smaller.height}")
            return True
        return False

    def to_float32(self, view: PipelineView, attempt: Attempt) -> None:
        """Move every component to float32 for one more try (undone in :meth:`undo_temporary`)."""
        for name, module in view.pipeline.components.items():
            if isinstance(module, torch.nn.Module):
                dtype = next((p.dtype for p in module.parameters()), torch.float32)
                if dtype != torch.float32:
                    attempt.float32_restore[name] = dtype
                    module.to(torch.float32)
        attempt.in_float32 = True
        attempt.kind = attempt.kind or "nan_output"
        attempt.notes.append(f"retried in float32 after NaN/black output in {self.plan.dtype}")

    def undo_temporary(self, model: LoadedModel, view: PipelineView, attempt: Attempt) -> None:
        """Turn off what the ladder turned on; never raises (the batch's outcome is already decided)."""
        pipe = view.pipeline
        try:
            if "attention_slicing" in attempt.temporary_modes:
                pipe.disable_attention_slicing()
            for name, dtype in attempt.float32_restore.items():
                pipe.components[name].to(dtype)
        except Exception:
            log.exception("could not undo temporary memory modes")
        if attempt.offloaded:
            try:
                pipe.remove_all_hooks()
                pipe.to(self.plan.device)
            except Exception as exc:  # could not move back: stay offloaded so the next request still works
                log.warning("model stays CPU-offloaded: moving it back failed (%s)", type(exc).__name__)
                empty_cache(self.plan.backend)
                try:
                    pipe.enable_model_cpu_offload(device=self.plan.device)
                    if "offload_model_after_oom" not in model.modes:
                        model.modes.append("offload_model_after_oom")
                except Exception:
                    log.exception("could not re-enable model CPU offload")

    def recover_bad_output(self, pipe: Any, runner: FamilyRunner, latents: torch.Tensor, params: GenerationParams,
                            attempt: Attempt) -> torch.Tensor:
        """NaN/black pixels: re-decode with a float32 VAE where the latents are sound; if that does not help
        (or the latents themselves are NaN), retry the whole generation in float32 where half precision is
        the likely cause (MPS in float16), else raise :class:`BadOutput`."""
        attempt.kind = attempt.kind or "nan_output"
        latents_ok = bool(torch.isfinite(latents).all())
        if latents_ok:
            attempt.notes.append("re-decoded the VAE in float32 after NaN/black output")
            decoded = self._decode_float32(pipe, runner, latents, params)
            if not bad_output(decoded):
                return decoded
        if (self.plan.backend == "mps" and self.plan.dtype != "float32" and not attempt.in_float32
                and self.settings.max_concurrent == 1):
            raise RetryInFloat32
        where = "even after re-decoding the VAE in float32" if latents_ok else "(the denoiser returned NaN latents)"
        hint = " and in float32" if attempt.in_float32 else ""
        raise BadOutput(f"the model produced NaN or black images {where}{hint}")

    def _decode_float32(self, pipe: Any, runner: FamilyRunner, latents: torch.Tensor,
                        params: GenerationParams) -> torch.Tensor:
        vae = pipe.vae
        original = vae.dtype
        if original == torch.float32:  # already float32 (CPU, MPS): decode again, no conversion round trip
            return runner.decode(pipe, latents.float(), params.width, params.height)
        try:
            vae.to(torch.float32)
            return runner.decode(pipe, latents.float(), params.width, params.height)
        finally:
            vae.to(original)


def undo_vae_modes(pipe: Any, applied: list[str]) -> None:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return
    if "vae_tiling" in applied:
        vae.disable_tiling()
    if "vae_slicing" in applied:
        vae.disable_slicing()


def bad_output(images: torch.Tensor) -> bool:
    """Cheap check: any NaN/inf, or every pixel black."""
    if not torch.isfinite(images).all():
        return True
    return bool(images.max() <= -0.99)
