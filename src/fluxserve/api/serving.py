"""The logic behind the image routes: validate → build a job → wait or stream → shape the response.

Heavy work never runs on the event loop: jobs run on the scheduler's device threads, and image
encoding, base64 and saving run on the runtime's encoder thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fluxserve.api.errors import APIError, sanitize
from fluxserve.api.protocol import ImageData, ImageGenerationRequest, ImageParams, ImagesResponse, public_model_source
from fluxserve.config import HttpConfig
from fluxserve.generation import MAX_SEED, GenerationParams, pick_seed, seeds_for
from fluxserve.loras import LoraError, LoraLibrary, resolve_loras
from fluxserve.models.aliases import default_response_format
from fluxserve.models.descriptor import FamilyDescriptor
from fluxserve.models.registry import ModelNotAllowedError, UnknownModelError, family_descriptor
from fluxserve.models.spec import ModelSpec
from fluxserve.scheduler.jobs import TERMINAL_EVENTS, Job, JobError, JobStatus
from fluxserve.storage.budgets import StoreFull
from fluxserve.storage.images import MEDIA_TYPES, encode_image, to_base64
from fluxserve.storage.outputs import new_stem, save_error_code, sidecar_json
from fluxserve.storage.results.protocol import ResultStore, ResultStoreUnavailable

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

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
    stream_progress: bool
    """Streams also carry ``<prefix>.progress`` events (the ``stream_progress`` extension; off: OpenAI's events
    only)."""
    user: str | None
    request_started: float
    background: str | None = None
    """What was produced when the request asked about ``background`` (``opaque``: no model has alpha)."""
    event_prefix: str = "image_generation"
    """Streaming event names: ``image_generation.*`` for generations, ``image_edit.*`` for edits."""
    deliver: bool = True
    """Put the encoded images into the response (``b64_json`` or a ``url``); off for durable jobs, whose images
    go to the result store and are delivered when polled."""


class ImageService:
    def __init__(self, runtime: Runtime, settings: HttpConfig) -> None:
        self.runtime = runtime
        self.settings = settings
        self._background: set[asyncio.Task[None]] = set()
        self.loras = LoraLibrary(self.settings.lora_library_dir)
        self.object_outputs_used = 0
        """Bytes under ``outputs/`` in the object store, as the job service's last listing counted them."""
        self.object_files: ResultStore | None = None
        """With object storage (FLUX_RESULT_STORE=s3): where ``url`` images of synchronous requests go, answered
        with presigned URLs that every replica's clients can fetch (the job service sweeps them by budget)."""

    # --- validation ------------------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> ModelSpec:
        try:
            return self.runtime.resolve(name)
        except ModelNotAllowedError as exc:
            raise APIError(403, str(exc), param="model", code="model_not_allowed") from None
        except UnknownModelError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None

    def _size(self, body: ImageGenerationRequest, spec: ModelSpec) -> tuple[int, int, str]:
        """(width, height, param to blame) from size / width / height."""
        width = height = None
        param = "size"
        if body.size and body.size != "auto":
            match = _SIZE.match(body.size.strip().lower())
            if not match:
                raise APIError(400, f"invalid 'size': must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', "
                                    f"got {body.size[:40]!r}", param="size", code="invalid_size")
            width, height = int(match.group(1)), int(match.group(2))
            if (body.width is not None and body.width != width) or (body.height is not None and body.height != height):
                raise APIError(400, f"invalid 'size': must agree with width and height, got {body.size!r} with "
                                    f"width={body.width} height={body.height}", param="size", code="conflicting_size")
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
                raise APIError(400, f"invalid '{blame}': {name} must be between {s.min_size} and {s.max_size} "
                                    f"pixels, got {value}", param=blame, code="invalid_size")
            if value % m:
                raise APIError(400, f"invalid '{blame}': {name} must be a multiple of {m} for {spec.key}, got "
                                    f"{value} (nearest: {max(m, value // m * m)})", param=blame, code="invalid_size")
        if width * height > s.max_pixels:
            raise APIError(400, f"invalid '{param}': must be at most {s.max_pixels} pixels (FLUX_MAX_PIXELS), got "
                                f"{width}x{height} = {width * height}", param=param, code="invalid_size")
        return width, height, param

    def build_job(self, body: ImageGenerationRequest, *, request_id: str | None = None, owner: str | None = None,
                  partial_images: int = 0, input_images: int = 0) -> Job:
        """Validate the request and build its job. ``partial_images``: how many the engine makes for it (a
        stream's ``partial_images``; 0 where nothing would deliver them). ``input_images``: how many images an
        edit encodes (counted in the compute budget)."""
        s = self.settings
        if len(body.prompt) > s.max_prompt_chars:
            raise APIError(400, f"invalid 'prompt': must be at most {s.max_prompt_chars} characters, got "
                                f"{len(body.prompt)}", param="prompt", code="prompt_too_long")
        if not body.prompt.strip():
            raise APIError(400, "invalid 'prompt': must not be blank, got only whitespace", param="prompt",
                           code="invalid_value")
        spec = self.resolve_model(body.model)
        n = body.n or 1
        if n > s.max_images_per_request:
            raise APIError(400, f"invalid 'n': must be between 1 and {s.max_images_per_request}, got {n}", param="n",
                           code="invalid_value")
        if body.background == "transparent" and not spec.alpha:
            raise APIError(400, f"invalid 'background': {spec.key} cannot produce transparent images (send "
                                "'opaque' or 'auto'), got 'transparent'", param="background", code="unsupported_value")
        width, height, _ = self._size(body, spec)
        quality = _QUALITY_ALIASES.get(body.quality or "auto", body.quality or "auto")
        steps = body.num_inference_steps or spec.quality_steps.get(quality) or spec.steps
        if steps > s.max_steps:
            raise APIError(400, f"invalid 'num_inference_steps': must be at most {s.max_steps}, got {steps}",
                           param="num_inference_steps", code="invalid_value")
        guidance = body.guidance_scale if body.guidance_scale is not None else body.true_cfg_scale
        if guidance is None:
            guidance = spec.guidance
        if guidance > s.max_guidance:
            param = "guidance_scale" if body.guidance_scale is not None else "true_cfg_scale"
            raise APIError(400, f"invalid '{param}': must be at most {s.max_guidance:g}, got {guidance:g}",
                           param=param, code="invalid_value")
        max_len = body.max_sequence_length or spec.max_sequence_length
        if max_len > spec.max_sequence_length_limit:
            raise APIError(400, f"invalid 'max_sequence_length': must be at most {spec.max_sequence_length_limit} "
                                f"for {spec.key}, got {max_len}", param="max_sequence_length", code="invalid_value")
        if body.negative_prompt is not None and len(body.negative_prompt) > s.max_prompt_chars:
            raise APIError(400, f"invalid 'negative_prompt': must be at most {s.max_prompt_chars} characters, got "
                                f"{len(body.negative_prompt)}", param="negative_prompt", code="prompt_too_long")
        # Exact seeds, all below 2**53 (JavaScript reads them exactly): a client's is used as sent (the request
        # refuses larger ones); image i uses (seed + i) mod 2**53; a random one leaves room for seed + n - 1.
        seed = body.seed if body.seed is not None else pick_seed() % (MAX_SEED + 2 - n)
        seeds = seeds_for(seed, n)
        allow_fallback = s.allow_fallback if body.allow_fallback is None else body.allow_fallback
        loras = self.resolve_loras(body, spec)
        params = GenerationParams(spec.key, width, height, steps, float(guidance), max_len, allow_fallback,
                                  loras=loras)
        check_compute_budget(body, params, n, family_descriptor(spec.family), budget=s.max_megapixel_steps,
                             vae_megapixel_cost=s.vae_megapixel_cost, input_images=input_images)
        return Job(spec=spec, params=params, prompt=body.prompt, seeds=seeds, negative_prompt=body.negative_prompt,
                   request_id=request_id, owner=owner, partial_images=partial_images)

    def resolve_loras(self, body: ImageGenerationRequest, spec: ModelSpec) -> tuple[tuple[str, float], ...]:
        """The request's adapter set (sorted by name: part of the batching key); 404/400 naming ``loras``."""
        if not body.loras:
            return ()
        s = self.settings
        unavailable = None
        if s.quantize == "fp8":
            unavailable = "LoRA adapters are not available with FLUX_QUANTIZE=fp8 (the fp8 linears take no adapters)"
        try:
            return resolve_loras(self.loras, [(ref.name, ref.scale) for ref in body.loras], model_key=spec.key,
                                 family=spec.family, max_count=s.max_loras_per_request,
                                 max_scale=s.lora_max_scale, unavailable=unavailable)
        except LoraError as exc:
            raise APIError(exc.status, exc.message, param="loras", code=exc.code) from None

    def output_options(self, body: ImageGenerationRequest, base_url: str) -> OutputOptions:
        fmt = body.output_format or "png"
        return OutputOptions(
            response_format=body.response_format or default_response_format(
                body.model, self.settings.default_response_format), output_format=fmt,
            compression=body.output_compression if fmt != "png" else None,  # PNG: FLUX_PNG_COMPRESS_LEVEL
            store_local=self.settings.store_local if body.store_local is None else body.store_local,
            write_metadata=body.write_metadata,
            quality=body.quality or "auto",
            base_url=(self.settings.public_url or base_url).rstrip("/"),
            ignored=body.ignored_fields(), partial_images=body.partial_images or 0,
            stream_progress=body.stream_progress, user=body.user,
            request_started=time.perf_counter(), background=None if body.background is None else "opaque",
        )

    # --- running ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue the job; JobError (409 duplicate label, 429 full, 503 shutting down) reaches the client."""
        return self.runtime.submit(job)

    async def wait(self, job: Job, disconnected: Awaitable[None] | None = None) -> bool:
        """Wait, without blocking the loop, until the job ends (True) or the client goes away first (False;
        the job is then cancelled and nobody waits for it any more)."""
        finished = asyncio.ensure_future(job.done())
        if disconnected is None:
            await finished
            return True
        gone = asyncio.ensure_future(disconnected)
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
            if finished.done():
                return True
            self.runtime.scheduler.cancel(job.id)
            log.info("client disconnected; job cancelled", extra={"ctx": {"job_id": job.id}})
            return False
        finally:
            finished.cancel()
            gone.cancel()

    async def finalize(self, job: Job, options: OutputOptions) -> ImagesResponse:
        """Turn a finished job into the response, encoding and saving off the event loop."""
        response, _ = await self.render(job, options)
        return response

    async def render(self, job: Job, options: OutputOptions) -> tuple[ImagesResponse, list[bytes]]:
        """The response of a finished job and its encoded images (in the response too unless
        ``options.deliver`` is off)."""
        if job.status is not JobStatus.SUCCEEDED or job.result is None:
            raise job.error or JobError("the job did not finish", code="internal_error", status=500)
        loop = asyncio.get_running_loop()
        stages = self._timing(job)  # shared by every image of the job
        finished = await asyncio.gather(*(
            loop.run_in_executor(self.runtime.encoder, self._finish_image, job, index, pixels, options, stages)
            for index, pixels in enumerate(job.result.images)
        ))
        items = [item for item, _ in finished]
        result = job.result
        response = ImagesResponse(
            created=job.created, data=items, output_format=options.output_format,
            size=f"{result.params.width}x{result.params.height}", quality=options.quality,
            ignored_fields=options.ignored, background=options.background,
        )
        total = time.perf_counter() - options.request_started
        for item in response.data:
            item.timing["total"] = round(total, 6)
            item.duration_ms = round(total * 1000)
        timing = dict(response.data[0].timing) if response.data else {}
        self.runtime.metrics.observe_generation(job.spec.key, len(response.data), timing, fallback_reason=(
            result.fallback_reason or "unknown") if result.fallback_applied else None, task=job.params.task)
        ctx: dict[str, Any] = {"request_id": job.metadata.get("trace_id", job.id), "job_id": job.id,
                               "model": job.spec.key, "outcome": "succeeded",
                               "images": len(response.data), "device": job.device,
                               "params": result.params.__dict__, "seeds": result.seeds, "timings": timing,
                               "batch_size": result.batch_size, "user": options.user}
        if result.fallback_applied:
            ctx["fallback_reason"] = result.fallback_reason
        if self.settings.log_prompts:
            ctx["prompt"] = job.prompt
        log.info("generation finished", extra={"ctx": ctx})
        result.images = []  # the raw pixels are no longer needed (a 1024² image holds ~3 MB)
        return response, [data for _, data in finished]

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

    def _encode(self, pixels: np.ndarray, options: OutputOptions) -> bytes:
        """One image in the requested format and compression."""
        return encode_image(pixels, options.output_format,  # type: ignore[arg-type]
                            compression=options.compression, png_level=self.settings.png_compress_level)

    def _finish_image(self, job: Job, index: int, pixels: np.ndarray, options: OutputOptions,
                      stages: dict[str, float]) -> tuple[ImageData, bytes]:
        result = job.result
        assert result is not None
        timing = dict(stages)
        started = time.perf_counter()
        data = self._encode(pixels, options)
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
            loras=[{"name": name, "scale": scale} for name, scale in p.loras] or None,
        )
        plan = job.metadata.get("device_plan") or self.runtime.plan_for(job.device)  # Ray replicas send theirs
        saved_path = metadata_path = save_error = None
        started = time.perf_counter()
        if options.store_local:
            metadata = None
            if options.write_metadata:
                metadata = {
                    "prompt": job.prompt, "negative_prompt": job.negative_prompt, "model": job.spec.source,
                    "model_key": job.spec.key, "device": plan.device, "dtype": plan.dtype,
                    "params": params.model_dump(), "seed": seed, "request_id": job.request_id, "job_id": job.id,
                    "created": job.created, "batch_size": result.batch_size, "timing": timing,
                    "format": options.output_format,
                }
            if self.object_files is not None:  # object storage: saved images go to the bucket, under outputs/
                saved_path, metadata_path, save_error = self._save_object(job, data, options, metadata)
            else:
                saved_path, metadata_path, save_error = self._save_local(job, data, options, metadata)
        timing["save"] = time.perf_counter() - started
        timing["generation"] = sum(result.timings.values())
        timing["pipeline_load"] = timing["model_load"]
        timing["encode"] = timing["image_encode"]
        item = ImageData(
            seed=seed, model=public_model_source(job.spec.source) if job.spec.tiny is None else job.spec.key,
            model_key=public_model_source(job.spec.key),
            device=plan.device, dtype=plan.dtype, params=params,
            timing={k: round(v, 6) for k, v in timing.items()}, batch_size=result.batch_size,
            request_id=job.request_id or job.id, job_id=job.id, saved_path=saved_path, metadata_path=metadata_path,
            save_error=save_error, replica=job.metadata.get("replica"),
        )
        if not options.deliver:  # a durable job: its images go to the result store, delivered when polled
            return item, data
        if options.response_format == "url" and self.object_files is not None:
            objects = self.object_files
            name = f"{owner_tag(job.owner)}.{secrets.token_urlsafe(18)}.{_ext(options.output_format)}"
            try:
                ref = objects.put(FILES_PREFIX, name, data, MEDIA_TYPES[options.output_format])
            except ResultStoreUnavailable:
                raise APIError(503, "the object store is unavailable; retry later or ask for b64_json",
                               param="response_format", code="result_store_unavailable") from None
            item.url = objects.url(ref.key)
        elif options.response_format == "url":
            try:
                file_id = self.runtime.files.put(data, MEDIA_TYPES[options.output_format],
                                                 _ext(options.output_format), owner=job.owner)
            except StoreFull as exc:  # every other key is within its budget: refuse, never take their files
                raise APIError(507, exc.message, param="response_format", code=exc.code) from None
            item.url = f"{options.base_url}/v1/images/files/{file_id}.{_ext(options.output_format)}"
        else:
            item.b64_json = to_base64(data)
        return item, data

    def _save_local(self, job: Job, data: bytes, options: OutputOptions, metadata: dict[str, Any] | None
                    ) -> tuple[str | None, str | None, str | None]:
        """(saved path, metadata path, save error) of a save under FLUX_OUTPUT_DIR."""
        try:
            image_path, meta_path = self.runtime.outputs.save_image(data, _ext(options.output_format), metadata)
        except (OSError, ValueError) as exc:  # a disk problem never costs the client its image
            log.warning("could not save an image; it is returned without a local copy",
                        extra={"ctx": {"job_id": job.id, "error": f"{type(exc).__name__}: {exc}"}})
            return None, None, save_error_code(exc)
        # relative to FLUX_OUTPUT_DIR: clients never see where the server keeps files (the log does)
        outputs = self.runtime.outputs
        return outputs.relative(image_path), outputs.relative(meta_path) if meta_path else None, None

    def _save_object(self, job: Job, data: bytes, options: OutputOptions, metadata: dict[str, Any] | None
                     ) -> tuple[str | None, str | None, str | None]:
        """The same save in object storage: ``outputs/<date>-<stem>.<ext>`` (and ``.json``), within
        FLUX_OUTPUT_MAX_BYTES as the last listing counted it (saves past it are refused, never older images)."""
        objects = self.object_files
        assert objects is not None
        stem = new_stem()
        sidecar = None if metadata is None else sidecar_json(metadata, f"{stem}.{_ext(options.output_format)}")
        cap = self.runtime.settings.storage.output_max_bytes
        size = len(data) + len(sidecar or b"")
        if cap and self.object_outputs_used + size > cap:
            return None, None, "output_dir_full"
        try:
            ref = objects.put(OUTPUTS_PREFIX, f"{stem}.{_ext(options.output_format)}", data,
                              MEDIA_TYPES[options.output_format])
            meta = objects.put(OUTPUTS_PREFIX, f"{stem}.json", sidecar, "application/json") if sidecar else None
        except ResultStoreUnavailable as exc:
            log.warning("could not save an image to the object store; it is returned without a saved copy",
                        extra={"ctx": {"job_id": job.id, "error": str(exc)}})
            return None, None, "output_store_unavailable"
        self.object_outputs_used += size
        return ref.key, meta.key if meta else None, None

    def finalize_in_background(self, job: Job, options: OutputOptions) -> None:
        """For async jobs: encode the images as soon as the job succeeds and keep them (within the job
        table's budgets) for polling. A failure to encode ends the job as failed, never 'running' forever."""
        table = self.runtime.scheduler.table

        async def run() -> None:
            await job.done()
            if job.status is not JobStatus.SUCCEEDED:
                return
            try:
                response = await self.finalize(job, options)
            except APIError as exc:  # e.g. 507 file_store_full: the job fails with that code
                table.result_failed(job, JobError(exc.message, code=exc.code or "internal_error", status=exc.status))
                return
            except Exception as exc:
                log.exception("could not encode an async job's result", extra={"ctx": {"job_id": job.id}})
                table.result_failed(job, JobError(f"encoding the result failed ({type(exc).__name__})",
                                                  code="internal_error", status=500))
                return
            payload = response.model_dump(exclude_none=True)
            table.store_result(job, payload, _payload_size(payload))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- streaming -------------------------------------------------------------------------------
    async def open_stream(self, job: Job, options: OutputOptions,
                          disconnected: Callable[[], Awaitable[None]]) -> AsyncIterator[dict[str, Any]]:
        """Submit ``job`` and return the events of its ``stream: true`` answer. A refusal (a full queue, a
        duplicate label, a shutdown) raises here, before any byte is sent: the client gets a 429/409/503."""
        events = self._stream(job, options, disconnected)
        submitted = await anext(events)
        assert submitted is _SUBMITTED
        return events

    async def _stream(self, job: Job, options: OutputOptions,
                      disconnected: Callable[[], Awaitable[None]]) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI's events: ``<prefix>.partial_image`` (``partial_images`` of them, at the requested size),
        then ``<prefix>.completed`` per image, or ``error``; ``<prefix>.progress`` events (queue position,
        step/total) only with ``stream_progress``.

        The first item is :data:`_SUBMITTED`, once the job is queued. A client that goes away cancels the job
        at once, whether it is waiting in the queue or running."""
        loop = asyncio.get_running_loop()
        size = f"{job.params.width}x{job.params.height}"
        partial_index = 0
        prefix = options.event_prefix
        progress = options.stream_progress
        async with job.subscribe() as events:  # before submit: no event can be missed
            self.submit(job)
            gone: asyncio.Future[None] | None = None
            try:
                yield _SUBMITTED  # closed here (the answer never started): the finally below cancels the job
                gone = asyncio.ensure_future(disconnected())
                async with contextlib.aclosing(until_gone(events, gone)) as followed:
                    async for event in followed:
                        kind = event["type"]  # every streamed event names its job (for /v1/images/jobs/{id}/events)
                        if kind == "queued" and progress:
                            yield {"type": f"{prefix}.progress", "status": "queued", "step": 0, "job_id": job.id,
                                   "total": job.params.steps, "queue_position": event.get("queue_position")}
                        elif kind == "started" and progress:
                            yield {"type": f"{prefix}.progress", "status": "running", "step": 0, "job_id": job.id,
                                   "total": job.params.steps, "queue_position": 0,
                                   "batch_size": event.get("batch_size")}
                        elif kind == "progress":
                            if progress:
                                yield {"type": f"{prefix}.progress", "status": "running", "step": event["step"],
                                       "job_id": job.id, "total": event["total"], "queue_position": 0}
                            partial = event.get("preview")  # the engine makes them only at the partial steps
                            if partial is not None and partial_index < options.partial_images:
                                data = await loop.run_in_executor(self.runtime.encoder, self._encode, partial, options)
                                yield {"type": f"{prefix}.partial_image", "b64_json": to_base64(data),
                                       "partial_image_index": partial_index, "created_at": int(time.time()),
                                       "size": size, "quality": options.quality, "background": "opaque",
                                       "output_format": options.output_format, "step": event["step"],
                                       "job_id": job.id}
                                partial_index += 1
                        elif kind in TERMINAL_EVENTS:
                            break
                if not job.finished:
                    return  # the client left: the finally below cancels the job
                if job.status is not JobStatus.SUCCEEDED:
                    error = job.error or JobError("the job did not finish", code="internal_error", status=500)
                    yield error_event(error)
                    return
                response = await self.finalize(job, options)
                for item in response.data:
                    yield {"type": f"{prefix}.completed", "b64_json": item.b64_json, "url": item.url,
                           "created_at": response.created, "size": response.size, "quality": response.quality,
                           "background": "opaque", "output_format": response.output_format,
                           "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                     "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                           "seed": item.seed, "timing": item.timing, "params": item.params.model_dump(),
                           "request_id": item.request_id, "job_id": item.job_id, "saved_path": item.saved_path,
                           "save_error": item.save_error, "ignored_fields": response.ignored_fields}
            except Exception as exc:  # never end a stream without telling the client why
                log.exception("stream failed", extra={"ctx": {"job_id": job.id}})
                yield error_event(exc if isinstance(exc, JobError) else JobError(
                    f"the stream failed ({type(exc).__name__})", code="internal_error", status=500))
            finally:
                if gone is not None:
                    gone.cancel()
                if not job.finished:
                    self.runtime.scheduler.cancel(job.id)


_SUBMITTED: dict[str, Any] = {"type": "submitted"}
"""The first item of :meth:`ImageService._stream`: the job is queued (never sent to the client)."""


def error_event(error: JobError) -> dict[str, Any]:
    """An ``error`` stream event in OpenAI's error shape."""
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"message": sanitize(error.message), "type": kind, "param": None,
                                       "code": error.code}}


async def until_gone(events: AsyncIterator[dict[str, Any]], gone: asyncio.Future[None]
                     ) -> AsyncGenerator[dict[str, Any], None]:
    """``events`` until they end or the client goes away, whichever comes first (no polling)."""
    while True:
        upcoming: asyncio.Future[Any] = asyncio.ensure_future(anext(events))
        either: list[asyncio.Future[Any]] = [upcoming, gone]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this generator is being closed or cancelled
            _discard(upcoming)
            raise
        if not upcoming.done():  # the client left first
            _discard(upcoming)
            return
        try:
            event = upcoming.result()
        except StopAsyncIteration:
            return
        yield event


def _discard(task: asyncio.Future[Any]) -> None:
    """A task nobody will await: cancel it if it still runs, and read its outcome either way (no "exception
    was never retrieved" noise)."""
    if task.done():
        if not task.cancelled():
            task.exception()
        return
    task.cancel()
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())


async def wait_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client has gone away. Call only after the request body was read: the server's
    next message is then ``http.disconnect``."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _payload_size(payload: dict[str, Any]) -> int:
    """Bytes an async job's stored result costs (its images dominate; 1 KiB per item for the rest)."""
    return sum(len(item.get("b64_json") or "") + len(item.get("url") or "") + 1024 for item in payload["data"])


TOKENS_PER_MEGAPIXEL_STEP = 4096
"""One megapixel-step of the compute budget: a transformer pass over 4096 tokens (a 1024×1024 image's)."""


def compute_cost(params: GenerationParams, n: int, family: FamilyDescriptor, *, vae_megapixel_cost: float,
                 input_images: int = 0) -> tuple[float, float]:
    """(transformer, VAE) cost of a request in megapixel-steps (the formula of FLUX_MAX_MEGAPIXEL_STEPS):
    n × steps × passes × tokens / 4096, and n × FLUX_VAE_MEGAPIXEL_COST × megapixels × (1 + input images)."""
    tokens = family.transformer_tokens(params.width, params.height, params.max_sequence_length)
    transformer = n * params.steps * family.transformer_passes(params.guidance) * tokens / TOKENS_PER_MEGAPIXEL_STEP
    vae = n * vae_megapixel_cost * params.width * params.height / 1e6 * (1 + input_images)
    return transformer, vae


def check_compute_budget(body: ImageGenerationRequest, params: GenerationParams, n: int, family: FamilyDescriptor, *,
                         budget: float, vae_megapixel_cost: float, input_images: int = 0) -> None:
    """400 ``compute_budget_exceeded`` when the request's cost (:func:`compute_cost`) is over
    FLUX_MAX_MEGAPIXEL_STEPS.

    ``param`` names what the client chose that weighs most: where the transformer dominates, the steps when
    it set them; else (or where the VAE dominates) the size when it set one; else ``n``."""
    transformer, vae = compute_cost(params, n, family, vae_megapixel_cost=vae_megapixel_cost,
                                    input_images=input_images)
    cost = transformer + vae
    if cost <= budget:
        return
    sized = (body.size and body.size != "auto") or body.width is not None or body.height is not None
    if transformer >= vae and body.num_inference_steps is not None:
        param = "num_inference_steps"
    elif sized:
        param = "size" if body.size and body.size != "auto" else ("width" if body.width is not None else "height")
    else:
        param = "n"
    passes = family.transformer_passes(params.guidance)
    raise APIError(400, f"this request costs {cost:.1f} megapixel-steps: n={n} × {params.steps} steps"
                        f"{' × 2 (CFG)' if passes == 2 else ''} over {params.width}x{params.height} = "
                        f"{transformer:.1f} for the transformer, plus {vae:.1f} for the VAE; the budget per request "
                        f"is {budget:g} (FLUX_MAX_MEGAPIXEL_STEPS): lower {param}",
                   param=param, code="compute_budget_exceeded")


OUTPUTS_PREFIX = "outputs"
"""Where saved images (``store_local``) go in an object store."""
FILES_PREFIX = "files"
"""Where ``url`` images of synchronous requests go in an object store: ``files/<owner tag>.<random>.<ext>``."""


def owner_tag(owner: str | None) -> str:
    """The owner as it appears in object names (so budgets per key can be kept from a listing)."""
    return re.sub(r"[^A-Za-z0-9]", "", owner or "")[:40] or "anonymous"


def _ext(fmt: str) -> str:
    return "jpg" if fmt == "jpeg" else fmt
