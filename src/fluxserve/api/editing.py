"""The logic behind /v1/images/edits and /v1/images/variations: read the body (multipart or JSON),
decode and check the images, pick the task, and build a scheduler job.

Running the job (submit, wait, stream, finalize, async jobs) is the generations' machinery in
:class:`fluxserve.api.serving.ImageService`; this module only turns an edit request into a job whose
``GenerationParams`` carry ``task``, ``strength`` and ``inputs`` (a digest of the input pixels) and
whose ``images`` / ``mask`` reach the engine as ``ImageRequest.images`` / ``.mask``.

Batching: ``GenerationParams`` is the batching key and ``inputs`` is part of it, so an edit job shares
a pipeline call only with jobs on byte-identical inputs (same images, same mask, same strength and
size); it never batches with a text-to-image job.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from fluxserve.api.errors import APIError, validation_message
from fluxserve.api.jsontext import JsonRefused, loads_strict
from fluxserve.api.protocol import APIModel, ImageEditRequest, ImageVariationRequest
from fluxserve.api.serving import ImageService
from fluxserve.generation import Task
from fluxserve.models.descriptor import EditModes
from fluxserve.models.registry import BUILTIN_MODELS, FAMILIES
from fluxserve.models.spec import ModelSpec
from fluxserve.scheduler.jobs import Job
from fluxserve.storage.inputs import (
    DecodedImage,
    InputError,
    decode_data_url,
    decode_image,
    inputs_digest,
    mask_from,
    resize_mask,
    resize_rgb,
)

MAX_IMAGE_FIELDS = 16
"""OpenAI's limit on ``image[]``."""
STRENGTH_FOR_FIDELITY = {"high": 0.6, "low": 0.85}
"""img2img/inpaint strength when only ``input_fidelity`` is given (0.6 is diffusers' default too)."""
DEFAULT_STRENGTH = 0.6
"""img2img/inpaint strength when a request gives none and its family declares no ``default_strength``."""
VARIATION_STRENGTH = 0.75


def edit_modes(spec: ModelSpec) -> EditModes | None:
    """What ``spec``'s family does with input images (None: it does not edit, or the family is unknown here)."""
    family = FAMILIES.get(spec.family)
    return family.edit_modes if family is not None else None


def edit_card(spec: ModelSpec) -> dict[str, Any] | None:
    """What /v1/models says about a model's edits (None: it does not edit)."""
    modes = edit_modes(spec)
    if modes is None:
        return None
    return {"without_mask": modes.without_mask, "with_mask": modes.with_mask, "max_images": modes.max_images,
            "masked_by_compositing": modes.masked_by_compositing}


def auto_size(width: int, height: int, *, multiple: int, min_size: int, max_size: int,
              max_pixels: int) -> tuple[int, int]:
    """The output size for an input of ``width`` × ``height`` (``size`` auto): on ``multiple``, scaled with its
    aspect ratio kept to at most ``max_size`` a side and ``max_pixels`` in all, scaled up only as far as
    ``min_size`` needs. Closed form: the same few operations whatever the dimensions (it used to shorten
    the long side one multiple at a time: millions of steps for a 16777216×1 image)."""
    m = multiple
    lo = -(-min_size // m) * m  # the smallest and largest sides on the multiple
    hi = max(lo, max_size // m * m)
    # 1. One scale for both sides: down to the limits, up only to min_size.
    scale = min(1.0, max_size / max(width, height), math.sqrt(max_pixels / (width * height)))
    if min(width, height) * scale < min_size:
        scale = min_size / min(width, height)
    w = min(hi, max(lo, int(width * scale / m + 0.5) * m))
    h = min(hi, max(lo, int(height * scale / m + 0.5) * m))
    if w * h <= max_pixels:
        return w, h
    # 2. Rounding went over max_pixels: shorten the long side to fit; where even a square is too large, the
    #    largest square (or square and one multiple) that fits.
    long, short = max(w, h), min(w, h)
    long = max(short, max_pixels // short // m * m)
    if long * short <= max_pixels:
        return (long, short) if w >= h else (short, long)
    k = min(short, math.isqrt(max_pixels) // m * m)
    w, h = (k, k + m) if k + m <= short and k * (k + m) <= max_pixels else (k, k)
    return max(w, lo), max(h, lo)


@dataclass
class Upload:
    param: str
    """The request field, as errors name it: ``image``, ``image[1]``, ``mask``."""
    data: bytes


@dataclass
class EditBody:
    """A parsed edit request: the fields, and the raw image files still to be decoded."""

    fields: ImageEditRequest
    images: list[Upload]
    mask: Upload | None


def _invalid(exc: ValidationError) -> APIError:
    error = dict(exc.errors()[0])
    loc: tuple[Any, ...] = tuple(exc.errors()[0].get("loc", ()))
    error["loc"] = loc[:1]  # the field itself, not the union member pydantic tried ("mask.str")
    message, param = validation_message(error)
    code = "missing_required_parameter" if error.get("type") == "missing" else "invalid_value"
    return APIError(400, message, param=param, code=code)


def _images(count: int) -> str:
    return f"{count} image" + ("s" if count != 1 else "")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_upload(upload: UploadFile, param: str, max_bytes: int) -> Upload:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(400, f"{param} is larger than {max_bytes} bytes (FLUX_MAX_INPUT_BYTES)", param=param,
                       code="image_too_large")
    return Upload(param, data)


def _no_mask() -> APIError:
    return APIError(400, "variations take no mask (nor do OpenAI's); to change only part of an image, send it "
                         "with its mask to the edits endpoint", param="mask", code="unsupported_value")


async def read_body(request: Request, model: type[APIModel], max_input_bytes: int, *,
                    max_images: int = MAX_IMAGE_FIELDS) -> tuple[Any, list[Upload], Upload | None]:
    """Fields, image uploads and mask upload from a multipart/form-data or JSON body. A mask is refused
    where ``model`` has no ``mask`` field (variations)."""
    media = _media_type(request)
    takes_mask = "mask" in model.model_fields
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 2, max_fields=64, max_part_size=64 * 1024)
        except (MultiPartException, StarletteHTTPException) as exc:
            # Starlette turns its parser's errors into a bare HTTPException(400) inside an app
            if isinstance(exc, StarletteHTTPException) and exc.status_code != 400:
                raise
            detail = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
            raise APIError(400, f"invalid multipart body: {detail}", code="invalid_multipart") from None
        fields: dict[str, Any] = {}
        images: list[Upload] = []
        mask: Upload | None = None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key in ("image", "image[]"):
                        if len(images) >= max_images:
                            raise APIError(400, f"at most {_images(max_images)} may be sent", param="image",
                                           code="too_many_images")
                        param = "image" if not images else f"image[{len(images)}]"
                        images.append(await _read_upload(value, param, max_input_bytes))
                    elif key == "mask" and not takes_mask:
                        raise _no_mask()
                    elif key == "mask" and mask is None:
                        mask = await _read_upload(value, "mask", max_input_bytes)
                    else:
                        raise APIError(400, f"unexpected file field {key[:40]!r} (files go in image, image[] "
                                            "and mask)", param=key[:40], code="invalid_value")
                elif key in ("image", "image[]", "mask"):
                    raise APIError(400, f"{key} must be a file part (or send JSON with data URLs)", param=key,
                                   code="invalid_image")
                elif key in fields:
                    raise APIError(400, f"field {key[:40]!r} is given twice", param=key[:40], code="invalid_value")
                else:
                    fields[key] = value
        finally:
            await form.close()
        try:
            return model.model_validate(fields, strict=False), images, mask  # form values are all text
        except ValidationError as exc:
            raise _invalid(exc) from None
    if media == "application/json":
        state = request.scope.get("state") or {}
        if "json_body" in state:  # parsed once, off the event loop, by the strict JSON middleware
            obj = state.pop("json_body")
        else:
            raw = await request.body()
            try:
                obj = loads_strict(raw) if raw else None
            except JsonRefused as exc:
                raise APIError(400, exc.message, param=exc.param, code=exc.code) from None
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        if "mask" in obj and not takes_mask:
            raise _no_mask()
        try:
            body = model.model_validate(obj)
        except ValidationError as exc:
            raise _invalid(exc) from None
        del obj
        uploads, mask = await asyncio.to_thread(_json_images, body, max_input_bytes, max_images)  # base64: CPU work
        # The data URLs are decoded: drop their text (up to FLUX_MAX_EDIT_BODY_BYTES) for the rest of the request.
        return body.model_copy(update=dict.fromkeys(model.DATA_URL_FIELDS)), uploads, mask
    raise APIError(400, "send multipart/form-data (as OpenAI's SDKs do) or application/json with images as "
                        f"base64 data URLs, not {media[:60] or 'no Content-Type'}", code="unsupported_media_type")


def _json_images(body: Any, max_bytes: int, max_images: int) -> tuple[list[Upload], Upload | None]:
    urls: list[str] = []
    image = getattr(body, "image", None)
    if isinstance(image, str):
        urls.append(image)
    elif isinstance(image, list):
        urls += image
    for item in getattr(body, "images", None) or []:
        url = item if isinstance(item, str) else item.get("image_url")
        if not isinstance(url, str):
            raise APIError(400, 'each entry of images must be {"image_url": "data:image/...;base64,..."} '
                                "(file ids are not supported)", param="images", code="invalid_image")
        urls.append(url)
    if len(urls) > max_images:
        raise APIError(400, f"at most {_images(max_images)} may be sent, got {len(urls)}", param="image",
                       code="too_many_images")
    try:
        uploads = []
        for index, url in enumerate(urls):
            param = "image" if index == 0 else f"image[{index}]"
            uploads.append(Upload(param, decode_data_url(url, param, max_bytes)))
        mask = None
        raw_mask = getattr(body, "mask", None)
        if isinstance(raw_mask, dict):
            raw_mask = raw_mask.get("image_url")
            if not isinstance(raw_mask, str):
                raise InputError('mask must be a data URL or {"image_url": "data:image/png;base64,..."}', "mask")
        if raw_mask is not None:
            mask = Upload("mask", decode_data_url(raw_mask, "mask", max_bytes))
    except InputError as exc:
        raise APIError(400, exc.message, param=exc.param, code=exc.code) from None
    return uploads, mask


class EditService:
    """Builds edit and variation jobs; the generations' :class:`ImageService` runs them."""

    def __init__(self, images: ImageService) -> None:
        self.images = images
        self.settings = images.settings

    def _decode(self, upload: Upload) -> DecodedImage:
        s = self.settings
        try:
            return decode_image(upload.data, upload.param, max_bytes=s.max_input_bytes, max_pixels=s.max_input_pixels,
                                max_aspect=s.max_size / s.min_size)
        except InputError as exc:
            raise APIError(400, exc.message, param=exc.param, code=exc.code) from None

    def _auto_size(self, spec: ModelSpec, width: int, height: int) -> str:
        """The first image's size as the output size, within the limits (:func:`auto_size`)."""
        s = self.settings
        w, h = auto_size(width, height, multiple=spec.size_multiple, min_size=s.min_size, max_size=s.max_size,
                         max_pixels=s.max_pixels)
        return f"{w}x{h}"

    def build_job(self, body: ImageEditRequest, uploads: list[Upload], mask_upload: Upload | None,
                  request_id: str | None, *, partial_images: int = 0, variation: bool = False,
                  owner: str | None = None) -> Job:
        """Validate everything, decode the images and build the job (CPU work: call it off the event loop)."""
        spec = self.images.resolve_model(body.model)
        modes = edit_modes(spec)
        if modes is None:
            raise APIError(400, f"model {spec.key} does not edit images (edit models: "
                                f"{', '.join(_edit_models())})",
                           param="model", code="unsupported_model")
        # 1. Which task, and is every field one this model honours?
        if not uploads:
            raise APIError(400, "image is required: send the image to edit as a file part 'image' (or 'image[]'), "
                                "or as a data URL in JSON", param="image", code="missing_required_parameter")
        if len(uploads) > modes.max_images:
            raise APIError(400, f"{spec.key} takes at most {_images(modes.max_images)}, got {len(uploads)}",
                           param="image",
                           code="too_many_images")
        task = modes.with_mask if mask_upload is not None else modes.without_mask
        if task is None:
            raise APIError(400, f"{spec.key} cannot use a mask", param="mask", code="unsupported_value")
        if variation and task != "img2img":
            raise APIError(400, f"variations need an img2img model; {spec.key} edits by instruction (use "
                                "/v1/images/edits with a prompt)", param="model", code="unsupported_model")
        if body.background == "transparent":
            raise APIError(400, "background 'transparent' is not supported: the models draw opaque images",
                           param="background", code="unsupported_value")
        strength = self._strength(body, spec, task)

        # 2. Decode and check the images (formats, limits, modes, EXIF, alpha).
        decoded = [self._decode(u) for u in uploads]
        mask = None
        if mask_upload is not None:
            try:
                mask = mask_from(self._decode(mask_upload), decoded[0].size)
            except InputError as exc:
                raise APIError(400, exc.message, param=exc.param, code=exc.code) from None

        # 3. Size: "auto" (or none) is the first image's size on the model's multiple.
        first_w, first_h = decoded[0].size
        sized = body
        if (body.size in (None, "auto")) and body.width is None and body.height is None:
            sized = body.model_copy(update={"size": self._auto_size(spec, first_w, first_h)})
        if variation:
            sized = sized.model_copy(update={"prompt": "variation"})  # validated as a prompt, replaced below
        job = self.images.build_job(sized, request_id=request_id, owner=owner, partial_images=partial_images,
                                    input_images=len(decoded))
        if variation:
            job.prompt = ""
        width, height = job.params.width, job.params.height
        if strength is not None and int(job.params.steps * strength) < 1:
            raise APIError(400, f"strength {strength:g} × {job.params.steps} steps leaves no denoising step; raise "
                                "strength or num_inference_steps", param="strength", code="invalid_value")

        # 4. The first image (and mask) at the output size; references keep their own size.
        images = [resize_rgb(decoded[0].rgb, width, height)] + [d.rgb for d in decoded[1:]]
        if mask is not None:
            mask = resize_mask(mask, width, height)
        job.params = replace(job.params, task=task, strength=strength, inputs=inputs_digest(images, mask))
        job.images = images
        job.mask = mask
        job.metadata["task"] = task
        return job

    def _strength(self, body: ImageEditRequest, spec: ModelSpec, task: Task) -> float | None:
        if task == "edit":
            if body.strength is not None:
                raise APIError(400, f"{spec.key} edits by instruction and takes no strength", param="strength",
                               code="unsupported_value")
            if body.input_fidelity == "low":
                raise APIError(400, f"input_fidelity 'low' is not supported by {spec.key}: it always keeps the "
                                    "input at high fidelity", param="input_fidelity", code="unsupported_value")
            return None
        if body.strength is not None:
            return float(body.strength)
        if body.input_fidelity is not None:
            return STRENGTH_FOR_FIDELITY[body.input_fidelity]
        family = FAMILIES.get(spec.family)
        strength = family.default_strength if family is not None else None
        return strength if strength is not None else DEFAULT_STRENGTH

    def variation_as_edit(self, body: ImageVariationRequest) -> ImageEditRequest:
        """A variation is an img2img edit with an empty prompt (strength 0.75 unless given)."""
        fields = body.model_dump(exclude_none=True, exclude={"image"})
        fields.setdefault("strength", VARIATION_STRENGTH)
        return ImageEditRequest.model_validate({"prompt": "variation", **fields, **(body.model_extra or {})})


def _edit_models() -> list[str]:
    return [key for key, spec in BUILTIN_MODELS.items() if edit_modes(spec) is not None]
