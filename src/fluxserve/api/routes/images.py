"""Image routes: generations (plain and streamed), async jobs, cancel, files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from fluxserve.api.errors import APIError
from fluxserve.api.jobs import AsyncJobs, Submission
from fluxserve.api.protocol import ERROR_RESPONSES, CancelRequest, ImageGenerationRequest, ImagesResponse
from fluxserve.api.routes.common import (
    SSE_RESPONSES,
    client_label,
    disconnected,
    event_stream,
    images_json,
    owner,
)
from fluxserve.api.serving import ImageService

router = APIRouter(responses=ERROR_RESPONSES)
_IMAGE: dict[int | str, dict[str, Any]] = {200: {"content": {
    media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/png", "image/jpeg", "image/webp")}}}


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
    refuse_webhook(body)
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
    return images_json(response, headers)


def _jobs(request: Request) -> AsyncJobs:
    jobs: AsyncJobs = request.app.state.jobs
    return jobs


def refuse_webhook(body: ImageGenerationRequest) -> None:
    """``webhook_url`` belongs to async jobs: a client waiting for its answer is told so, not ignored."""
    if body.webhook_url is not None:
        raise APIError(400, "webhook_url is for async jobs: send the request to /v1/images/jobs (or "
                            "/v1/images/edits/jobs)", param="webhook_url", code="unsupported_parameter")


@router.post("/v1/images/jobs", status_code=202, summary="Queue a generation and return at once")
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    """Queue a generation; poll `GET /v1/images/jobs/{id}`, follow `/events`, or name a `webhook_url` to be
    told when it ends. Jobs outlive a restart of the server (see docs/durability.md)."""
    service = _service(request)
    # No partial images: nothing would deliver them (the job's events carry its progress only).
    job = service.build_job(body, request_id=client_label(request, body), owner=owner(request))
    request.state.model = job.spec.key
    request.state.job_id = job.id
    job.metadata["trace_id"] = request.state.request_id  # log lines of the job carry the request's id
    options = service.output_options(body, str(request.base_url))
    status = await _jobs(request).submit(Submission(job, options, body, webhook_url=body.webhook_url))
    return JSONResponse(status, status_code=202, headers={"X-Job-ID": job.id,
                                                          "Location": f"/v1/images/jobs/{job.id}"})


@router.get("/v1/images/jobs/{job_id}", summary="Status and, when done, the result of a job")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    return JSONResponse(await _jobs(request).status(job_id, owner(request), str(request.base_url)))


@router.delete("/v1/images/jobs/{job_id}", summary="Cancel a job")
async def delete_job(job_id: str, request: Request) -> JSONResponse:
    return JSONResponse(await _jobs(request).cancel(job_id, owner(request)))


@router.get("/v1/images/jobs/{job_id}/events", summary="Server-sent events of a job's progress",
            responses=SSE_RESPONSES)
async def job_events(job_id: str, request: Request, after: int | None = None) -> StreamingResponse:
    """The job's status, then its events until it ends. Each stored event carries an `id:`; a client that
    reconnects with `Last-Event-ID` (or `?after=`) gets the events after that one."""
    last = after
    header = request.headers.get("last-event-id")
    if last is None and header is not None:
        try:
            last = int(header)
        except ValueError:
            raise APIError(400, "invalid 'Last-Event-ID': must be the id of an event of this job",
                           param="Last-Event-ID", code="invalid_value") from None
    if last is not None and last < 0:
        raise APIError(400, "invalid 'after': must be 0 or more", param="after", code="invalid_value")
    return event_stream(await _jobs(request).events(job_id, owner(request), last or 0))


@router.get("/v1/images/jobs/{job_id}/files/{name}", summary="Download one image of a finished job",
            responses=_IMAGE)
async def get_job_file(job_id: str, name: str, request: Request) -> Response:
    data, media_type = await _jobs(request).result_file(job_id, name, owner(request))
    return Response(data, media_type=media_type,
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


@router.post("/v1/images/cancel", summary="Cancel a job by request_id (the earlier web client's Cancel)")
async def cancel(body: CancelRequest, request: Request) -> JSONResponse:
    ended = await _jobs(request).cancel_by_label(body.request_id, owner(request))
    return JSONResponse({"ok": True, "request_id": body.request_id, **ended})


@router.get("/v1/images/files/{name}", summary="Download an image returned with response_format=url",
            responses=_IMAGE)
async def get_file(name: str, request: Request) -> Response:
    stored = _service(request).runtime.files.get(name, owner(request))
    if stored is None:
        raise APIError(404, "no such file (unknown id, or expired after FLUX_FILE_TTL)", param="name",
                       code="file_not_found")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
