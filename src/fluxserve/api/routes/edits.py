"""Edit routes: ``POST /v1/images/edits`` (plain, streamed, async) and ``POST /v1/images/variations``.

Thin: read the body (multipart as OpenAI's SDKs send it, or JSON with data URLs), build the job with
:class:`~fluxserve.api.editing.EditService` off the event loop (decoding images is CPU work), then run it
with the generations' machinery. Job status, events, cancel and files are the generations' routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from fluxserve.api.editing import EditService, Upload
from fluxserve.api.jobs import KIND_EDIT, AsyncJobs, Submission
from fluxserve.api.protocol import ERROR_RESPONSES, ImageEditRequest, ImagesResponse, ImageVariationRequest
from fluxserve.api.routes.common import (
    SSE_RESPONSES,
    client_label,
    disconnected,
    event_stream,
    images_json,
    owner,
)
from fluxserve.api.routes.images import refuse_webhook
from fluxserve.api.serving import ImageService

router = APIRouter(responses=ERROR_RESPONSES)


def _body_doc(model: type[Any], files: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI request body: the JSON model, and the same fields as multipart with file parts."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    multipart = {"type": "object", "properties": {**schema.get("properties", {}), **files}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": multipart}, "application/json": {"schema": schema}}}}


_FILE = {"type": "string", "format": "binary"}
_EDIT_DOC = _body_doc(ImageEditRequest, {"image": _FILE, "image[]": {"type": "array", "items": _FILE}, "mask": _FILE})
_VARIATION_DOC = _body_doc(ImageVariationRequest, {"image": _FILE})


def _services(request: Request) -> tuple[ImageService, EditService]:
    return request.app.state.images, request.app.state.edits


async def _run(request: Request, body: ImageEditRequest, uploads: list[Upload], mask: Upload | None, *,
               variation: bool = False, background: bool = False) -> Any:
    images, edits = _services(request)
    label = client_label(request, body)
    stream = body.stream and not background
    partials = (body.partial_images or 0) if stream else 0  # only a stream delivers partial images
    job = await asyncio.get_running_loop().run_in_executor(
        images.runtime.encoder, lambda: edits.build_job(body, uploads, mask, label, partial_images=partials,
                                                        variation=variation, owner=owner(request)))
    request.state.model = job.spec.key
    request.state.job_id = job.id
    job.metadata["trace_id"] = request.state.request_id  # log lines of the job carry the request's id
    options = images.output_options(body, str(request.base_url))
    options.event_prefix = "image_edit" if not variation else "image_variation"
    headers = {"X-Job-ID": job.id}
    if background:
        jobs: AsyncJobs = request.app.state.jobs
        status = await jobs.submit(Submission(job, options, body, kind=KIND_EDIT, inputs=uploads, mask=mask,
                                              webhook_url=body.webhook_url))
        return JSONResponse(status, status_code=202, headers={**headers, "Location": f"/v1/images/jobs/{job.id}"})
    refuse_webhook(body)
    if stream:  # a full queue or a shutdown is a 429/503 here, not a broken stream
        return event_stream(await images.open_stream(job, options, disconnected(request)), headers)
    images.submit(job)
    if not await images.wait(job, disconnected(request)()):
        return Response(status_code=499)  # nobody reads it; logs and metrics say what happened
    response = await images.finalize(job, options)
    return images_json(response, headers)


async def _edit_body(request: Request) -> tuple[ImageEditRequest, list[Upload], Upload | None]:
    from fluxserve.api.editing import read_body

    return await read_body(request, ImageEditRequest, request.app.state.http.max_input_bytes)


@router.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="Edit images (OpenAI-compatible): img2img, inpainting with a mask, instruction edits",
             responses=SSE_RESPONSES, openapi_extra=_EDIT_DOC)
async def create_edit(request: Request) -> Any:
    """Edit `image` (or `image[]`) following `prompt`; with `mask`, only its transparent area changes.
    With `stream: true`: `image_edit.partial_image`, `image_edit.completed` (or `error`); `stream_progress`
    (a form field `stream_progress=true` in multipart) adds `image_edit.progress` events."""
    body, uploads, mask = await _edit_body(request)
    return await _run(request, body, uploads, mask)


@router.post("/v1/images/edits/jobs", status_code=202, summary="Queue an edit and return at once",
             openapi_extra=_EDIT_DOC)
async def create_edit_job(request: Request) -> Any:
    """As /v1/images/edits, answered at once with the job; poll `GET /v1/images/jobs/{id}`."""
    body, uploads, mask = await _edit_body(request)
    return await _run(request, body, uploads, mask, background=True)


@router.post("/v1/images/variations", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="Variations of one image (OpenAI's dall-e-2 endpoint): img2img with no prompt",
             openapi_extra=_VARIATION_DOC)
async def create_variation(request: Request) -> Any:
    from fluxserve.api.editing import read_body

    _, edits = _services(request)
    body, uploads, _mask = await read_body(request, ImageVariationRequest,
                                           request.app.state.http.max_input_bytes, max_images=1)
    return await _run(request, edits.variation_as_edit(body), uploads, None, variation=True)
