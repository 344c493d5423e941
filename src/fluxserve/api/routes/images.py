"""Image routes: generations (plain and streamed), async jobs, cancel, files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from fluxserve.api.errors import APIError, sanitize
from fluxserve.api.protocol import (
    ERROR_RESPONSES,
    CancelRequest,
    ImageGenerationRequest,
    ImagesResponse,
    public_model_source,
)
from fluxserve.api.serving import ImageService
from fluxserve.scheduler.jobs import FINISHED, Job, JobStatus

router = APIRouter(responses=ERROR_RESPONSES)
# Documented non-JSON answers. One SSE event: ``data`` is a JSON object, the last one ``[DONE]``.
_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}}}
_IMAGE: dict[int | str, dict[str, Any]] = {200: {"content": {
    media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/png", "image/jpeg", "image/webp")}}}


def _public(data: dict[str, Any]) -> dict[str, Any]:
    """A job's status or event as clients see it: error messages without paths or addresses (the log
    keeps them)."""
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        data["error"] = {**error, "message": sanitize(error["message"])}
    if isinstance(data.get("message"), str):
        data["message"] = sanitize(data["message"])
    if isinstance(data.get("model"), str):
        data["model"] = public_model_source(data["model"])
    return data


def _service(request: Request) -> ImageService:
    return request.app.state.images


def _job_id(request: Request, body: ImageGenerationRequest) -> str:
    """The client's request_id, else its X-Request-ID (validated by the middleware), else a new id."""
    return body.request_id or request.state.request_id


def _sse(events: AsyncIterator[dict[str, Any]], *first: dict[str, Any]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for event in first:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return gen()


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="Generate images (OpenAI-compatible)", responses=_SSE)  # (stream: true)
async def create_images(body: ImageGenerationRequest, request: Request) -> Any:
    """Generate `n` images for a prompt. With `stream: true` the answer is server-sent events:
    `image_generation.progress` (queue position, step/total), `image_generation.partial_image`
    (cheap latent previews, `partial_images` of them) and `image_generation.completed`."""
    service = _service(request)
    job = service.build_job(body, _job_id(request, body), want_previews=body.stream and bool(body.partial_images))
    request.state.model = job.spec.key
    request.state.job_id = job.id
    options = service.output_options(body, str(request.base_url))
    headers = {"X-Request-ID": job.id}
    if body.stream:
        events = service.stream(job, options, request.is_disconnected)
        first = await anext(events)  # submits the job: a full queue or a shutdown is a 429/503, not a broken stream
        return StreamingResponse(_sse(events, first), media_type="text/event-stream", headers=headers)
    service.submit(job)
    await service.wait(job, request.is_disconnected)
    response = await service.finalize(job, options)
    return JSONResponse(response.model_dump(exclude_none=True), headers=headers)


@router.post("/v1/images/jobs", status_code=202, summary="Queue a generation and return at once")
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    service = _service(request)
    job = service.build_job(body, _job_id(request, body), want_previews=bool(body.partial_images))
    request.state.model = job.spec.key
    job.metadata["options"] = service.output_options(body, str(request.base_url))
    service.submit(job)
    service.finalize_in_background(job, job.metadata["options"])
    return JSONResponse(_public(job.summary()), status_code=202, headers={"X-Request-ID": job.id,
                                                                "Location": f"/v1/images/jobs/{job.id}"})


async def _wait_finished(job: Job, timeout: float = 5.0) -> None:
    """Wait for a cancelled job to settle (at most one denoising step) without blocking the event loop."""
    await asyncio.get_running_loop().run_in_executor(None, job.wait, timeout)


def _get_job(request: Request, job_id: str) -> Job:
    job = _service(request).runtime.scheduler.get(job_id)
    if job is None:
        raise APIError(404, f"no job with id {job_id!r} (unknown, or expired after FLUX_JOB_TTL)",
                       param="id", code="job_not_found")
    return job


@router.get("/v1/images/jobs/{job_id}", summary="Status and, when done, the result of a job")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    job = _get_job(request, job_id)
    data = _public(job.summary())
    if job.status is JobStatus.SUCCEEDED and job.payload is not None:
        data["result"] = job.payload.model_dump(exclude_none=True)
    elif job.status is JobStatus.SUCCEEDED and "options" in job.metadata:
        data["status"] = "running"  # images are still being encoded
    return JSONResponse(data)


@router.delete("/v1/images/jobs/{job_id}", summary="Cancel a job")
async def delete_job(job_id: str, request: Request) -> JSONResponse:
    job = _get_job(request, job_id)
    if job.status in FINISHED:
        raise APIError(409, f"job {job_id!r} already {job.status.value}", param="id", code="job_finished")
    _service(request).runtime.scheduler.cancel(job_id)
    await _wait_finished(job)
    return JSONResponse(_public(job.summary()))


@router.get("/v1/images/jobs/{job_id}/events", summary="Server-sent events of a job's progress", responses=_SSE)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    import asyncio

    job = _get_job(request, job_id)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def listener(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, _public({k: v for k, v in event.items() if k != "preview"}))

    job.add_listener(listener)

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"type": "status", **_public(job.summary())}
            while job.status not in FINISHED or not queue.empty():
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event["type"] in ("succeeded", "failed", "cancelled"):
                    return
        finally:
            job.remove_listener(listener)

    return StreamingResponse(_sse(events()), media_type="text/event-stream")


@router.post("/v1/images/cancel", summary="Cancel a job by request_id (the earlier web client's Cancel)")
async def cancel(body: CancelRequest, request: Request) -> JSONResponse:
    job = _service(request).runtime.scheduler.cancel(body.request_id)
    if job is None:
        raise APIError(404, f"no queued or running job with request_id {body.request_id!r}", param="request_id",
                       code="job_not_found")
    await _wait_finished(job)
    return JSONResponse({"ok": True, "request_id": body.request_id, "status": job.status.value})


@router.get("/v1/images/files/{name}", summary="Download an image returned with response_format=url",
            responses=_IMAGE)
async def get_file(name: str, request: Request) -> Response:
    stored = _service(request).runtime.files.get(name)
    if stored is None:
        raise APIError(404, "no such file (unknown id, or expired after FLUX_FILE_TTL)", param="name",
                       code="file_not_found")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
