"""Image routes: generations (plain and streamed), async jobs, cancel, files."""

from __future__ import annotations

import asyncio
import contextlib
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
from fluxserve.api.routes.common import SSE_RESPONSES, client_label, disconnected, event_stream, owner
from fluxserve.api.serving import ImageService, until_gone
from fluxserve.scheduler.jobs import Job, JobStatus

router = APIRouter(responses=ERROR_RESPONSES)
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
    service: ImageService = request.app.state.images
    return service


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="Generate images (OpenAI-compatible)", responses=SSE_RESPONSES)  # (stream: true)
async def create_images(body: ImageGenerationRequest, request: Request) -> Any:
    """Generate `n` images for a prompt. With `stream: true` the answer is OpenAI's server-sent events:
    `image_generation.partial_image` (`partial_images` of them, at the requested size), then
    `image_generation.completed` per image (or `error`). `stream_progress: true` adds
    `image_generation.progress` events (queue position, step/total)."""
    service = _service(request)
    job = service.build_job(body, request_id=client_label(request, body), owner=owner(request),
                            partial_images=(body.partial_images or 0) if body.stream else 0)
    request.state.model = job.spec.key
    request.state.job_id = job.id
    job.metadata["trace_id"] = request.state.request_id  # log lines of the job carry the request's id
    options = service.output_options(body, str(request.base_url))
    headers = {"X-Job-ID": job.id}
    if body.stream:  # a full queue or a shutdown is a 429/503 here, not a broken stream
        return event_stream(await service.open_stream(job, options, disconnected(request)), headers)
    service.submit(job)
    if not await service.wait(job, disconnected(request)()):
        request.state.outcome = "client_disconnected"
        return Response(status_code=499)  # nobody reads it; logs and metrics say what happened
    response = await service.finalize(job, options)
    return JSONResponse(response.model_dump(exclude_none=True), headers=headers)


@router.post("/v1/images/jobs", status_code=202, summary="Queue a generation and return at once")
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    service = _service(request)
    # No partial images: nothing would deliver them (the job's events carry its progress only).
    job = service.build_job(body, request_id=client_label(request, body), owner=owner(request))
    request.state.model = job.spec.key
    request.state.job_id = job.id
    job.metadata["trace_id"] = request.state.request_id  # log lines of the job carry the request's id
    job.metadata["keep_result"] = True
    options = service.output_options(body, str(request.base_url))
    service.submit(job)
    service.finalize_in_background(job, options)
    return JSONResponse(_public(job.summary()), status_code=202, headers={"X-Job-ID": job.id,
                                                                "Location": f"/v1/images/jobs/{job.id}"})


async def _settled(job: Job, timeout: float = 5.0) -> None:
    """Wait (bounded) for a cancelled job to end: at once when queued, within one step when running."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.done(), timeout)


def _get_job(request: Request, job_id: str) -> Job:
    job = _service(request).runtime.scheduler.table.get(job_id, owner(request))
    if job is None:
        raise APIError(404, f"no job with id {job_id[:64]!r} (unknown, or expired after FLUX_JOB_TTL)",
                       param="id", code="job_not_found")
    return job


@router.get("/v1/images/jobs/{job_id}", summary="Status and, when done, the result of a job")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    table = _service(request).runtime.scheduler.table
    job = table.get(job_id, owner(request))
    if job is None:
        stone = table.tombstone(job_id, owner(request))
        if stone is None:
            _get_job(request, job_id)  # raises the 404
            raise AssertionError
        if stone.result_expired:
            raise APIError(410, f"the result of job {job_id!r} has expired (FLUX_JOB_TTL / FLUX_RESULTS_MAX_BYTES)",
                           param="id", code="result_expired")
        return JSONResponse(_public(dict(stone.summary)))
    data = _public(job.summary())
    if job.status is JobStatus.SUCCEEDED:
        stored = table.result(job)
        if stored is not None:
            data["result"] = stored.payload
        else:
            data["status"] = "running"  # images are still being encoded
    return JSONResponse(data)


@router.delete("/v1/images/jobs/{job_id}", summary="Cancel a job")
async def delete_job(job_id: str, request: Request) -> JSONResponse:
    job = _get_job(request, job_id)
    if job.finished:
        raise APIError(409, f"job {job_id!r} already {job.status.value}", param="id", code="job_finished")
    _service(request).runtime.scheduler.cancel(job_id)
    await _settled(job)
    return JSONResponse(_public(job.summary()))


@router.get("/v1/images/jobs/{job_id}/events", summary="Server-sent events of a job's progress",
            responses=SSE_RESPONSES)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    job = _get_job(request, job_id)
    gone_after = disconnected(request)

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "status", **_public(job.summary())}
        async with job.subscribe() as subscription:
            gone = asyncio.ensure_future(gone_after())
            try:
                async with contextlib.aclosing(until_gone(subscription, gone)) as followed:
                    async for event in followed:  # ends after the terminal event, or when the client leaves
                        yield _public({k: v for k, v in event.items() if k != "preview"})
            finally:
                gone.cancel()

    return event_stream(events())


@router.post("/v1/images/cancel", summary="Cancel a job by request_id (the earlier web client's Cancel)")
async def cancel(body: CancelRequest, request: Request) -> JSONResponse:
    service = _service(request)
    table = service.runtime.scheduler.table
    job = table.find(body.request_id, owner(request)) or table.get(body.request_id, owner(request))
    if job is None or service.runtime.scheduler.cancel(job.id) is None:
        raise APIError(404, f"no queued or running job with request_id {body.request_id!r}", param="request_id",
                       code="job_not_found")
    await _settled(job)
    return JSONResponse({"ok": True, "request_id": body.request_id, "job_id": job.id, "status": job.status.value})


@router.get("/v1/images/files/{name}", summary="Download an image returned with response_format=url",
            responses=_IMAGE)
async def get_file(name: str, request: Request) -> Response:
    stored = _service(request).runtime.files.get(name, owner(request))
    if stored is None:
        raise APIError(404, "no such file (unknown id, or expired after FLUX_FILE_TTL)", param="name",
                       code="file_not_found")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
