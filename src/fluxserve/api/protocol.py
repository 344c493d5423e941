"""Request and response models of the HTTP API (OpenAI's images API plus fluxserve's extensions).

Requests accept unknown fields (newer OpenAI clients send fields we do not know yet): they are
ignored, logged and listed back in ``ignored_fields``. Bounds that depend on settings (n, sizes,
steps, prompt length) are checked in the serving layer, which names the bad ``param``.
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fluxserve.api.jsontext import JsonRefused, loads_field
from fluxserve.generation import MAX_PARTIAL_IMAGES, MAX_SEED

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
MAX_TEXT_CHARS = 100_000
"""Longest string any request field may hold (prompts have their own, smaller FLUX_MAX_PROMPT_CHARS)."""


def public_model_source(source: str) -> str:
    """Where a model comes from, as clients may see it: a hub repo id or registry key as it is, a local
    pipeline as ``local/<directory name>`` (never its path; the log has it)."""
    path = PurePath(source)
    return f"local/{path.name}" if path.is_absolute() else source


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be accepted as text, or None. Every string of every request passes this
    before a job exists: a lone surrogate (``"\\ud800"`` in JSON) cannot be encoded into the answer, the
    log or a metadata file, and would fail the job (and a batch with it) after the work was done."""
    if len(value) > MAX_TEXT_CHARS:
        return f"must be at most {MAX_TEXT_CHARS} characters, got {len(value)}"
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain lone surrogates (an unpaired \\ud800-\\udfff escape is not text)"
    return None


def data_url_problem(value: str) -> str | None:
    """Why ``value`` cannot be a data URL field's text, or None. Data URLs carry whole images, so no length
    rule here: their decoded bytes are held to FLUX_MAX_INPUT_BYTES when decoded, and the body to
    FLUX_MAX_EDIT_BODY_BYTES. Short values get the text rules; long ones must be ASCII without NUL (checked
    without copying megabytes, as encoding them would)."""
    if len(value) <= MAX_TEXT_CHARS:
        return text_problem(value)
    if not value.isascii() or "\x00" in value:
        return "must be a base64 data URL (ASCII text)"
    return None


def _check_texts(value: Any, where: str, depth: int = 0, *, data_urls: bool = False) -> None:
    """Apply :func:`text_problem` (or :func:`data_url_problem`) to every string (and key) inside ``value``."""
    if isinstance(value, str):
        problem = data_url_problem(value) if data_urls else text_problem(value)
        if problem is not None:
            raise ValueError(f"{where}: {problem}" if depth else problem)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_texts(key, where, depth + 1)
            _check_texts(item, where, depth + 1, data_urls=data_urls)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_texts(item, where, depth + 1, data_urls=data_urls)

OPENAI_IGNORED = ("style", "moderation", "input_fidelity")
"""OpenAI fields that change nothing here; each one sent is listed back in ``ignored_fields``."""


class APIModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)  # no "2" or true for an int

    DATA_URL_FIELDS: ClassVar[frozenset[str]] = frozenset()
    """Fields that carry images as data URLs: :func:`data_url_problem` instead of the text length rule."""

    @field_validator("*", mode="after")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> Any:
        """Every declared field: the same text rules (:func:`text_problem`), naming the field."""
        _check_texts(value, info.field_name or "value", data_urls=info.field_name in cls.DATA_URL_FIELDS)
        return value

    @model_validator(mode="after")
    def _unknown_text(self) -> APIModel:
        """Unknown fields are ignored but their names are echoed back (``ignored_fields``) and logged:
        the same text rules for their names and values."""
        for name, value in (self.model_extra or {}).items():
            for problem in (text_problem(name), _problem_in(value)):
                if problem is not None:
                    raise ValueError(f"unknown field {name.encode('utf-8', 'backslashreplace').decode()[:40]!r}: "
                                     f"{problem}")
        return self

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class LoraRef(APIModel):
    """One adapter of a request's ``loras``: a name from the LoRA library and its scale."""

    name: str = Field(..., min_length=1, max_length=256, description="Adapter name (GET /v1/loras).")
    scale: float = Field(1.0, description="Strength; 0 is the model without it (|scale| ≤ FLUX_LORA_MAX_SCALE).")

    @field_validator("scale", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # strict mode: 1 is a valid scale too
        return value

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ImageGenerationRequest(APIModel):
    """``POST /v1/images/generations`` (and ``/v1/images/jobs``)."""

    prompt: str = Field(..., min_length=1, description="What to draw. Required, non-empty.")
    model: str | None = Field(None, description="Registry key, hub repo id or local path; default: active model.")
    n: int | None = Field(1, ge=1, description="Images to generate (1..FLUX_MAX_IMAGES_PER_REQUEST).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto" (the model\'s default size).')
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (default) or url.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image file format.")
    output_compression: int | None = Field(None, ge=0, le=100, description="0–100, higher is smaller.")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None, description="Maps to the model's step presets (standard=medium, hd=high).")
    user: str | None = Field(None, max_length=256, description="End-user id; accepted and logged.")
    stream: bool = Field(False, description="Server-sent events: partial images, then the image (OpenAI's events).")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="Partial images to stream (0–3), at the requested size.")
    style: Any = Field(None, description="Accepted and ignored (no meaning for diffusion models here).")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description='opaque or auto; "transparent" is refused (no model here produces alpha).')
    moderation: Literal["low", "auto"] | None = Field(
        None, description="OpenAI's values are accepted and ignored (no moderation model runs here).")

    # fluxserve / earlier-server extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image (0 … 2^53 − 1); image i "
                             "uses (seed + i) mod 2^53.")
    stream_progress: bool = Field(False, description="With stream: also send <prefix>.progress events (queue "
                                  "position, step/total) besides OpenAI's events.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (overrides quality).")
    guidance_scale: float | None = Field(None, ge=0, description="Guidance (Qwen-Image: true CFG scale).")
    true_cfg_scale: float | None = Field(None, ge=0, description="Qwen-Image's name for guidance_scale.")
    negative_prompt: str | None = Field(None, description="What to avoid (Qwen-Image).")
    max_sequence_length: int | None = Field(None, ge=1, description="Text tokens given to the T5/Qwen encoder.")
    height: int | None = Field(None, ge=1, description="Earlier server's form of size; must agree with size.")
    width: int | None = Field(None, ge=1, description="Earlier server's form of size; must agree with size.")
    store_local: bool | None = Field(None, description="Also save the image under FLUX_OUTPUT_DIR.")
    write_metadata: bool = Field(False, description="Save a JSON sidecar next to the saved image.")
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN, description="Client-chosen id to cancel.")
    allow_fallback: bool | None = Field(None, description="Let OOM recovery lower the resolution.")
    loras: list[LoraRef] | None = Field(
        None, description='LoRA adapters from the library: [{"name": "...", "scale": 0.8}] '
                          "(up to FLUX_MAX_LORAS_PER_REQUEST; multipart: the same list as a JSON string).")
    webhook_url: str | None = Field(
        None, max_length=2048, description="Async jobs only: POST the job record here when it ends, signed per "
                                           "Standard Webhooks (hosts in FLUX_WEBHOOK_ALLOWED_HOSTS only).")

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, value: Any) -> Any:
        """Multipart edits send every field as text: ``loras`` then holds the JSON list, parsed with the
        body's bounds (nesting, size) and strictness (no duplicate keys)."""
        if isinstance(value, str):
            try:
                return loads_field(value, "loras")
            except JsonRefused as exc:
                if exc.code == "invalid_json" and not exc.message.startswith("duplicate key"):
                    raise ValueError('must be a list like [{"name": "...", "scale": 0.8}]') from None
                raise ValueError(exc.message) from None
        return value

    @field_validator("guidance_scale", "true_cfg_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def ignored_fields(self) -> list[str]:
        named = [name for name in OPENAI_IGNORED if getattr(self, name, None) is not None]
        return named + self._format_ignored() + self.unknown_fields()

    def _format_ignored(self) -> list[str]:
        """``output_compression`` is for JPEG and WebP (as OpenAI's): a PNG is encoded at the server's
        FLUX_PNG_COMPRESS_LEVEL whatever it says, so it is reported as ignored."""
        png = (self.output_format or "png") == "png"
        return ["output_compression"] if png and self.output_compression is not None else []


def _problem_in(value: Any) -> str | None:
    try:
        _check_texts(value, "value", 1)
    except ValueError as exc:
        return str(exc).removeprefix("value: ")
    return None


class ImageParams(BaseModel):
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    seed: int
    negative_prompt: str | None = None
    fallback_applied: bool = False
    fallback_reason: str | None = None
    original_params: dict[str, Any] | None = None
    task: str | None = None
    """Edits only: img2img, inpaint or edit."""
    strength: float | None = None
    """img2img / inpaint only: how far the result moved from the input."""
    loras: list[dict[str, Any]] | None = None
    """The LoRA adapters and scales the image was made with (absent without adapters)."""


class ImageData(BaseModel):
    """One image. OpenAI's fields first; fluxserve's extensions after them, inside the item."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    model: str
    model_key: str
    device: str
    dtype: str
    params: ImageParams
    timing: dict[str, float]
    batch_size: int
    request_id: str
    saved_path: str | None = None
    metadata_path: str | None = None
    save_error: str | None = None
    """Set when ``store_local`` could not save this image: ``output_dir_full`` or ``output_dir_unwritable``.
    The image is still returned; only the local copy is missing."""
    job_id: str | None = None
    replica: str | None = None

    duration_ms: int | None = None
    """The request's total time in milliseconds (``timing.total``; the earlier web page shows it)."""
    warning: str | None = None
    """Set when out-of-memory recovery changed the request (the earlier web page shows it)."""

    @model_validator(mode="after")
    def _fallback_warning(self) -> ImageData:
        p = self.params
        if p.fallback_applied and self.warning is None:
            asked = p.original_params or {}
            was = f" instead of {asked['width']}x{asked['height']}" if "width" in asked and "height" in asked else ""
            self.warning = f"out of memory; recovered by {p.fallback_reason or 'a fallback'}: {p.width}x{p.height}{was}"
        return self


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str
    background: str | None = None
    ignored_fields: list[str] = Field(default_factory=list)
    usage: dict[str, Any] | None = None


class SelectModelRequest(APIModel):
    model: str = Field(..., min_length=1)


class LoraLoadRequest(APIModel):
    name: str = Field(..., min_length=1, max_length=256, description="Library adapter name (or a hub id with "
                      "FLUX_ALLOW_ANY_MODEL=1).")
    model: str | None = Field(None, description="Model to load it on (default: the active model).")


class UnloadModelRequest(APIModel):
    model: str = Field(..., min_length=1)


class ReleaseMemoryRequest(APIModel):
    all: bool = Field(False, description="Also drop the active model.")


class CancelRequest(APIModel):
    request_id: str = Field(..., pattern=REQUEST_ID_PATTERN)


class TokenizeRequest(APIModel):
    prompt: str = Field(..., max_length=100_000)
    model: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (names the bad `param`)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    403: {"model": ErrorResponse, "description": "Needs an admin key (FLUX_ADMIN_KEYS), or the model is not enabled "
                                                 "here (FLUX_MODELS)"},
    404: {"model": ErrorResponse, "description": "Unknown model, job or file"},
    409: {"model": ErrorResponse, "description": "Conflict: request_id in use, job already finished or cancelled, "
                                                 "model not loaded"},
    410: {"model": ErrorResponse, "description": "An async job's result expired (FLUX_JOB_TTL, "
                                                 "FLUX_RESULTS_MAX_BYTES)"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {"model": ErrorResponse, "description": "Queue full, or the key's rate limit reached (see Retry-After)"},
    500: {"model": ErrorResponse, "description": "Unexpected error (details in the server log)"},
    503: {"model": ErrorResponse, "description": "Model unavailable, out of memory, or shutting down"},
    504: {"model": ErrorResponse, "description": "Waited too long in the queue"},
}


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits``: multipart/form-data as OpenAI's SDKs send it (files in ``image`` /
    ``image[]`` and ``mask``), or the same fields as JSON with images as base64 data URLs."""

    DATA_URL_FIELDS: ClassVar[frozenset[str]] = frozenset({"image", "images", "mask"})

    image: str | list[str] | None = Field(None, description="JSON only: data URL(s) of the image(s) to edit.")
    images: list[dict[str, Any] | str] | None = Field(
        None, description='JSON only, OpenAI\'s form: [{"image_url": "data:image/png;base64,..."}].')
    mask: str | dict[str, Any] | None = Field(
        None, description="JSON only: data URL of a PNG whose transparent pixels mark the area to change.")
    strength: float | None = Field(None, ge=0, le=1, description="img2img/inpaint: how far to move from the "
                                   "input (0 = keep it, 1 = ignore it). Default: from input_fidelity.")
    input_fidelity: Literal["low", "high"] | None = Field(
        None, description="How closely to keep the input: high → strength 0.6, low → 0.85 (img2img/inpaint); "
                          "instruction-edit models always keep it high.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto/opaque; transparent is refused (the models draw no alpha).")

    @field_validator("strength")
    @classmethod
    def _finite_strength(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def ignored_fields(self) -> list[str]:
        named = [name for name in ("style", "moderation") if getattr(self, name, None) is not None]
        return named + self._format_ignored() + self.unknown_fields()


class ImageVariationRequest(APIModel):
    """``POST /v1/images/variations`` (OpenAI's dall-e-2 endpoint): one image, no prompt."""

    DATA_URL_FIELDS: ClassVar[frozenset[str]] = frozenset({"image"})

    image: str | None = Field(None, description="JSON only: data URL of the image.")
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    strength: float | None = Field(None, ge=0, le=1, description="How far from the input (default 0.75).")
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN)

    @field_validator("guidance_scale", "strength")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
