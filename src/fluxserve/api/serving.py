"""The logic behind the image routes: validate → build a job → wait or stream → shape the response.

Heavy work never runs on the event loop: jobs run on the scheduler's device threads, and image
encoding, base64 and saving run on the runtime's encoder thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fluxserve.api.errors import APIError
from fluxserve.api.protocol import MAX_SEED, ImageData, ImageGenerationRequest, ImageParams, ImagesResponse
from fluxserve.engine.registry import ModelSpec, UnknownModelError
from fluxserve.generation import GenerationParams, pick_seed
from fluxserve.runtime import Runtime
from fluxserve.scheduler.jobs import Job, JobError, JobStatus
from fluxserve.storage.images import MEDIA_TYPES, encode_image, to_base64

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$", re.ASCII)
_QUALITY_ALIASES = {"standard": "medium", "hd": "high"}


@dataclass
class OutputOptions:
    response_format: str
    output_format: str
    compression: int | None
    store_local: bool
    write_metadata: bool
    quality: str
    base_url: str
    ignored: list[str]
    partial_images: int
    user: str | None
    request_started: float
    event_prefix: str = "image_generation"
    """Streaming event names: ``image_generation.*`` for generations, ``image_edit.*`` for edits."""


class ImageService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self._background: set[asyncio.Task[None]] = set()

    # --- validation ------------------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> ModelSpec:
        try:
            return self.runtime.resolve(name)
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None

    def _size(self, body: ImageGenerationRequest, spec: ModelSpec) -> tuple[int, int, str]:
        """(width, height, param to blame) from size / width / height."""
        width = height = None
        param = "size"
        if body.size and body.size != "auto":
            match = _SIZE.match(body.size.strip().lower())
            if not match:
                raise APIError(400, f"size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {body.size[:40]!r}",
                               param="size", code="invalid_size")
            width, height = int(match.group(1)), int(match.group(2))
            if (body.width is not None and body.width != width) or (body.height is not None and body.height != height):
                raise APIError(400, f"size {body.size} contradicts width={body.width} height={body.height}",
                               param="size", code="conflicting_size")
        elif body.width is not None or body.height is not None:
            width = body.width or spec.width
            height = body.height or spec.height
            param = "width" if body.width is not None else "height"
        if width is None or height is None:
            return spec.width, spec.height, "size"
        s = self.settings
        m = spec.size_multiple
        for value, name in ((width, "width"), (height, "height")):
            blame = param if param == "size" else name
            if not s.min_size <= value <= s.max_size:
                raise APIError(400, f"{name} must be between {s.min_size} and {s.max_size} pixels, got {value}",
                               param=blame, code="invalid_size")
            if value % m:
                raise APIError(400, f"{name} must be a multiple of {m} for {spec.key}, got {value} "
                                    f"(nearest: {max(m, value // m * m)})", param=blame, code="invalid_size")
        if width * height > s.max_pixels:
            raise APIError(400, f"{width}x{height} is {width * height} pixels; the limit is {s.max_pixels} "
                                "(FLUX_MAX_PIXELS)", param=param, code="invalid_size")
        return width, height, param

    def build_job(self, body: ImageGenerationRequest, request_id: str, *, want_previews: bool = False) -> Job:
        s = self.settings
        if len(body.prompt) > s.max_prompt_chars:
            raise APIError(400, f"prompt is {len(body.prompt)} characters; the limit is {s.max_prompt_chars}",
                           param="prompt", code="prompt_too_long")
        if not body.prompt.strip():
            raise APIError(400, "prompt must not be blank", param="prompt", code="invalid_value")
        spec = self.resolve_model(body.model)
        n = body.n or 1
        if n > s.max_images_per_request:
            raise APIError(400, f"n must be between 1 and {s.max_images_per_request}, got {n}", param="n",
                           code="invalid_value")
        width, height, _ = self._size(body, spec)
        quality = _QUALITY_ALIASES.get(body.quality or "auto", body.quality or "auto")
        steps = body.num_inference_steps or spec.quality_steps.get(quality) or spec.steps
        if steps > s.max_steps:
            raise APIError(400, f"num_inference_steps must be at most {s.max_steps}, got {steps}",
                           param="num_inference_steps", code="invalid_value")
        guidance = body.guidance_scale if body.guidance_scale is not None else body.true_cfg_scale
        if guidance is None:
            guidance = spec.guidance
        if guidance > s.max_guidance:
            param = "guidance_scale" if body.guidance_scale is not None else "true_cfg_scale"
            raise APIError(400, f"{param} must be at most {s.max_guidance:g}, got {guidance:g}", param=param,
                           code="invalid_value")
        max_len = body.max_sequence_length or spec.max_sequence_length
        if max_len > spec.max_sequence_length_limit:
            raise APIError(400, f"max_sequence_length cannot be greater than {spec.max_sequence_length_limit} for "
                                f"{spec.key} but is {max_len}", param="max_sequence_length", code="invalid_value")
        if body.negative_prompt is not None and len(body.negative_prompt) > s.max_prompt_chars:
            raise APIError(400, "negative_prompt is too long", param="negative_prompt", code="prompt_too_long")
        seed = body.seed if body.seed is not None else pick_seed()
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(n)]
        allow_fallback = s.allow_fallback if body.allow_fallback is None else body.allow_fallback
        params = GenerationParams(spec.key, width, height, steps, float(guidance), max_len, allow_fallback)
        return Job(spec=spec, params=params, prompt=body.prompt, seeds=seeds, negative_prompt=body.negative_prompt,
                   id=request_id, want_previews=want_previews)

    def output_options(self, body: ImageGenerationRequest, base_url: str) -> OutputOptions:
        fmt = body.output_format or "png"
        return OutputOptions(
            response_format=body.response_format or "b64_json", output_format=fmt,
            compression=body.output_compression,
            store_local=self.settings.store_local if body.store_local is None else body.store_local,
            write_metadata=body.write_metadata,
            quality=body.quality or "auto",
            base_url=(self.settings.public_url or base_url).rstrip("/"),
            ignored=body.ignored_fields(), partial_images=body.partial_images or 0, user=body.user,
            request_started=time.perf_counter(),
        )

    # --- running ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if self.runtime.scheduler.get(job.id) is not None:
            raise APIError(409, f"request_id {job.id!r} is already in use", param="request_id",
                           code="duplicate_request_id")
        return self.runtime.submit(job)

    async def wait(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Wait for the job without blocking the loop; a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def listener(event: dict[str, Any]) -> None:
            if event["type"] in ("succeeded", "failed", "cancelled"):
                loop.call_soon_threadsafe(done.set)

        job.add_listener(listener)
        if job.done:
            return
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=0.1)
            except TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    self.runtime.scheduler.cancel(job.id)
                    log.info("client disconnected; job cancelled", extra={"ctx": {"request_id": job.id}})
                    await asyncio.wait_for(done.wait(), timeout=None)

    async def finalize(self, job: Job, options: OutputOptions) -> ImagesResponse:
        """Turn a finished job into the response, encoding and saving off the event loop."""
        if job.status is not JobStatus.SUCCEEDED or job.result is None:
            raise job.error or JobError("the job did not finish", code="internal_error", status=500)
        loop = asyncio.get_running_loop()
        stages = self._timing(job)  # shared by every image of the job
        items = await asyncio.gather(*(
            loop.run_in_executor(self.runtime.encoder, self._finish_image, job, index, pixels, options, stages)
            for index, pixels in enumerate(job.result.images)
        ))
        result = job.result
        response = ImagesResponse(
            created=job.created, data=list(items), output_format=options.output_format,
            size=f"{result.params.width}x{result.params.height}", quality=options.quality,
            ignored_fields=options.ignored,
        )
        total = time.perf_counter() - options.request_started
        for item in response.data:
            item.timing["total"] = round(total, 6)
        timing = dict(response.data[0].timing) if response.data else {}
        self.runtime.metrics.observe_generation(job.spec.key, len(response.data), timing, fallback_reason=(
            result.fallback_reason or "unknown") if result.fallback_applied else None, task=job.params.task)
        ctx: dict[str, Any] = {"request_id": job.id, "model": job.spec.key, "outcome": "succeeded",
                               "images": len(response.data), "device": job.device,
                               "params": result.params.__dict__, "seeds": result.seeds, "timings": timing,
                               "batch_size": result.batch_size, "user": options.user}
        if result.fallback_applied:
            ctx["fallback_reason"] = result.fallback_reason
        if self.settings.log_prompts:
            ctx["prompt"] = job.prompt
        log.info("generation finished", extra={"ctx": ctx})
        # Finished jobs stay listed for FLUX_JOB_TTL: keep their images only where a client will poll for them
        # (async jobs), and never the raw pixels (a 1024² image would otherwise hold ~7 MB for an hour).
        job.payload = response if "options" in job.metadata else None
        result.images = []
        return response

    def _timing(self, job: Job) -> dict[str, float]:
        """Stage timings; model_load is split out of queue_wait when the job waited for a load."""
        result = job.result
        assert result is not None
        queue_wait = job.queue_wait
        model_load = 0.0
        loaded = self.runtime.model_info(job.spec.key).get(job.device or "")
        if loaded is not None and loaded.loaded_at > job.enqueued_at:  # only the part of the load it waited for
            overlap = loaded.loaded_at - max(job.enqueued_at, loaded.loaded_at - loaded.load_seconds)
            model_load = min(queue_wait, max(0.0, overlap))
            queue_wait -= model_load
        timing = {"queue_wait": queue_wait, "model_load": model_load, **result.timings}
        return timing

    def _finish_image(self, job: Job, index: int, pixels: np.ndarray, options: OutputOptions,
                      stages: dict[str, float]) -> ImageData:
        result = job.result
        assert result is not None
        timing = dict(stages)
        started = time.perf_counter()
        data = encode_image(pixels, options.output_format,  # type: ignore[arg-type]
                            compression=options.compression, png_level=self.settings.png_compress_level)
        timing["image_encode"] = time.perf_counter() - started
        p = result.params
        seed = result.seeds[index]
        params = ImageParams(
            height=p.height, width=p.width, num_inference_steps=p.steps, guidance_scale=p.guidance,
            max_sequence_length=p.max_sequence_length, seed=seed, negative_prompt=job.negative_prompt,
            fallback_applied=result.fallback_applied, fallback_reason=result.fallback_reason,
            original_params=(
                {"height": result.original_params.height, "width": result.original_params.width,
                 "num_inference_steps": result.original_params.steps}
                if result.original_params is not None else None),
            task=p.task if p.task != "generate" else None, strength=p.strength,
        )
        plan = job.metadata.get("device_plan")  # set for jobs a Ray replica ran (fluxserve.distributed)
        if plan is None:
            engines = self.runtime.scheduler.engines
            plan = next((e.plan for e in engines if e.device == job.device), engines[0].plan)
        saved_path = metadata_path = None
        started = time.perf_counter()
        if options.store_local:
            metadata = None
            if options.write_metadata:
                metadata = {
                    "prompt": job.prompt, "negative_prompt": job.negative_prompt, "model": job.spec.source,
                    "model_key": job.spec.key, "device": plan.device, "dtype": plan.dtype,
                    "params": params.model_dump(), "seed": seed, "request_id": job.id,
                    "created": job.created, "batch_size": result.batch_size, "timing": timing,
                    "format": options.output_format,
                }
            image_path, meta_path = self.runtime.outputs.save_image(data, _ext(options.output_format), metadata)
            saved_path, metadata_path = str(image_path), (str(meta_path) if meta_path else None)
        timing["save"] = time.perf_counter() - started
        timing["generation"] = sum(result.timings.values())
        timing["pipeline_load"] = timing["model_load"]
        timing["encode"] = timing["image_encode"]
        item = ImageData(
            seed=seed, model=job.spec.source if job.spec.tiny is None else job.spec.key, model_key=job.spec.key,
            device=plan.device, dtype=plan.dtype, params=params,
            timing={k: round(v, 6) for k, v in timing.items()}, batch_size=result.batch_size, request_id=job.id,
            saved_path=saved_path, metadata_path=metadata_path, replica=job.metadata.get("replica"),
        )
        if options.response_format == "url":
            file_id = self.runtime.files.put(data, MEDIA_TYPES[options.output_format], _ext(options.output_format))
            item.url = f"{options.base_url}/v1/images/files/{file_id}.{_ext(options.output_format)}"
        else:
            item.b64_json = to_base64(data)
        return item

    def finalize_in_background(self, job: Job, options: OutputOptions) -> None:
        """For async jobs: encode the images as soon as the job succeeds, so polling returns them."""
        async def run() -> None:
            await self.wait(job)
            if job.status is JobStatus.SUCCEEDED:
                await self.finalize(job, options)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- streaming -------------------------------------------------------------------------------
    async def stream(self, job: Job, options: OutputOptions,
                     is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[dict[str, Any]]:
        """Events for ``stream: true``: progress, partial images, then completed (or an error)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def listener(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job.add_listener(listener)
        size = f"{job.params.width}x{job.params.height}"
        partial_steps = _partial_steps(job.params.steps, options.partial_images)
        partial_total = job.params.steps
        partial_index = 0
        self.submit(job)  # outside the try: a refused job (409/429/503) must not cancel a job it collided with
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.1)
                except TimeoutError:
                    if await is_disconnected():
                        self.runtime.scheduler.cancel(job.id)
                        return
                    continue
                kind = event["type"]
                if kind == "queued":
                    yield {"type": f"{options.event_prefix}.progress", "status": "queued", "step": 0,
                           "total": job.params.steps, "queue_position": event.get("queue_position")}
                elif kind == "started":
                    yield {"type": f"{options.event_prefix}.progress", "status": "running", "step": 0,
                           "total": job.params.steps, "queue_position": 0, "batch_size": event.get("batch_size")}
                elif kind == "progress":
                    if event["total"] != partial_total:  # img2img/inpaint run fewer steps than asked (strength)
                        partial_total = event["total"]
                        partial_steps = _partial_steps(partial_total, options.partial_images)
                    yield {"type": f"{options.event_prefix}.progress", "status": "running", "step": event["step"],
                           "total": event["total"], "queue_position": 0}
                    preview = event.get("preview")
                    if preview is not None and event["step"] in partial_steps:
                        data = await loop.run_in_executor(self.runtime.encoder, encode_image, preview, "png")
                        yield {"type": f"{options.event_prefix}.partial_image", "b64_json": to_base64(data),
                               "partial_image_index": partial_index, "created_at": int(time.time()),
                               "size": size, "quality": options.quality, "background": "opaque",
                               "output_format": "png", "step": event["step"]}
                        partial_index += 1
                elif kind in ("succeeded", "failed", "cancelled"):
                    break
            if job.status is not JobStatus.SUCCEEDED:
                error = job.error or JobError("the job did not finish", code="internal_error", status=500)
                yield {"type": "error", "error": {"message": error.message, "type": "server_error"
                                                  if error.status >= 500 else "invalid_request_error",
                                                  "param": None, "code": error.code}}
                return
            response = await self.finalize(job, options)
            for item in response.data:
                yield {"type": f"{options.event_prefix}.completed", "b64_json": item.b64_json, "url": item.url,
                       "created_at": response.created, "size": response.size, "quality": response.quality,
                       "background": "opaque", "output_format": response.output_format,
                       "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                 "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                       "seed": item.seed, "timing": item.timing, "params": item.params.model_dump(),
                       "request_id": item.request_id, "saved_path": item.saved_path}
        finally:
            if not job.done:
                self.runtime.scheduler.cancel(job.id)


def _partial_steps(total: int, partial_images: int) -> set[int]:
    """Which steps emit a partial image: evenly spaced, never the last step (that is the final image)."""
    if partial_images <= 0 or total <= 1:
        return set()
    count = min(partial_images, total - 1)
    return {max(1, round(total * (i + 1) / (count + 1))) for i in range(count)}


def _ext(fmt: str) -> str:
    return "jpg" if fmt == "jpeg" else fmt
