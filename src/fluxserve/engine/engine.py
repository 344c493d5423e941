"""The engine of one device: owns that device's pipelines and turns batches of requests into pixels.

It knows nothing of HTTP or queues. The scheduler hands it a batch of compatible requests (same model,
size, steps, guidance) and gets back one result per request, each with its own images, seeds, stage
timings and fallback story. Out-of-memory recovery (the ladder) and NaN/black-image checks live here.

Lock order (never reversed, never two model locks at once):
  1. ``DeviceEngine._guard`` — a short lock around the model table and the per-model lock table;
  2. the per-model load lock of one model — held only while that model loads, waited on with
     ``FLUX_MODEL_LOCK_TIMEOUT``. Generation never takes it: a loaded model generates while another
     model loads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxserve.engine.device import DevicePlan
from fluxserve.engine.families import DenoiseArgs, PromptEmbedding, preview_rgb, to_uint8
from fluxserve.engine.faults import FaultInjector
from fluxserve.engine.loading import LoadedModel, PipelineView, load_model
from fluxserve.engine.memory import (
    apply_attention_slicing,
    apply_vae_modes,
    empty_cache,
    in_use_bytes,
    is_oom,
    memory_snapshot,
    oom_kind,
)
from fluxserve.engine.registry import ModelSpec
from fluxserve.generation import (
    BadOutput,
    GenerationCancelled,
    GenerationParams,
    ImageRequest,
    ImageResult,
    ModelLockTimeout,
    OutOfMemory,
)
from fluxserve.settings import Settings

log = logging.getLogger(__name__)


MAX_DOWNSCALES = 2
"""The downscale rung lowers the size by a quarter per side at most this many times (1024 → 768 → 576)."""
DOWNSCALE_FACTOR = 0.75


class _RetryInFloat32(Exception):
    """Internal: half precision produced NaN/black images; run the whole generation again in float32."""


@dataclass
class _Attempt:
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
                         + (f" after {_and_join(steps)}" if steps else ""))
        parts += self.notes
        if not parts:
            return None
        return f"{self.kind}: " + "; ".join(parts)

    def failure_reason(self, kind: str) -> str:
        """Why the ladder gave up, e.g. ``cpu_oom: still out of memory after cache cleanup, ...``."""
        tried = _and_join(self.actions) if self.actions else "nothing (no rung of FLUX_OOM_POLICY applied)"
        text = f"{kind}: still out of memory at {self.params.width}x{self.params.height} after {tried}"
        if self.downscale_refused:
            text += "; a lower resolution was not allowed (allow_fallback=false)"
        return text


def _and_join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class DeviceEngine:
    """Pipelines and generation for one device."""

    def __init__(self, settings: Settings, plan: DevicePlan, faults: FaultInjector | None = None) -> None:
        self.settings = settings
        self.plan = plan
        self.faults = faults or FaultInjector(False)
        self._guard = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self.consecutive_oom_failures = 0
        self.oom_events: deque[str] = deque(maxlen=256)
        """The latest out-of-memory kinds seen (bounded: a long-running server must not grow it)."""
        self.step_sync: Callable[[list[bool]], list[bool]] | None = None
        """Ranks of a split group (``fluxserve.engine.parallel``): agree on the cancel flags each step."""

    # --- models ----------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.plan.device

    def loaded(self) -> dict[str, LoadedModel]:
        with self._guard:
            return dict(self._models)

    def get(self, key: str) -> LoadedModel | None:
        with self._guard:
            return self._models.get(key)

    def load(self, spec: ModelSpec) -> tuple[LoadedModel, bool]:
        """Load ``spec`` unless already loaded; returns (model, loaded_now). One load per model at a time."""
        with self._guard:
            model = self._models.get(spec.key)
            if model is not None:
                return model, False
            lock = self._load_locks.setdefault(spec.key, threading.Lock())
        if not lock.acquire(timeout=self.settings.model_lock_timeout):
            raise ModelLockTimeout(
                f"timed out after {self.settings.model_lock_timeout:.0f}s waiting for {spec.key} to load "
                "(FLUX_MODEL_LOCK_TIMEOUT)"
            )
        try:
            with self._guard:
                model = self._models.get(spec.key)
            if model is not None:  # somebody else loaded it while we waited
                return model, False
            before = in_use_bytes(self.device)
            model = load_model(spec, self.plan, self.settings, views=self.settings.max_concurrent)
            log.info("model loaded", extra={"ctx": {
                "model": spec.key, "device": self.device, "seconds": round(model.load_seconds, 3),
                "pipeline": model.pipeline_class, "modes": model.modes,
                "memory_delta_bytes": in_use_bytes(self.device) - before}})
            with self._guard:
                self._models[spec.key] = model
            return model, True
        finally:
            lock.release()

    def unload(self, key: str) -> bool:
        with self._guard:
            model = self._models.pop(key, None)
        if model is None:
            return False
        model.prompt_cache.clear()
        del model
        empty_cache(self.plan.backend)
        return True

    def release(self, keep: set[str]) -> list[str]:
        """Drop every loaded model not in ``keep``; free caches. Returns the keys dropped."""
        dropped = [k for k in self.loaded() if k not in keep]
        for key in dropped:
            self.unload(key)
        for model in self.loaded().values():
            model.prompt_cache.clear()
        empty_cache(self.plan.backend)
        return dropped

    def memory(self) -> dict[str, Any]:
        return memory_snapshot(self.device)

    # --- generation ------------------------------------------------------------------------------
    def generate(self, model: LoadedModel, params: GenerationParams, requests: list[ImageRequest]) -> list[ImageResult]:
        """Run one batch, recovering from out-of-memory per FLUX_OOM_POLICY.

        The ladder's rungs run in the configured order, each at most once (downscale up to
        :data:`MAX_DOWNSCALES` times): ``clear_cache`` retries as asked after the cache is emptied,
        ``slicing`` turns on VAE tiling/slicing (and attention slicing where the pipeline has it),
        ``offload`` turns on model CPU offload (CUDA only), ``downscale`` lowers the resolution if the
        request allows it. Temporary modes are undone afterwards. Steps are never changed.

        Raises :class:`OutOfMemory` (ladder exhausted), :class:`BadOutput`, :class:`GenerationCancelled`.
        """
        attempt = _Attempt(params)
        rungs = list(self.settings.oom_policy)
        with model.view() as view:
            try:
                while True:
                    failure: str | None = None
                    try:
                        results = self._run(model, view, attempt, requests)
                    except _RetryInFloat32:
                        failure = "nan_output"
                    except Exception as exc:
                        if not is_oom(exc):
                            raise
                        failure = oom_kind(exc, self.plan.backend)
                    else:
                        self.consecutive_oom_failures = 0
                        reason = attempt.fallback_reason(params)
                        for result in results:
                            result.fallback_applied = reason is not None
                            result.fallback_reason = reason
                            result.original_params = params if attempt.params != params else None
                        return results
                    # Outside the except block: the error and its traceback, which pin the failed attempt's
                    # tensors, are gone now, so emptying the cache below really returns their memory.
                    assert attempt.params.steps == params.steps, "a fallback must never change the step count"
                    if failure == "nan_output":
                        self._to_float32(view, attempt)
                        continue
                    self._record_oom(model, attempt, failure)
                    if all(r.is_cancelled() for r in requests):
                        raise GenerationCancelled("cancelled while recovering from out of memory")
                    if not self._next_rung(model, view, attempt, rungs):
                        self.consecutive_oom_failures += 1
                        raise OutOfMemory(attempt.failure_reason(failure))
            finally:
                self._undo_temporary(model, view, attempt)

    def _record_oom(self, model: LoadedModel, attempt: _Attempt, kind: str) -> None:
        self.oom_events.append(kind)
        attempt.kind = attempt.kind or kind
        attempt.ooms += 1
        log.warning("out of memory", extra={"ctx": {"model": model.spec.key, "kind": kind, "attempt": attempt.ooms,
                                                     "params": attempt.params.__dict__}})
        # A full collection on the batch's first OOM; later retries only made young garbage.
        empty_cache(self.plan.backend, full_gc=attempt.ooms == 1)

    def _next_rung(self, model: LoadedModel, view: PipelineView, attempt: _Attempt, rungs: list[str]) -> bool:
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

    def _apply_rung(self, rung: str, model: LoadedModel, view: PipelineView, attempt: _Attempt) -> bool:
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
            pipe.enable_model_cpu_offload(device=self.device)
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

    def _to_float32(self, view: PipelineView, attempt: _Attempt) -> None:
        """Move every component to float32 for one more try (undone in :meth:`_undo_temporary`)."""
        for name, module in view.pipeline.components.items():
            if isinstance(module, torch.nn.Module):
                dtype = next((p.dtype for p in module.parameters()), torch.float32)
                if dtype != torch.float32:
                    attempt.float32_restore[name] = dtype
                    module.to(torch.float32)
        attempt.in_float32 = True
        attempt.kind = attempt.kind or "nan_output"
        attempt.notes.append(f"retried in float32 after NaN/black output in {self.plan.dtype}")

    def _undo_temporary(self, model: LoadedModel, view: PipelineView, attempt: _Attempt) -> None:
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
                pipe.to(self.device)
            except Exception as exc:  # could not move back: stay offloaded so the next request still works
                log.warning("model stays CPU-offloaded: moving it back failed (%s)", type(exc).__name__)
                empty_cache(self.plan.backend)
                try:
                    pipe.enable_model_cpu_offload(device=self.device)
                    if "offload_model_after_oom" not in model.modes:
                        model.modes.append("offload_model_after_oom")
                except Exception:
                    log.exception("could not re-enable model CPU offload")

    def _encode(self, model: LoadedModel, pipe: Any, prompt: str, max_len: int, *,
                cache: bool = True) -> PromptEmbedding:
        key = model.adapter.cache_key(prompt, max_len)
        cached = model.prompt_cache.get(key) if cache else None
        if cached is not None:
            return cached
        with torch.inference_mode():
            embedding = model.adapter.encode(pipe, prompt, max_len)
        if cache:
            model.prompt_cache.put(key, embedding)
        return embedding

    def _run(self, model: LoadedModel, view: PipelineView, attempt: _Attempt,
             requests: list[ImageRequest]) -> list[ImageResult]:
        params = attempt.params
        pipe = view.pipeline
        edit = None
        if params.task != "generate":  # edits: see the section at the end of this module
            edit = _plan_edit(model.adapter, view, params, requests)
            pipe, requests = edit.pipe, edit.requests
        adapter = model.adapter
        backend = self.plan.backend
        sync = _synchronizer(backend, self.device)
        timings: dict[str, float] = {}

        # 1. Encode prompts (cached per unique prompt), one embedding per image.
        started = time.perf_counter()
        self.faults.raise_if_armed("encode", backend)
        positives: list[PromptEmbedding] = []
        negatives: list[PromptEmbedding] = []
        use_negative = adapter.wants_negative(params.guidance)
        cache = not attempt.in_float32  # cached embeddings are in the half-precision dtype
        for request in requests:
            pos = self._encode(model, pipe, request.prompt, params.max_sequence_length, cache=cache)
            neg = None
            if use_negative:
                neg_text = request.negative_prompt if request.negative_prompt is not None else \
                    (model.spec.negative_prompt or " ")
                neg = self._encode(model, pipe, neg_text, params.max_sequence_length, cache=cache)
            for _ in request.seeds:
                positives.append(pos)
                if neg is not None:
                    negatives.append(neg)
        sync()
        timings["text_encode"] = time.perf_counter() - started

        # 2. Denoise, with per-step progress, previews and cancellation.
        seeds = [seed for request in requests for seed in request.seeds]
        owners = [i for i, request in enumerate(requests) for _ in request.seeds]
        generators = view.seeded_generators(seeds)

        total = denoising_steps(params)

        def on_step(p: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            latents = kwargs.get("latents")
            cancelled = [r.is_cancelled() for r in requests]
            if self.step_sync is not None:  # a rank of a split group: every rank stops at the same step
                cancelled = self.step_sync(cancelled)
            if all(cancelled):
                p._interrupt = True
                return {}
            wants = [r for r in requests if r.on_progress is not None and not r.is_cancelled()]
            previews = None
            if latents is not None and adapter.supports_previews and any(r.want_previews for r in wants):
                with torch.inference_mode():
                    spatial = adapter.spatial_latents(p, latents, params.width, params.height)
                    previews = preview_rgb(spatial)
            for index, request in enumerate(requests):
                if request.on_progress is None or request.is_cancelled():
                    continue
                preview = None
                if previews is not None and request.want_previews:
                    preview = previews[owners.index(index)]
                request.on_progress(step + 1, total, preview)
            return {}

        started = time.perf_counter()
        nan_latents = self.faults.raise_if_armed("denoise", backend)
        with torch.inference_mode():
            latents = adapter.denoise(pipe, positives, negatives if use_negative else None, DenoiseArgs(
                width=params.width, height=params.height, steps=params.steps, guidance=params.guidance,
                generators=generators, callback=on_step,
                max_sequence_length=params.max_sequence_length, call_kwargs=edit.call_kwargs if edit else {}))
            if nan_latents:
                latents = torch.full_like(latents, float("nan"))
        sync()
        timings["denoise"] = time.perf_counter() - started
        if all(r.is_cancelled() for r in requests):
            raise GenerationCancelled("cancelled during denoising")

        # 3. Decode (VAE) and move pixels to the CPU as uint8, checking for NaN/black output.
        started = time.perf_counter()
        with model.shared_lock, torch.inference_mode():
            make_nan = self.faults.raise_if_armed("decode", backend)
            applied = apply_vae_modes(pipe, slicing="vae_slicing" in attempt.vae_modes,
                                      tiling="vae_tiling" in attempt.vae_modes, tile_size=self.settings.vae_tile_size)
            try:
                decoded = adapter.decode(pipe, latents, params.width, params.height)
                if make_nan:
                    decoded = torch.full_like(decoded, float("nan"))
                if _bad_output(decoded):
                    decoded = self._recover_bad_output(pipe, adapter, latents, params, attempt)
                pixels = to_uint8(decoded)
            finally:
                _undo_vae_modes(pipe, applied)
        if edit is not None:
            pixels = _keep_unmasked(pixels, requests)
        timings["vae_decode"] = time.perf_counter() - started

        results = []
        for index, request in enumerate(requests):
            picks = [pixels[i] for i, owner in enumerate(owners) if owner == index]
            results.append(ImageResult(
                images=picks, seeds=list(request.seeds), params=params, timings=dict(timings),
                batch_size=len(seeds), cancelled=request.is_cancelled(),
            ))  # generate() fills in the fallback story
        return results

    def _recover_bad_output(self, pipe: Any, adapter: Any, latents: torch.Tensor, params: GenerationParams,
                            attempt: _Attempt) -> torch.Tensor:
        """NaN/black pixels: re-decode with a float32 VAE where the latents are sound; if that does not help
        (or the latents themselves are NaN), retry the whole generation in float32 where half precision is
        the likely cause (MPS in float16), else raise :class:`BadOutput`."""
        attempt.kind = attempt.kind or "nan_output"
        latents_ok = bool(torch.isfinite(latents).all())
        if latents_ok:
            attempt.notes.append("re-decoded the VAE in float32 after NaN/black output")
            decoded = self._decode_float32(pipe, adapter, latents, params)
            if not _bad_output(decoded):
                return decoded
        if (self.plan.backend == "mps" and self.plan.dtype != "float32" and not attempt.in_float32
                and self.settings.max_concurrent == 1):
            raise _RetryInFloat32
        where = "even after re-decoding the VAE in float32" if latents_ok else "(the denoiser returned NaN latents)"
        hint = " and in float32" if attempt.in_float32 else ""
        raise BadOutput(f"the model produced NaN or black images {where}{hint}")

    def _decode_float32(self, pipe: Any, adapter: Any, latents: torch.Tensor, params: GenerationParams) -> torch.Tensor:
        vae = pipe.vae
        original = vae.dtype
        if original == torch.float32:  # already float32 (CPU, MPS): decode again, no conversion round trip
            return adapter.decode(pipe, latents.float(), params.width, params.height)
        try:
            vae.to(torch.float32)
            return adapter.decode(pipe, latents.float(), params.width, params.height)
        finally:
            vae.to(original)


def _undo_vae_modes(pipe: Any, applied: list[str]) -> None:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return
    if "vae_tiling" in applied:
        vae.disable_tiling()
    if "vae_slicing" in applied:
        vae.disable_slicing()


def _bad_output(images: torch.Tensor) -> bool:
    """Cheap check: any NaN/inf, or every pixel black."""
    if not torch.isfinite(images).all():
        return True
    return bool(images.max() <= -0.99)


def _synchronizer(backend: str, device: str) -> Callable[[], None]:
    """Synchronize only so stage times are attributed to the right stage (CUDA/MPS are asynchronous)."""
    if backend == "cuda":
        return lambda: torch.cuda.synchronize(device)  # this engine's device, not the thread's current one
    if backend == "mps":
        return torch.mps.synchronize
    return lambda: None



# --- edits: img2img, inpainting, instruction edits ---------------------------------------------------
# Edits run through ``_run`` above like generations (prompt cache, batching, progress, cancel, previews,
# OOM ladder, NaN checks), with four hooks taken from the model's family contract: the task's pipeline
# (``Family.edit_pipeline``: made with ``from_pipe``, so the weights are shared, and cached per pipeline
# view), the call's image arguments (``Family.edit_call_kwargs``), the number of steps that really run,
# and — with a mask — the input's own pixels kept outside it. The scheduler batches edit jobs only when
# their inputs are byte-identical (the ``inputs`` digest is part of GenerationParams), so the first
# request's images stand for the whole batch.


@dataclass
class _EditPlan:
    pipe: Any
    call_kwargs: dict[str, Any]
    requests: list[ImageRequest]


def _plan_edit(family: Any, view: PipelineView, params: GenerationParams,
               requests: list[ImageRequest]) -> _EditPlan:
    requests = [_at_size(r, params.width, params.height) for r in requests]  # an OOM fallback may shrink the size
    first = requests[0]
    pipe = family.edit_pipeline(view.pipeline, params.task)
    mask = first.mask if params.task == "inpaint" else None
    kwargs = family.edit_call_kwargs(params.task, first.images, mask, params.strength, params.width, params.height)
    return _EditPlan(pipe, kwargs, requests)


def denoising_steps(params: GenerationParams) -> int:
    """Steps an img2img/inpaint call really runs: diffusers skips the first ``(1 - strength)`` of them."""
    if params.strength is None or params.task in ("generate", "edit"):
        return params.steps
    return params.steps - int(max(params.steps - params.steps * params.strength, 0))


def _keep_unmasked(pixels: Any, requests: list[ImageRequest]) -> Any:
    """With a mask, every image gets the input's own pixels outside it (see :func:`keep_outside_mask`)."""
    first = requests[0]
    if first.mask is None:
        return pixels
    return keep_outside_mask(pixels, first.images[0], first.mask)


def _at_size(request: ImageRequest, width: int, height: int) -> ImageRequest:
    """The request with its first image (and mask) at width × height (references keep their size)."""
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    first = request.images[0]
    if first.shape[1] == width and first.shape[0] == height:
        return request
    resized = np.asarray(Image.fromarray(first, "RGB").resize((width, height), Image.Resampling.LANCZOS))
    mask = request.mask
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask, "L").resize((width, height), Image.Resampling.BILINEAR))
    return replace(request, images=[resized, *request.images[1:]], mask=mask)


def keep_outside_mask(pixels: Any, original: Any, mask: Any) -> Any:
    """Where the mask is 0 the input's pixels, where it is 255 the edit's, blended in between."""
    import numpy as np

    weight = (mask.astype(np.float32) / 255.0)[None, :, :, None]
    blended = original[None].astype(np.float32) * (1 - weight) + pixels.astype(np.float32) * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)

