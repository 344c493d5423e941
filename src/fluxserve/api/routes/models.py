"""Model routes: list, inspect, select, unload; memory release; token counts.

Select, unload and memory release need an admin key when keys are configured (the middleware answers
403 to others: :func:`fluxserve.api.middleware.needs_admin`); /v1/models shows its runtime snapshot
(devices, memory, settings, directories) to admins only. /v1/models lists what the caller can use
(:meth:`fluxserve.runtime.Runtime.usable_models`); ``?all=true`` (admins) the whole registry.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from fluxserve.api.editing import edit_card
from fluxserve.api.errors import APIError
from fluxserve.api.middleware import is_admin
from fluxserve.api.protocol import (
    ERROR_RESPONSES,
    ReleaseMemoryRequest,
    SelectModelRequest,
    TokenizeRequest,
    UnloadModelRequest,
    public_model_source,
)
from fluxserve.models.registry import ModelNotAllowedError, UnknownModelError, family_descriptor
from fluxserve.models.spec import ModelSpec
from fluxserve.scheduler.jobs import JobError

if TYPE_CHECKING:
    from fluxserve.runtime import Runtime

router = APIRouter(responses=ERROR_RESPONSES)


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _spec(runtime: Runtime, name: str, *, operator: bool = False) -> ModelSpec:
    """The model ``name`` means: 403 when requests may not use it here (FLUX_MODELS), 404 when it is
    no model at all. ``operator`` (select/unload, admin keys only) may name any registry key."""
    try:
        return runtime.resolve(name, operator=operator)
    except ModelNotAllowedError as exc:
        raise APIError(403, str(exc), param="model", code="model_not_allowed") from None
    except UnknownModelError as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None


def public_source(spec: ModelSpec) -> str:
    """Where a model comes from, as clients may see it (see :func:`public_model_source`)."""
    return public_model_source(spec.source)


def model_card(runtime: Runtime, spec: ModelSpec, *, loadable: bool) -> dict[str, Any]:
    """One model as ``/v1/models`` shows it; ``loadable`` is :meth:`Runtime.loadable`. Blocking (a worker process
    or replica may be asked): call it off the event loop."""
    loaded = runtime.model_info(spec.key)
    caches = {device: model.prompt_cache_stats() for device, model in loaded.items()}
    return {
        "id": public_model_source(spec.key), "object": "model", "created": int(runtime.started_at),
        "owned_by": "fluxserve",
        "source": public_source(spec) if spec.tiny is None else f"built offline ({spec.key})",
        "allowed": runtime.may_serve(spec.key), "loadable": loadable,
        "family": spec.family,
        "description": spec.description if not Path(spec.source).is_absolute() else "local pipeline",
        "active": spec.key == runtime.active_key,
        "loaded": bool(loaded), "loaded_on": sorted(loaded), "gated": spec.gated,
        "licence": spec.licence, "commercial_use": spec.commercial_use,
        "defaults": {"num_inference_steps": spec.steps, "guidance_scale": spec.guidance,
                     "max_sequence_length": spec.max_sequence_length, "width": spec.width, "height": spec.height,
                     "size": f"{spec.width}x{spec.height}", "size_multiple": spec.size_multiple,
                     "max_sequence_length_limit": spec.max_sequence_length_limit,
                     "negative_prompt": spec.negative_prompt},
        "guidance_parameter": family_descriptor(spec.family).guidance_parameter,
        "presets": {name: {"width": p.width, "height": p.height, "num_inference_steps": p.steps,
                           "size": f"{p.width}x{p.height}"} for name, p in spec.presets.items()},
        "quality_steps": spec.quality_steps,
        "modes": sorted({m for model in loaded.values() for m in model.modes}),
        "load_seconds": {d: round(m.load_seconds, 3) for d, m in loaded.items()},
        "warmup": {d: m.warmup for d, m in loaded.items()},
        "prompt_cache": {d: {"hits": c.hits, "misses": c.misses, "capacity": c.capacity}
                         for d, c in caches.items() if c is not None},  # None: a Ray replica keeps its own
        "replicas": runtime.replicas(spec.key),
        "edits": edit_card(spec),
    }


def _version(package: str) -> str | None:
    """An installed package's version, read from its metadata (importing torch here would load it into the HTTP
    layer: the Ray ingress has no use for it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def runtime_snapshot(runtime: Runtime) -> dict[str, Any]:
    import platform

    from fluxserve import __version__

    s = runtime.settings
    return {
        "devices": [{"device": p.device, "dtype": p.dtype, "vae_dtype": p.vae_dtype,
                     "generator_device": p.generator_device, "reasons": list(p.reasons)} for p in runtime.plans],
        "memory": runtime.memory(),
        "offload": s.offload, "attention_slicing": s.attention_slicing, "vae_slicing": s.vae_slicing,
        "vae_tiling": s.vae_tiling, "compile": s.compile, "quantize": s.quantize, "step_cache": s.step_cache,
        "queue": runtime.scheduler.stats(), "max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms,
        "max_concurrent": s.max_concurrent, "queue_timeout": s.queue_timeout,
        "warmup": {"enabled": s.warmup_enable, "sizes": s.warmup_sizes, "text_lengths": s.warmup_text_lengths,
                   "runs": [w.__dict__ for w in runtime.warmups]},
        "limits": {"max_images_per_request": s.max_images_per_request, "max_prompt_chars": s.max_prompt_chars,
                   "min_size": s.min_size, "max_size": s.max_size, "max_pixels": s.max_pixels,
                   "max_steps": s.max_steps, "max_guidance": s.max_guidance},
        "cache_dir": str(s.cache_dir), "revision": s.revision, "variant": s.variant,
        "output_dir": str(s.output_dir), "store_local": s.store_local,
        "auth_required": bool(s.all_api_keys()),
        "versions": {"fluxserve": __version__, "torch": _version("torch"), "diffusers": _version("diffusers"),
                     "transformers": _version("transformers"), "python": platform.python_version()},
    }


def _aliases(runtime: Runtime) -> dict[str, str]:
    """FLUX_MODEL_ALIASES as alias → the model key it serves now (aliases whose model is not served here
    are left out)."""
    served = {}
    for name in runtime.model_aliases:
        try:
            served[name] = public_model_source(runtime.resolve(name).key)
        except UnknownModelError:
            continue
    return served


@router.get("/v1/models", summary="Models this caller can use: OpenAI list plus the active model and the runtime "
                                   "snapshot")
async def list_models(request: Request, full_registry: bool = Query(
        False, alias="all", description="Admins: every registry model, usable here or not (each card says "
                                        "`allowed` and `loadable`).")) -> JSONResponse:
    """The models this caller may use and this server can load: for an admin key any registry model (an admin
    selects one with POST /v1/models/select), for other keys those requests may name (FLUX_MODELS); each loaded,
    built offline, in the cache, or downloadable (FLUX_HUB_DOWNLOADS)."""
    runtime = _runtime(request)
    admin = is_admin(request.state)
    if full_registry and not admin:
        raise APIError(403, "GET /v1/models?all=true (the whole registry) needs an admin key (FLUX_ADMIN_KEYS)",
                       param="all", code="permission_denied")
    # The hub check may wait on the network and loaded models may be asked: off the event loop.
    return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, _listing, runtime, admin,
                                                                          full_registry))


def _listing(runtime: Runtime, admin: bool, full_registry: bool) -> dict[str, Any]:
    specs = ([(spec, runtime.loadable(spec)) for spec in runtime.known_models()] if full_registry
             else [(spec, True) for spec in runtime.usable_models(admin=admin)])
    cards = [model_card(runtime, spec, loadable=loadable) for spec, loadable in specs]
    active = runtime.resolve(None)
    plan = runtime.plans[0]
    listing: dict[str, Any] = {
        "object": "list", "data": cards,
        # The earlier web page builds its model picker from `available` (key → repo id, Object.entries).
        "available": {public_model_source(spec.key): public_source(spec) for spec, _ in specs},
        "aliases": _aliases(runtime),
        "active": {"key": public_model_source(active.key), "id": public_source(active), "type": active.family},
        "active_key": public_model_source(active.key),
        "device": plan.device, "dtype": plan.dtype}  # the earlier page's device badge
    if admin:  # the configuration snapshot (directories, settings): admins only
        listing.update({"cache_dir": str(runtime.settings.cache_dir),
                        "revision": runtime.settings.revision, "variant": runtime.settings.variant,
                        "runtime": runtime_snapshot(runtime)})
    return listing


@router.get("/v1/models/{model_id:path}", summary="One model")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    # Any registry model can be looked at (with "allowed" and "loadable"); using one is what FLUX_MODELS restricts.
    spec = _spec(runtime, model_id, operator=True)

    def card() -> dict[str, Any]:
        return model_card(runtime, spec, loadable=runtime.loadable(spec))

    return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, card))


@router.post("/v1/models/select", summary="Load (if needed) and make a model the default")
async def select_model(body: SelectModelRequest, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    spec = _spec(runtime, body.model, operator=True)
    request.state.model = spec.key
    started = time.perf_counter()
    try:
        await asyncio.get_running_loop().run_in_executor(None, runtime.select, spec.key)
    except JobError as exc:
        raise APIError(exc.status, exc.message, param="model", code=exc.code) from None
    return JSONResponse({"ok": True, "active": {"key": public_model_source(spec.key), "id": public_source(spec)},
                         "seconds": round(time.perf_counter() - started, 3)})


@router.post("/v1/models/unload", summary="Drop one model from every device")
async def unload_model(body: UnloadModelRequest, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    spec = _spec(runtime, body.model, operator=True)
    # Dropping weights runs gc and malloc_trim: never on the event loop.
    dropped, freed = await asyncio.get_running_loop().run_in_executor(None, runtime.unload, spec.key)
    if not dropped:
        raise APIError(404, f"model {spec.key!r} is not loaded", param="model", code="model_not_loaded")
    return JSONResponse({"ok": True, "model": public_model_source(spec.key), "devices": dropped,
                         "freed_bytes": freed})


@router.post("/v1/memory/release", summary="Drop cached pipelines (all but the active one) and free memory")
async def release_memory(request: Request, body: ReleaseMemoryRequest | None = None) -> JSONResponse:
    runtime = _runtime(request)
    keep = set() if body is not None and body.all else {runtime.active_key}

    def release() -> dict[str, Any]:
        dropped, freed = runtime.release(keep)
        # `message` and `pipelines_cleared` are what the earlier web page's Free Memory button shows.
        message = (f"released {len(dropped)} pipeline(s) ({', '.join(dropped)}), freed {freed / 2**20:.1f} MiB"
                   if dropped else "nothing to release" + (" but the active model" if keep else ""))
        return {"ok": True, "message": message, "pipelines_cleared": len(dropped), "dropped": dropped,
                "kept": sorted(keep), "freed_bytes": freed, "memory": runtime.memory()}

    return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, release))


@router.post("/v1/tokenize", summary="Count the prompt's tokens for a model's text encoders")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    runtime = _runtime(request)
    spec = _spec(runtime, body.model or runtime.active_key, operator=True)  # loads nothing: any registry model
    loaded = runtime.model_info(spec.key)
    if not loaded:
        raise APIError(409, f"model {spec.key!r} is not loaded yet", param="model", code="model_not_loaded")
    model = next(iter(loaded.values()))
    counts = await asyncio.get_running_loop().run_in_executor(None, model.token_count, body.prompt)
    limits = {name: limit for name, limit in model.descriptor.token_limits(model.spec).items() if name in counts}
    return JSONResponse({"model": public_model_source(spec.key), "counts": counts, "limits": limits})
