"""LoRA library routes: list the adapters; load and unload them on a model (admin keys only).

``GET /v1/loras`` is open to every key; ``POST /v1/loras/load`` and ``/unload`` change what a model holds
for everyone, so with keys configured they need an admin key (``/v1/loras`` is in the middleware's
``ADMIN_PREFIXES``). They act on every copy of the model (each device, or each worker process) through its
:class:`~fluxserve.models.handle.LoraControl`, off the event loop.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fluxserve.api.errors import APIError
from fluxserve.api.protocol import ERROR_RESPONSES, ErrorResponse, LoraLoadRequest
from fluxserve.api.serving import ImageService
from fluxserve.generation import AdapterError
from fluxserve.loras import LoraError, LoraInfo, resolve_loras
from fluxserve.models.handle import LoraControl, ModelHandle
from fluxserve.models.registry import ModelNotAllowedError, UnknownModelError
from fluxserve.models.spec import ModelSpec

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

router = APIRouter(responses={
    **ERROR_RESPONSES,
    403: {"model": ErrorResponse, "description": "Admin key needed, or hub ids without FLUX_ALLOW_ANY_MODEL"},
    501: {"model": ErrorResponse, "description": "Hub downloads of adapters are not supported"},
})
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _service(request: Request) -> ImageService:
    service: ImageService = request.app.state.images
    return service


def _loaded_models(runtime: Runtime, key: str | None = None) -> list[tuple[str, str, ModelHandle]]:
    """(model key, device or replica, model) of every loaded model, or of ``key``'s copies."""
    keys = [key] if key is not None else [spec.key for spec in runtime.known_models()]
    return [(k, where, model) for k in keys for where, model in runtime.model_info(k).items()]


def _where_loaded(runtime: Runtime) -> dict[str, list[str]]:
    """Adapter name → ``model@device`` where it is loaded (blocking: worker processes are asked)."""
    where: dict[str, list[str]] = {}
    for key, device, model in _loaded_models(runtime):
        loras = model.loras
        for name in loras.loaded_names() if loras is not None else ():
            where.setdefault(name, []).append(f"{key}@{device}")
    return where


@router.get("/v1/loras", summary="The LoRA library: name, family, rank, target modules, size, where loaded")
async def list_loras(request: Request) -> JSONResponse:
    service = _service(request)
    runtime = service.runtime
    loop = asyncio.get_running_loop()
    adapters = await loop.run_in_executor(None, service.loras.scan)
    where = await loop.run_in_executor(None, _where_loaded, runtime)
    s = service.settings
    return JSONResponse({
        "object": "list", "data": [info.card(where.get(name, ())) for name, info in sorted(adapters.items())],
        "limits": {"max_loras_per_request": s.max_loras_per_request, "max_scale": s.lora_max_scale,
                   "cache": s.lora_cache, "max_rank": s.lora_max_rank if s.compile != "off" else None},
        "available": s.quantize != "fp8",
    })


def _target(request: Request, body: LoraLoadRequest) -> tuple[ModelSpec, list[tuple[str, LoraControl]]]:
    """The model the body names and its adapters on each device: 409 where it is not loaded, 400
    ``loras_unavailable`` where it takes no adapters from here (FLUX_QUANTIZE=fp8; Ray Serve replicas)."""
    service = _service(request)
    runtime = service.runtime
    try:  # an operator may name any registry model, as with /v1/models/select
        spec = runtime.resolve(body.model, operator=True)
    except ModelNotAllowedError as exc:
        raise APIError(403, str(exc), param="model", code="model_not_allowed") from None
    except UnknownModelError as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    loaded = _loaded_models(runtime, spec.key)
    if not loaded:
        raise APIError(409, f"model {spec.key!r} is not loaded: select it first", param="model",
                       code="model_not_loaded")
    targets = [(device, loras) for _, device, model in loaded if (loras := model.loras) is not None]
    if not targets:
        reason = next(m.loras_unavailable for _, _, m in loaded) or f"{spec.key} takes no LoRA adapters"
        raise APIError(400, f"invalid 'model': {reason}", param="model", code="loras_unavailable")
    return spec, targets


def _library_info(request: Request, name: str) -> LoraInfo:
    service = _service(request)
    info = service.loras.get(name)
    if info is not None:
        return info
    if _HUB_ID.match(name):
        if not service.settings.allow_any_model:
            raise APIError(403, f"{name!r} is not in the LoRA library; hub ids need FLUX_ALLOW_ANY_MODEL=1 "
                                "(or put the .safetensors file into FLUX_LORA_DIR)", param="name",
                           code="lora_not_allowed")
        raise APIError(501, f"{name!r} is not in the LoRA library and this server does not download adapters "
                            "from the hub: put the .safetensors file into FLUX_LORA_DIR", param="name",
                       code="lora_download_unsupported")
    raise APIError(404, f"no adapter named {name[:80]!r} in the LoRA library (GET /v1/loras lists them)",
                   param="name", code="lora_not_found")


@router.post("/v1/loras/load", summary="Load an adapter on a model now (admin)")
async def load_lora(body: LoraLoadRequest, request: Request) -> JSONResponse:
    info = _library_info(request, body.name)
    spec, models = _target(request, body)
    service = _service(request)
    try:
        resolve_loras(service.loras, [(info.name, 1.0)], model_key=spec.key, family=spec.family, max_count=1,
                      max_scale=float("inf"))
    except LoraError as exc:
        raise APIError(exc.status, exc.message.replace("'loras'", "'name'"), param="name", code=exc.code) from None

    def load() -> dict[str, float]:
        return {device: round(loras.preload(info), 3) for device, loras in models}

    try:
        seconds = await asyncio.get_running_loop().run_in_executor(None, load)
    except AdapterError as exc:
        raise APIError(400, f"invalid 'name': {exc}", param="name", code="lora_unavailable") from None
    return JSONResponse({"ok": True, "name": info.name, "model": spec.key, "seconds": seconds})


@router.post("/v1/loras/unload", summary="Drop an adapter from a model (admin)")
async def unload_lora(body: LoraLoadRequest, request: Request) -> JSONResponse:
    spec, models = _target(request, body)

    def unload() -> list[str]:
        return [device for device, loras in models if loras.unload(body.name)]

    devices = await asyncio.get_running_loop().run_in_executor(None, unload)
    if not devices:
        raise APIError(404, f"adapter {body.name[:80]!r} is not loaded on {spec.key}", param="name",
                       code="lora_not_loaded")
    return JSONResponse({"ok": True, "name": body.name, "model": spec.key, "devices": devices})
