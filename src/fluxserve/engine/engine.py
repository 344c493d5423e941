"""The engine of one device: owns that device's pipelines and turns batches of requests into pixels.

It knows nothing of HTTP or queues. The scheduler hands it a batch of compatible requests (same model,
size, steps, guidance) and gets back one result per request, each with its own images, seeds, stage
timings and fallback story. The models live in its :class:`~fluxserve.engine.store.ModelStore`;
out-of-memory recovery and the NaN/black-image checks are :mod:`fluxserve.engine.recovery`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fluxserve.config import EngineConfig
from fluxserve.engine.families import DenoiseArgs, FamilyRunner, PromptEmbedding, to_uint8
from fluxserve.engine.faults import FaultInjector
from fluxserve.engine.loading import LoadedModel, PipelineView
from fluxserve.engine.memory import (
    apply_vae_modes,
    is_oom,
    memory_snapshot,
    oom_kind,
)
from fluxserve.engine.recovery import Attempt, OomLadder, RetryInFloat32, bad_output, undo_vae_modes
from fluxserve.engine.store import ModelStore
from fluxserve.generation import (
    AdapterError,
    GenerationCancelled,
    GenerationParams,
    ImageRequest,
    ImageResult,
    OutOfMemory,
    partial_image_steps,
)
from fluxserve.loras import LoraLibrary
from fluxserve.models.devices import DevicePlan
from fluxserve.models.handle import ModelHandle
from fluxserve.models.spec import ModelSpec

log = logging.getLogger(__name__)


class DeviceEngine:
    """Pipelines and generation for one device."""

    def __init__(self, settings: EngineConfig, plan: DevicePlan, faults: FaultInjector | None = None) -> None:
        self.settings = settings
        self.plan = plan
        self.faults = faults or FaultInjector(False)
        self.store = ModelStore(settings, plan)
        self.ladder = OomLadder(settings, plan)
        self.consecutive_oom_failures = 0
        self.lora_library = LoraLibrary(settings.lora_library_dir)
        self.step_sync: Callable[[list[bool]], list[bool]] | None = None
        """Ranks of a split group (``fluxserve.engine.parallel``): agree on the cancel flags each step."""

    # --- models ----------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.plan.device

    def loaded(self) -> dict[str, LoadedModel]:
        return self.store.loaded()

    def get(self, key: str) -> LoadedModel | None:
        return self.store.get(key)

    def load(self, spec: ModelSpec) -> tuple[LoadedModel, bool]:
        """Load ``spec`` unless already loaded; returns (model, loaded_now). One load per model at a time."""
        return self.store.load(spec)

    def unload(self, key: str) -> bool:
        return self.store.unload(key)

    def release(self, keep: set[str]) -> list[str]:
        """Drop every loaded model not in ``keep``; free caches. Returns the keys dropped."""
        return self.store.release(keep)

    @property
    def oom_events(self) -> Any:
        return self.ladder.oom_events

    def memory(self) -> dict[str, Any]:
        return memory_snapshot(self.device)

    # --- generation ------------------------------------------------------------------------------
    def generate(self, model: ModelHandle, params: GenerationParams, requests: list[ImageRequest]) -> list[ImageResult]:
        """Run one batch on ``model`` (one of this engine's), recovering from out-of-memory per FLUX_OOM_POLICY.

        The ladder's rungs run in the configured order, each at most once (downscale up to
        :data:`MAX_DOWNSCALES` times): ``clear_cache`` retries as asked after the cache is emptied,
        ``slicing`` turns on VAE tiling/slicing (and attention slicing where the pipeline has it),
        ``offload`` turns on model CPU offload (CUDA only), ``downscale`` lowers the resolution if the
        request allows it. Temporary modes are undone afterwards. Steps are never changed.

        Raises :class:`OutOfMemory` (ladder exhausted), :class:`BadOutput`, :class:`GenerationCancelled`.
        """
        if not isinstance(model, LoadedModel):
            raise TypeError(f"{model.spec.key} is not a model of this engine ({type(model).__name__})")
        attempt = Attempt(params)
        rungs = list(self.settings.oom_policy)
        with model.view() as view, self._adapters(model, params):
            try:
                while True:
                    failure: str | None = None
                    try:
                        results = self._run(model, view, attempt, requests)
                    except RetryInFloat32:
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
                        self.ladder.to_float32(view, attempt)
                        continue
                    self.ladder.record_oom(model, attempt, failure)
                    if all(r.is_cancelled() for r in requests):
                        raise GenerationCancelled("cancelled while recovering from out of memory")
                    if not self.ladder.next_rung(model, view, attempt, rungs):
                        self.consecutive_oom_failures += 1
                        raise OutOfMemory(attempt.failure_reason(failure))
            finally:
                self.ladder.undo_temporary(model, view, attempt)

    def _adapters(self, model: LoadedModel, params: GenerationParams) -> Any:
        """Hold the model with the batch's adapter set active (see ``engine/adapters.py``)."""
        if model.loras is None:
            if params.loras:
                raise AdapterError(model.loras_unavailable or "this model takes no LoRA adapters")
            return nullcontext()
        return model.loras.use(params.loras, self.lora_library.get)

    def _encode(self, model: LoadedModel, pipe: Any, prompt: str, max_len: int, *,
                cache: bool = True, loras: tuple[tuple[str, float], ...] = ()) -> PromptEmbedding:
        key: tuple[Any, ...] = model.runner.cache_key(prompt, max_len)
        if loras and model.loras is not None and model.loras.text_encoder_set(loras):
            key = (*key, loras)  # a text-encoder adapter changes the embeddings
        cached = model.prompt_cache.get(key) if cache else None
        if cached is not None:
            return cached
        with torch.inference_mode():
            embedding = model.runner.encode(pipe, prompt, max_len)
        if cache:
            model.prompt_cache.put(key, embedding)
        return embedding

    def _run(self, model: LoadedModel, view: PipelineView, attempt: Attempt,
             requests: list[ImageRequest]) -> list[ImageResult]:
        params = attempt.params
        pipe = view.pipeline
        edit = None
        if params.task != "generate":  # edits: see the section at the end of this module
            edit = _plan_edit(model.runner, view, params, requests)
            pipe, requests = edit.pipe, edit.requests
        runner, family = model.runner, model.descriptor
        backend = self.plan.backend
        sync = _synchronizer(backend, self.device)
        timings: dict[str, float] = {}

        # 1. Encode prompts (cached per unique prompt), one embedding per image.
        started = time.perf_counter()
        self.faults.raise_if_armed("encode", backend)
        positives: list[PromptEmbedding] = []
        negatives: list[PromptEmbedding] = []
        use_negative = family.wants_negative(params.guidance)
        cache = not attempt.in_float32  # cached embeddings are in the half-precision dtype
        for request in requests:
            pos = self._encode(model, pipe, request.prompt, params.max_sequence_length, cache=cache,
                               loras=params.loras)
            neg = None
            if use_negative:
                neg_text = request.negative_prompt if request.negative_prompt is not None else \
                    (model.spec.negative_prompt or " ")
                neg = self._encode(model, pipe, neg_text, params.max_sequence_length, cache=cache,
                                   loras=params.loras)
            for _ in request.seeds:
                positives.append(pos)
                if neg is not None:
                    negatives.append(neg)
        sync()
        timings["text_encode"] = time.perf_counter() - started

        # 2. Denoise, with per-step progress, partial images and cancellation.
        seeds = [seed for request in requests for seed in request.seeds]
        owners = [i for i, request in enumerate(requests) for _ in request.seeds]
        generators = view.seeded_generators(seeds)

        total = denoising_steps(params)
        # Partial images: the first image of each request that streams them, at its own steps.
        partial_steps = [partial_image_steps(total, r.partial_images) if r.on_progress is not None and
                         family.supports_previews else frozenset() for r in requests]
        before_partial = {step - 1 for steps in partial_steps for step in steps}
        previous: list[torch.Tensor | None] = [None]  # the latents one step before a partial image

        def on_step(p: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            latents = kwargs.get("latents")
            done = step + 1
            cancelled = [r.is_cancelled() for r in requests]
            if self.step_sync is not None:  # a rank of a split group: every rank stops at the same step
                cancelled = self.step_sync(cancelled)
            if all(cancelled):
                p._interrupt = True
                return {}
            wanting = [i for i, steps in enumerate(partial_steps) if done in steps and not cancelled[i]]
            partials: dict[int, Any] = {}
            if latents is not None and wanting:
                rows = [owners.index(i) for i in wanting]
                images = self._partial_images(model, p, latents, previous[0], rows, attempt)
                if images is not None:
                    partials = dict(zip(wanting, images, strict=True))
            previous[0] = latents.clone() if latents is not None and done in before_partial else None
            for index, request in enumerate(requests):
                if request.on_progress is None or request.is_cancelled():
                    continue
                request.on_progress(done, total, partials.get(index))
            return {}

        started = time.perf_counter()
        nan_latents = self.faults.raise_if_armed("denoise", backend)
        with torch.inference_mode():
            latents = runner.denoise(pipe, positives, negatives if use_negative else None, DenoiseArgs(
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
                decoded = runner.decode(pipe, latents, params.width, params.height)
                if make_nan:
                    decoded = torch.full_like(decoded, float("nan"))
                if bad_output(decoded):
                    decoded = self.ladder.recover_bad_output(pipe, runner, latents, params, attempt)
                pixels = to_uint8(decoded)
            finally:
                undo_vae_modes(pipe, applied)
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

    def _partial_images(self, model: LoadedModel, pipe: Any, latents: torch.Tensor, previous: torch.Tensor | None,
                        rows: list[int], attempt: Attempt) -> Any:
        """The images the model predicts so far for these batch rows, decoded by its VAE at the requested size
        (uint8 [len(rows), H, W, 3]); None when the decode runs out of memory (the generation goes on).

        Decoded is the clean latent the model predicted at the step just taken (:func:`predicted_clean_latents`),
        which already shows the image's colours and shapes; where it cannot be had, the current latent."""
        params = attempt.params
        estimate = predicted_clean_latents(pipe.scheduler, latents[rows],
                                           previous[rows] if previous is not None else None)
        with model.shared_lock, torch.inference_mode():
            applied = apply_vae_modes(pipe, slicing="vae_slicing" in attempt.vae_modes,
                                      tiling="vae_tiling" in attempt.vae_modes, tile_size=self.settings.vae_tile_size)
            try:
                return to_uint8(model.runner.decode(pipe, estimate, params.width, params.height))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                log.warning("no partial image: out of memory while decoding it", extra={"ctx": {
                    "model": model.spec.key, "size": f"{params.width}x{params.height}"}})
                return None
            finally:
                undo_vae_modes(pipe, applied)


def predicted_clean_latents(scheduler: Any, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """The clean latents the model predicted at the step just taken, from the latents before and after it.

    Flow matching moves ``x = (1 − σ)·x0 + σ·noise`` along the velocity ``v = noise − x0``; an Euler step from
    σ_prev to σ gives ``v = (x − x_prev) / (σ − σ_prev)``, so ``x0 = x − σ·v`` (whatever sign convention the
    model's own output has). Every family with partial images samples this way (diffusers'
    ``FlowMatchEulerDiscreteScheduler``, deterministic); for any other scheduler, or with no ``previous``
    (a partial image after the first step), the current latents are returned as they are.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if previous is None or not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return latents
    euler: Any = scheduler  # diffusers' type hints do not declare its config and sigmas
    index = euler.step_index
    if euler.config.get("stochastic_sampling") or index is None or not 1 <= index < len(euler.sigmas):
        return latents
    sigma, sigma_prev = float(euler.sigmas[index]), float(euler.sigmas[index - 1])
    if sigma == sigma_prev:
        return latents
    current = latents.float()
    velocity = (current - previous.float()) / (sigma - sigma_prev)
    return (current - sigma * velocity).to(latents.dtype)


def _synchronizer(backend: str, device: str) -> Callable[[], None]:
    """Synchronize only so stage times are attributed to the right stage (CUDA/MPS are asynchronous)."""
    if backend == "cuda":
        return lambda: torch.cuda.synchronize(device)  # this engine's device, not the thread's current one
    if backend == "mps":
        return torch.mps.synchronize
    return lambda: None



# --- edits: img2img, inpainting, instruction edits ---------------------------------------------------
# Edits run through ``_run`` above like generations (prompt cache, batching, progress, cancel, partial images,
# OOM ladder, NaN checks), with four hooks taken from the model's family runner: the task's pipeline
# (``FamilyRunner.edit_pipeline``: made by ``sharing_modules``, so the weights are shared with their dtypes, and
# cached per pipeline view), the call's image arguments (``FamilyRunner.edit_call_kwargs``), the number of steps
# that really run, and — with a mask — the input's own pixels kept outside it. The scheduler batches edit
# jobs only when their inputs are byte-identical (the ``inputs`` digest is part of GenerationParams), so
# the first request's images stand for the whole batch.


@dataclass
class _EditPlan:
    pipe: Any
    call_kwargs: dict[str, Any]
    requests: list[ImageRequest]


def _plan_edit(runner: FamilyRunner, view: PipelineView, params: GenerationParams,
               requests: list[ImageRequest]) -> _EditPlan:
    if any(not r.images for r in requests):
        raise ValueError(f"a {params.task} request needs its input images")
    requests = [_at_size(r, params.width, params.height) for r in requests]  # an OOM fallback may shrink the size
    first = requests[0]
    pipe = runner.edit_pipeline(view.pipeline, params.task)
    mask = first.mask if params.task == "inpaint" else None
    kwargs = runner.edit_call_kwargs(params.task, first.images, mask, params.strength, params.width, params.height)
    # One copy of a single input per output image: the pipelines encode the image with the batch's generators
    # but, for one image, with the first generator only, which would make image i depend on the others' seeds.
    count = sum(len(r.seeds) for r in requests)
    for key in ("image", "mask_image"):
        value = kwargs.get(key)
        if value is not None and not isinstance(value, list) and count > 1:
            kwargs[key] = [value] * count
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

