"""``fluxserve bench``: the same work measured three ways on one machine in one run.

(a) **baseline** — plain diffusers ``FluxPipeline`` (bf16 on CUDA, no tricks, ``guidance_scale=0``), called
    directly, each image encoded to PNG with PIL's defaults (edit cases: the family's diffusers edit pipeline;
    ``--family``: that family's pipeline);
(b) **engine** — fluxserve's :class:`~fluxserve.engine.engine.DeviceEngine` called directly (PNG at
    ``FLUX_PNG_COMPRESS_LEVEL``, the server's encoder);
(c) **http** — a real ``fluxserve serve`` subprocess on loopback, driven with the official ``openai``
    client (``response_format=b64_json``, extension fields through ``extra_body``).

On CUDA the model is the full-size FLUX.1 architecture with random weights, built on the GPU (a second)
and written with ``save_pretrained`` to a local directory so (b) and (c) load it through the normal
``from_pretrained`` path; images are noise, timings are those of the real checkpoints. On CPU the tiny
registry model ``tiny-flux`` is used and the point is the server's own overhead ((c) − (b)).

Every timed request has a prompt of its own (the prompt-embedding cache never hits); the quality check
uses one fixed prompt and seed on every path and compares (b)/(c) with (a) by PSNR and max pixel diff.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxserve.generation import Task

log = logging.getLogger(__name__)

QUALITY_PROMPT = "a lighthouse on a cliff at dusk, oil painting"
QUALITY_SEED = 42
MAX_SEQUENCE_LENGTH = 256
"""T5 tokens on every path (FLUX.1-schnell's default; the reference numbers in shared/GPU.md use it)."""


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    steps: int
    clients: int = 1
    variant: str = "schnell"
    """schnell (no guidance embedding) | dev (guidance_embeds=True) | tiny | another registry key (``--family``:
    klein, klein-9b, zimage, qwen, ...) or its ``tiny-<key>``."""
    guidance: float = 0.0
    """Guidance on every path (the family's own parameter: ``guidance_scale`` or ``true_cfg_scale``)."""
    task: Task = "generate"
    """generate | img2img | inpaint: an edit of one fixed noise photo (:func:`edit_inputs`; inpaint repaints
    its right half), by the family's own diffusers edit pipeline over the same modules on the baseline path, by
    ``GenerationParams.task`` on the engine path and by ``images.edit`` (multipart) over HTTP."""
    strength: float | None = None
    """img2img / inpaint: how far from the input image (diffusers runs ``int(steps * strength)`` steps)."""


CUDA_CASES = [
    Case("1024-4", 1024, 1024, 4),
    Case("512-4", 512, 512, 4),
    Case("1024-4-x4", 1024, 1024, 4, clients=4),
    Case("1024-28", 1024, 1024, 28, variant="dev"),
    Case("img2img-1024-28", 1024, 1024, 28, variant="dev", guidance=3.5, task="img2img", strength=0.6),
    Case("inpaint-1024-28", 1024, 1024, 28, variant="dev", guidance=3.5, task="inpaint", strength=0.6),
]
CPU_CASES = [
    Case("64-1", 64, 64, 1, variant="tiny"),
    Case("128-4", 128, 128, 4, variant="tiny"),
    Case("256-4", 256, 256, 4, variant="tiny"),
    Case("128-4-x4", 128, 128, 4, clients=4, variant="tiny"),
    Case("128-28", 128, 128, 28, variant="tiny"),
    Case("img2img-128-4", 128, 128, 4, variant="tiny", task="img2img", strength=0.6),
    Case("inpaint-128-4", 128, 128, 4, variant="tiny", task="inpaint", strength=0.6),
]
MODES: dict[str, dict[str, str]] = {
    "plain": {},
    "lossless": {"FLUX_COMPILE": "regional", "FLUX_FUSE_QKV": "1"},
    "fast": {"FLUX_COMPILE": "regional", "FLUX_FUSE_QKV": "1", "FLUX_QUANTIZE": "fp8"},
}


TransformerCall = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one transformer forward."""
FLUX_VARIANTS = ("schnell", "dev", "tiny")
"""The variants of the original FLUX.1 cases; any other variant is a registry key served by its family."""


def family_cases(name: str, device: str) -> list[Case]:
    """Cases for ``--family NAME`` (a family or a registry key): 1024² at the model's default steps on CUDA
    (one client, and four in one batch), its tiny model at 128² on CPU."""
    from fluxserve.models.registry import BUILTIN_MODELS, FAMILIES

    if name in FAMILIES:  # a family means its first real checkpoint
        name = next(s.key for s in FAMILIES[name].models if s.tiny is None)
    spec = BUILTIN_MODELS.get(name)
    if spec is None or spec.tiny is not None:
        real = [k for k, s in BUILTIN_MODELS.items() if s.tiny is None]
        raise SystemExit(f"--family {name!r}: choose a family ({', '.join(FAMILIES)}) or a model ({', '.join(real)})")
    if device.startswith("cuda"):
        return [Case(f"{name}-1024-{spec.steps}", 1024, 1024, spec.steps, variant=name, guidance=spec.guidance),
                Case(f"{name}-1024-{spec.steps}-x4", 1024, 1024, spec.steps, clients=4, variant=name,
                     guidance=spec.guidance)]
    tiny = f"tiny-{name}"
    if tiny not in BUILTIN_MODELS:
        raise SystemExit(f"--family {name!r} has no tiny model for CPU runs")
    return [Case(f"{tiny}-128-4", 128, 128, 4, variant=tiny, guidance=BUILTIN_MODELS[tiny].guidance)]


def _call_kwargs(case: Case, pipe: Any) -> dict[str, Any]:
    """Keyword arguments of a plain pipeline call for ``case`` (besides prompt, size, steps, generator)."""
    if case.variant in FLUX_VARIANTS:
        return {"guidance_scale": case.guidance, "max_sequence_length": MAX_SEQUENCE_LENGTH}
    runner = _runner_of(pipe)
    family = runner.descriptor
    kwargs: dict[str, Any] = {family.guidance_parameter: case.guidance, "max_sequence_length": MAX_SEQUENCE_LENGTH}
    if family.wants_negative(case.guidance) and family.defaults.negative_prompt is not None:
        kwargs["negative_prompt"] = family.defaults.negative_prompt
    kwargs.update(runner.plain_call_kwargs(case.width, case.height))
    return kwargs


def _runner_of(pipe: Any) -> Any:
    """The family runner of a loaded pipeline (by its class)."""
    from fluxserve.engine.families import runner_for
    from fluxserve.models.registry import family_of_class

    return runner_for(family_of_class(type(pipe).__name__))


@functools.cache
def edit_inputs(case: Case) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The input photo (fixed RGB noise at the case's size) and, for inpaint, the mask (255 = may change:
    the right half), the same on every path. Made once per case (not inside the timed calls) and read-only."""
    if case.task == "generate":
        return [], None
    image = np.random.default_rng(0).integers(0, 256, (case.height, case.width, 3), dtype=np.uint8)
    image.flags.writeable = False
    if case.task != "inpaint":
        return [image], None
    mask = np.zeros((case.height, case.width), np.uint8)
    mask[:, case.width // 2:] = 255
    mask.flags.writeable = False
    return [image], mask


def plain_pipeline(pipe: Any, case: Case) -> tuple[Any, dict[str, Any]]:
    """The plain diffusers pipeline a case calls and its edit arguments: text-to-image, or the family's edit
    pipeline for the task (``FamilyRunner.edit_pipeline``: over the loaded modules) with ``image``/``mask_image``/
    ``strength``."""
    if case.task == "generate":
        return text_to_image(pipe), {}
    runner = _runner_of(pipe)
    images, mask = edit_inputs(case)
    return (runner.edit_pipeline(pipe, case.task),
            runner.edit_call_kwargs(case.task, images, mask, case.strength, case.width, case.height))


def text_to_image(pipe: Any) -> Any:
    """The pipeline a plain text-to-image call uses (the loaded one, or its family's text-to-image pipeline over
    the same modules)."""
    return _runner_of(pipe).text_to_image(pipe)


@dataclass
class Measurement:
    case: str
    path: str
    """baseline | engine | http."""
    mode: str
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    wall_s: float = 0.0
    peak_mem_gb: float | None = None
    psnr_db: float | None = None
    max_diff: int | None = None
    note: str = ""
    server_timing: dict[str, list[float]] = field(default_factory=dict)
    """http: the stage timings each timed response reports (``data[0].timing``: text_encode, denoise, ...)."""

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        stages = {k: round(statistics.median(v), 4) for k, v in self.server_timing.items() if v}
        return {
            "case": self.case, "path": self.path, "mode": self.mode,
            "median_s": round(statistics.median(lat), 4) if lat else None,
            "min_s": round(min(lat), 4) if lat else None,
            "images_per_s": round(self.images / self.wall_s, 3) if self.wall_s else None,
            "requests": len(lat), "images": self.images, "peak_mem_gb": self.peak_mem_gb,
            "psnr_db": self.psnr_db, "max_diff": self.max_diff, "note": self.note,
            **({"server_stage_median_s": stages} if stages else {}),
        }


# --------------------------------------------------------------------------------------------------
# helpers

def psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """PSNR in dB (inf when identical) and the largest absolute pixel difference of two uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float((diff**2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), int(np.abs(diff).max())


def case_psnr(case: Case, image: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """:func:`psnr` of a path's image against the baseline's; for inpaint over the repainted area only (outside
    the mask fluxserve returns the input's own pixels, the plain pipeline its VAE round trip)."""
    _, mask = edit_inputs(case)
    if case.task == "inpaint" and mask is not None:
        where = mask > 0
        return psnr(image[where], reference[where])
    return psnr(image, reference)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _prompts(tag: str) -> Iterator[str]:
    index = 0
    while True:
        index += 1
        yield f"a photo of a red fox in the snow, study {tag} {index}"


def _seed_for(i: int) -> int:
    return 1000 + i


# --------------------------------------------------------------------------------------------------
# full-size FLUX.1 with random weights (CUDA)

STORE_DTYPES = ("bfloat16", "float8_e4m3fn")


def save_pipeline(pipe: Any, path: Path, store_dtype: str = "bfloat16") -> None:
    """``save_pretrained`` the random-weight pipeline to ``path``.

    ``float8_e4m3fn`` halves the checkpoint for models whose bf16 files do not fit the disk (Qwen-Image-2512,
    FLUX.2 dev): every floating parameter of the pipeline's modules except the VAE is rounded to fp8 *in
    memory* (so the in-memory baseline and the copy loaded back hold exactly the same values) and written as
    fp8; ``from_pretrained(torch_dtype=torch.bfloat16)`` upcasts on load. The model computes in bf16 either
    way: same shapes, same kernels, same cost. Buffers (rotary tables, ids) are left as they are.
    """
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype {store_dtype!r}: choose {', '.join(STORE_DTYPES)}")
    if store_dtype == "bfloat16":
        pipe.save_pretrained(path, safe_serialization=True)
        return
    from fluxserve.engine.optimize import FP8_MAX  # casting beyond it gives NaN: weights are clamped first

    fp8 = torch.float8_e4m3fn
    rounded: list[tuple[torch.nn.Parameter, torch.dtype]] = []
    modules = [m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module) and name != "vae"]
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                if param.is_floating_point() and param.dtype != fp8:
                    rounded.append((param, param.dtype))
                    param.data = param.data.clamp(-FP8_MAX, FP8_MAX).to(fp8)
    try:
        pipe.save_pretrained(path, safe_serialization=True)
    finally:
        with torch.no_grad():
            for param, dtype in rounded:
                param.data = param.data.to(dtype)


def build_fullsize_flux(guidance_embeds: bool = False, device: str = "cuda",
                        dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ``FluxPipeline`` with the published FLUX.1 architecture and random weights, built on ``device``
    (``FluxRunner.full_size_components``)."""
    from diffusers import FluxPipeline

    from fluxserve.engine.families.flux import FluxRunner

    components = FluxRunner().full_size_components(device, dtype, "dev" if guidance_embeds else None)
    pipe: Any = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs(pipe: Any, width: int = 1024, height: int = 1024, batch: int = 1,
                       text_tokens: int = MAX_SEQUENCE_LENGTH) -> dict[str, Any]:
    """Random transformer inputs of the shapes the pipeline uses at this size (for forward timings)."""
    tr = pipe.transformer
    device, dtype = tr.device, tr.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    img_ids = torch.zeros(height // 16, width // 16, 3, device=device)
    img_ids[..., 1] += torch.arange(height // 16, device=device)[:, None]
    img_ids[..., 2] += torch.arange(width // 16, device=device)[None, :]
    kwargs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, (height // 16) * (width // 16), 64, device=device, dtype=dtype,
                                     generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096, device=device, dtype=dtype, generator=gen),
        "pooled_projections": torch.randn(batch, 768, device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if tr.config.guidance_embeds:
        kwargs["guidance"] = torch.zeros(batch, device=device, dtype=torch.float32)
    return kwargs


def captured_transformer_inputs(pipe: Any, call_kwargs: dict[str, Any], width: int = 1024,
                                height: int = 1024) -> TransformerCall:
    """The transformer's arguments in a real one-step pipeline call at this size (any family): captured
    with a forward pre-hook, so a forward can be timed with exactly the pipeline's shapes."""
    captured: list[TransformerCall] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.append((args, dict(kwargs)))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            text_to_image(pipe)(prompt="a lighthouse", width=width, height=height, num_inference_steps=1,
                                output_type="latent", **call_kwargs)
    finally:
        handle.remove()
    return captured[0]


def time_forward(pipe: Any, reps: int = 10, inputs: TransformerCall | None = None) -> float:
    """Median seconds of one transformer forward at 1024² (FLUX.1: 4096 image + 256 text tokens; other
    families: the arguments their pipeline passes, see :func:`captured_transformer_inputs`)."""
    args, kwargs = inputs if inputs is not None else ((), transformer_inputs(pipe))
    with torch.inference_mode():
        for _ in range(2):
            pipe.transformer(*args, **kwargs)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            pipe.transformer(*args, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# (a) baseline

def run_baseline(pipe: Any, cases: list[Case], reps: int, device: str) -> tuple[list[Measurement], dict]:
    """Plain pipeline calls; PNG with PIL defaults. Returns measurements and the quality images."""
    results: list[Measurement] = []
    refs: dict[str, np.ndarray] = {}
    prompts = _prompts("baseline")

    def call(case: Case, prompts_: list[str], seeds: list[int]) -> list[bytes]:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        plain, edit = plain_pipeline(pipe, case)
        images = plain(prompt=prompts_, height=case.height, width=case.width, num_inference_steps=case.steps,
                       generator=gens, **_call_kwargs(case, pipe), **edit).images
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")  # PIL defaults (compress_level 6), as a plain script would
            out.append(buf.getvalue())
        return out

    for case in cases:
        m = Measurement(case.name, "baseline", "plain",
                        note=f"one pipeline call with {case.clients} prompt(s)" if case.clients > 1 else "")
        n = case.clients
        call(case, [next(prompts) for _ in range(n)], [_seed_for(i) for i in range(n)])  # warm-up
        _sync(device)
        _reset_peak(device)
        started = time.perf_counter()
        for r in range(reps):
            t = time.perf_counter()
            call(case, [next(prompts) for _ in range(n)], [_seed_for(r * n + i) for i in range(n)])
            _sync(device)
            m.latencies.append(time.perf_counter() - t)
            m.images += n
        m.wall_s = time.perf_counter() - started
        m.peak_mem_gb = _peak_gb(device)
        if case.clients == 1:
            png = call(case, [QUALITY_PROMPT], [QUALITY_SEED])[0]
            refs[case.name] = _decode_png(png)
        results.append(m)
        log.info("baseline %s: %s", case.name, m.summary())
    return results, refs


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# (b) engine

def run_engine(model_name: str, cases: list[Case], reps: int, mode: str, device: str,
               refs: dict[str, np.ndarray], cache_dir: Path,
               paired_server: ServerProcess | None = None,
               warmups: int = 2) -> tuple[list[Measurement], dict[str, Any]]:
    """(b). With ``paired_server`` (a running server of the same model), single-client cases also run
    ``reps`` alternating engine/HTTP pairs: the per-pair difference is the server's own overhead, robust
    to load drifting on a shared machine."""
    from fluxserve.generation import GenerationParams, ImageRequest
    from fluxserve.runtime import Runtime
    from fluxserve.settings import load_settings
    from fluxserve.storage.images import encode_image, to_base64
    from fluxserve.storage.inputs import inputs_digest

    overrides = {k.removeprefix("FLUX_").lower(): v for k, v in MODES[mode].items()}
    settings = load_settings(model=model_name, device=device, warmup_enable=False, store_local=False,
                             allow_any_model=True, cache_dir=str(cache_dir), **overrides)
    runtime = Runtime(settings)
    engine = runtime.engines[0]
    spec = runtime.default_spec
    info: dict[str, Any] = {}
    started = time.perf_counter()
    model, _ = engine.load(spec)
    info["load_s"] = round(time.perf_counter() - started, 2)
    info["modes"] = list(model.modes)
    encoder = ThreadPoolExecutor(settings.encode_threads)
    prompts = _prompts(f"engine-{mode}")
    results: list[Measurement] = []
    stages: dict[str, list[float]] = {}

    @functools.cache
    def digest(case: Case) -> str | None:  # what the HTTP layer computes once per request, once per case here
        images, mask = edit_inputs(case)
        return inputs_digest(images, mask) if images else None

    def call(case: Case, prompts_: list[str], seeds: list[int]) -> list[str]:
        images, mask = edit_inputs(case)
        params = GenerationParams(spec.key, case.width, case.height, case.steps, case.guidance, MAX_SEQUENCE_LENGTH,
                                  task=case.task, strength=case.strength, inputs=digest(case))
        requests = [ImageRequest(p, [s], images=list(images), mask=mask) for p, s in zip(prompts_, seeds, strict=True)]
        out = engine.generate(model, params, requests)
        for key, value in out[0].timings.items():
            stages.setdefault(f"{case.name}:{key}", []).append(value)
        pixels = [img for result in out for img in result.images]
        t = time.perf_counter()
        encoded = list(encoder.map(
            lambda px: to_base64(encode_image(px, "png", png_level=settings.png_compress_level)), pixels))
        stages.setdefault(f"{case.name}:png_base64", []).append(time.perf_counter() - t)
        return encoded

    try:
        for case in cases:
            n = case.clients
            m = Measurement(case.name, "engine", mode,
                            note=f"one engine batch of {n} requests" if n > 1 else "")
            t = time.perf_counter()
            for _ in range(warmups):  # warm-up/compile
                call(case, [next(prompts) for _ in range(n)], [_seed_for(i) for i in range(n)])
            info[f"warmup_{case.name}_s"] = round(time.perf_counter() - t, 2)
            _reset_peak(device)
            begun = time.perf_counter()
            for r in range(reps):
                t = time.perf_counter()
                call(case, [next(prompts) for _ in range(n)], [_seed_for(r * n + i) for i in range(n)])
                m.latencies.append(time.perf_counter() - t)
                m.images += n
            m.wall_s = time.perf_counter() - begun
            m.peak_mem_gb = _peak_gb(device)
            if case.name in refs:
                b64 = call(case, [QUALITY_PROMPT], [QUALITY_SEED])[0]
                p, mx = case_psnr(case, _decode_png(base64.b64decode(b64)), refs[case.name])
                m.psnr_db, m.max_diff = round(p, 2), mx
            results.append(m)
            log.info("engine %s %s: %s", mode, case.name, m.summary())
            if paired_server is not None and n == 1:
                client = _openai_client(paired_server)
                diffs = []
                for r in range(reps):
                    t = time.perf_counter()
                    call(case, [next(prompts)], [_seed_for(r)])
                    direct = time.perf_counter() - t
                    over_http, _, _ = _http_request(client, paired_server.model, case, next(prompts), _seed_for(r))
                    diffs.append(over_http - direct)
                info.setdefault("paired_http_overhead_ms", {})[case.name] = {
                    "median": round(statistics.median(diffs) * 1000, 2), "min": round(min(diffs) * 1000, 2),
                    "pairs": len(diffs)}
        info["stage_median_s"] = {k: round(statistics.median(v), 4) for k, v in stages.items()}
        if device.startswith("cuda") and model.primary is not None:
            info["forward_1024_s"] = round(time_forward(model.primary, inputs=_forward_inputs(model.primary, cases[0])),
                                           4)
    finally:
        encoder.shutdown()
        engine.release(set())
        runtime.encoder.shutdown()
    return results, info


# --------------------------------------------------------------------------------------------------
# (c) http

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``fluxserve serve`` in a subprocess; ``start`` returns seconds from spawn to ``/ready`` == 200."""

    def __init__(self, model: str, device: str, mode: str, cache_dir: Path, log_path: Path,
                 warmup_sizes: list[str]) -> None:
        self.port = _free_port()
        self.model, self.device, self.mode = model, device, mode
        self.cache_dir, self.log_path, self.warmup_sizes = cache_dir, log_path, warmup_sizes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900.0) -> float:
        env = dict(os.environ)
        env.update(MODES[self.mode])
        env.update({
            "FLUX_CACHE_DIR": str(self.cache_dir), "FLUX_STORE_LOCAL": "0", "FLUX_ALLOW_ANY_MODEL": "1",
            "FLUX_WARMUP_SIZES": ",".join(self.warmup_sizes), "FLUX_LOG_LEVEL": "INFO",
            "FLUX_OUTPUT_DIR": str(self.cache_dir / "outputs"), "FLUX_MAX_BATCH": "4",
            "PYTHONUNBUFFERED": "1",
        })
        cmd = [sys.executable, "-m", "fluxserve", "serve", "--model", self.model, "--device", self.device,
               "--port", str(self.port)]
        started = time.perf_counter()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self._log.flush()
                tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
                raise RuntimeError(f"fluxserve serve exited with {self.proc.returncode}; the end of "
                                   f"{self.log_path}:\n" + "\n".join(tail))
            try:
                with urllib.request.urlopen(self.base_url + "/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout:.0f}s; see {self.log_path}")

    def gpu_memory_gb(self) -> float | None:
        """GPU memory of the server process as nvidia-smi reports it (includes the CUDA context)."""
        if self.proc is None or not self.device.startswith("cuda") or not shutil.which("nvidia-smi"):
            return None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            pid, _, mem = line.partition(",")
            if pid.strip() == str(self.proc.pid):
                return round(float(mem) / 1024, 2)
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self._log.close()


def _openai_client(server: ServerProcess) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="bench", max_retries=0, timeout=600)


@functools.cache
def _edit_files(case: Case) -> dict[str, tuple[str, bytes, str]]:
    """The multipart files of a case's ``images.edit`` call: the input photo, and for inpaint the mask as
    OpenAI takes it (an RGBA PNG whose transparent pixels mark the area to change). Encoded once per case."""
    from PIL import Image

    def png(image: Any) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    images, mask = edit_inputs(case)
    files = {"image": ("photo.png", png(Image.fromarray(images[0])), "image/png")}
    if mask is not None:
        rgba = np.full((case.height, case.width, 4), 255, np.uint8)
        rgba[..., 3] = 255 - mask
        files["mask"] = ("mask.png", png(Image.fromarray(rgba, mode="RGBA")), "image/png")
    return files


def _http_request(client: Any, model: str, case: Case, prompt: str, seed: int) -> tuple[float, str, dict[str, float]]:
    """One ``images.generate`` (or, for an edit case, ``images.edit``) call; returns (seconds, b64 PNG, the
    server's stage timings for the image)."""
    body: dict[str, Any] = {"seed": seed, "num_inference_steps": case.steps, "guidance_scale": case.guidance,
                            "max_sequence_length": MAX_SEQUENCE_LENGTH}
    size = f"{case.width}x{case.height}"
    t = time.perf_counter()
    if case.task == "generate":
        resp = client.images.generate(model=model, prompt=prompt, n=1, size=size, response_format="b64_json",
                                      extra_body=body)
    else:
        body["strength"] = case.strength
        resp = client.images.edit(model=model, prompt=prompt, n=1, size=size, response_format="b64_json",
                                  extra_body=body, **_edit_files(case))
    seconds = time.perf_counter() - t
    item = resp.data[0]
    timing = (item.model_extra or {}).get("timing") or {}
    return seconds, item.b64_json or "", {k: float(v) for k, v in timing.items() if isinstance(v, int | float)}


def run_http(server: ServerProcess, cases: list[Case], reps: int, mode: str,
             refs: dict[str, np.ndarray], warmups: int = 2) -> list[Measurement]:
    client = _openai_client(server)
    prompts = _prompts(f"http-{mode}")
    lock = threading.Lock()
    stages: dict[str, list[float]] | None = None  # the timed requests' server timings go here

    def request(case: Case, prompt: str, seed: int) -> tuple[float, str]:
        seconds, b64, timing = _http_request(client, server.model, case, prompt, seed)
        if stages is not None:
            with lock:
                for key, value in timing.items():
                    stages.setdefault(key, []).append(value)
        return seconds, b64

    def next_prompt() -> str:
        with lock:
            return next(prompts)

    results: list[Measurement] = []
    for case in cases:
        n = case.clients
        m = Measurement(case.name, "http", mode, note=f"{n} concurrent clients" if n > 1 else "")
        with ThreadPoolExecutor(n) as pool:
            stages = None
            for _ in range(warmups if n == 1 else warmups + 1):  # warm-up: compiles this shape (and batch sizes)
                list(pool.map(lambda i, c=case: request(c, next_prompt(), _seed_for(i)), range(n)))
            mem = [server.gpu_memory_gb()]
            stages = m.server_timing
            begun = time.perf_counter()

            def client_loop(index: int, c: Case = case) -> list[float]:
                return [request(c, next_prompt(), _seed_for(index * reps + r))[0] for r in range(reps)]

            for lat in pool.map(client_loop, range(n)):
                m.latencies.extend(lat)
            m.wall_s = time.perf_counter() - begun
            m.images = n * reps
            stages = None
            mem.append(server.gpu_memory_gb())
        known = [x for x in mem if x is not None]
        m.peak_mem_gb = max(known) if known else None
        if case.name in refs:
            _, b64 = request(case, QUALITY_PROMPT, QUALITY_SEED)
            p, mx = case_psnr(case, _decode_png(base64.b64decode(b64)), refs[case.name])
            m.psnr_db, m.max_diff = round(p, 2), mx
        results.append(m)
        log.info("http %s %s: %s", mode, case.name, m.summary())
    return results


# --------------------------------------------------------------------------------------------------
# orchestration

@contextlib.contextmanager
def _phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    t = time.perf_counter()
    log.info("phase %s ...", name)
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 1)
        log.info("phase %s done in %.1fs", name, timings[name])


def _forward_inputs(pipe: Any, case: Case) -> TransformerCall | None:
    """None for FLUX.1 (its synthetic inputs), else the inputs captured from the family's own pipeline."""
    return None if case.variant in FLUX_VARIANTS else captured_transformer_inputs(pipe, _call_kwargs(case, pipe))


def _prepare_family_model(key: str, device: str, work: Path, timings: dict[str, float],
                          store_dtype: str = "bfloat16") -> tuple[str, Any]:
    """A registry model of any family: its tiny version (CPU) or its full-size architecture with random
    weights built on the GPU from ``FamilyRunner.full_size_components`` and saved for ``from_pretrained``
    (:func:`save_pipeline`)."""
    import diffusers

    from fluxserve.engine.families import runner_for
    from fluxserve.models.registry import BUILTIN_MODELS

    spec = BUILTIN_MODELS[key]
    runner = runner_for(spec.family)
    family = runner.descriptor
    cls = getattr(diffusers, family.pipeline_classes["generate"])
    if spec.tiny is not None:
        from fluxserve.engine.loading import tiny_model_dir
        from fluxserve.engine.tiny import ensure_tiny_model
        from fluxserve.settings import load_settings

        path = ensure_tiny_model(tiny_model_dir(load_settings(cache_dir=str(work / "cache")), spec), spec.tiny)
        pipe = cls.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return key, pipe.to(device)
    with _phase(f"build_{key}", timings):
        components = runner.full_size_components(device, torch.bfloat16, family.full_size_variants.get(key))
        pipe = cls(**components)
        pipe.set_progress_bar_config(disable=True)
    path = work / f"{key}-random"
    with _phase(f"save_{key}", timings):
        if path.exists():
            shutil.rmtree(path)
        save_pipeline(pipe, path, store_dtype)
    return str(path), pipe


def _prepare_model(variant: str, device: str, work: Path, timings: dict[str, float],
                   store_dtype: str = "bfloat16") -> tuple[str, Any]:
    """Return (model name for fluxserve, in-memory baseline pipeline)."""
    if variant not in FLUX_VARIANTS:
        return _prepare_family_model(variant, device, work, timings, store_dtype)
    if variant == "tiny":
        from diffusers import FluxPipeline

        from fluxserve.engine.loading import tiny_model_dir
        from fluxserve.engine.tiny import ensure_tiny_model
        from fluxserve.models.registry import resolve_model
        from fluxserve.settings import load_settings

        spec = resolve_model("tiny-flux")
        path = ensure_tiny_model(tiny_model_dir(load_settings(cache_dir=str(work / "cache")), spec), "flux")
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return "tiny-flux", pipe.to(device)
    with _phase(f"build_{variant}", timings):
        pipe = build_fullsize_flux(guidance_embeds=variant == "dev", device=device)
    path = work / f"flux-{variant}-random"
    with _phase(f"save_{variant}", timings):
        if path.exists():
            shutil.rmtree(path)
        save_pipeline(pipe, path, store_dtype)
    return str(path), pipe


def print_table(rows: list[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout
    header = (f"{'case':<11} {'path':<8} {'mode':<9} {'median s':>9} {'min s':>8} {'img/s':>7} {'vs (a)':>7} "
              f"{'peak GB':>8} {'PSNR dB':>8} {'maxdiff':>7}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        def f(v: Any, fmt: str) -> str:
            width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
            return "—".rjust(width) if v is None else format(v, fmt)
        print(f"{r['case']:<11} {r['path']:<8} {r['mode']:<9} {f(r['median_s'], '9.4f')} {f(r['min_s'], '8.4f')} "
              f"{f(r['images_per_s'], '7.3f')} {f(r.get('speedup'), '7.2f')} {f(r['peak_mem_gb'], '8.2f')} "
              f"{f(r['psnr_db'], '8.2f')} {f(r['max_diff'], '7d')}", file=out)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = str(os.cpu_count())
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--cases", help="comma-separated case names (default: all for the device)")
    parser.add_argument("--modes", help="comma-separated: plain, lossless, fast (default CUDA lossless,fast; "
                                        "CPU plain)")
    parser.add_argument("--paths", default="baseline,engine,http", help="which of baseline,engine,http to run")
    parser.add_argument("--reps", type=int, default=5, help="timed requests per case and client (default 5)")
    parser.add_argument("--restart", action="store_true",
                        help="after the HTTP cases, restart the server and time start-to-ready again")
    parser.add_argument("--work-dir", type=Path, help="where models and compile caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON output file")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--warmups", type=int, default=2,
                        help="untimed requests per case before the timed ones, engine and http (default 2)")
    parser.add_argument("--store-dtype", choices=STORE_DTYPES, default="bfloat16",
                        help="dtype of the random-weight checkpoint on disk (CUDA): float8_e4m3fn halves it for "
                             "models whose bf16 files do not fit the disk; weights are rounded to fp8 in memory "
                             "first and upcast on load, so every path computes in bf16 on the same values")
    parser.add_argument("--family", help="bench another family instead of FLUX.1: a family (klein, zimage, qwen, "
                                         "...) or a registry key (klein-9b, qwen-2512, ...); on CPU its tiny model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.family and args.family not in ("flux", "schnell"):
        all_cases = family_cases(args.family, device)
    else:
        all_cases = CUDA_CASES if device.startswith("cuda") else CPU_CASES
    if args.list:
        for c in all_cases:
            print(f"{c.name}: {c.width}x{c.height}, {c.steps} steps, {c.clients} client(s), model {c.variant}")
        return 0
    wanted = set(args.cases.split(",")) if args.cases else None
    cases = [c for c in all_cases if wanted is None or c.name in wanted]
    if not cases:
        print(f"no such case; choose from {[c.name for c in all_cases]}", file=sys.stderr)
        return 2
    modes = (args.modes.split(",") if args.modes else (["lossless", "fast"] if device.startswith("cuda")
                                                       else ["plain"]))
    paths = set(args.paths.split(","))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # fluxserve leaves one core to the HTTP server on CPU; every path gets the same threads
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
        "command": "fluxserve bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": _versions(), "reps": args.reps, "warmups": args.warmups, "store_dtype": args.store_dtype,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "results": [], "engine": {}, "server": {}, "phases": {},
    }
    timings: dict[str, float] = report["phases"]
    measurements: list[Measurement] = []

    def flush() -> None:
        rows = [m.summary() for m in measurements]
        base = {r["case"]: r for r in rows if r["path"] == "baseline"}
        for r in rows:
            b = base.get(r["case"])
            if b and b["median_s"] and r["median_s"]:
                r["speedup"] = round(b["median_s"] / r["median_s"], 3)
                if r["images_per_s"] and b["images_per_s"]:
                    r["throughput_ratio"] = round(r["images_per_s"] / b["images_per_s"], 3)
        report["results"] = rows
        args.out.write_text(json.dumps(report, indent=2))

    for variant in dict.fromkeys(c.variant for c in cases):
        vcases = [c for c in cases if c.variant == variant]
        model_name, pipe = _prepare_model(variant, device, work, timings, args.store_dtype)
        refs: dict[str, np.ndarray] = {}
        if "baseline" in paths or "engine" in paths or "http" in paths:
            with _phase(f"baseline_{variant}", timings):
                res, refs = run_baseline(pipe, vcases, args.reps, device)
            if "baseline" in paths:
                measurements.extend(res)
            if device.startswith("cuda"):
                report["engine"][f"baseline_{variant}_forward_1024_s"] = round(
                    time_forward(pipe, inputs=_forward_inputs(pipe, vcases[0])), 4)
        del pipe
        _free(device)
        flush()
        for mode in modes:
            cache_dir = work / f"cache-{variant}-{mode}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            # On CPU the engine runs while the server is up, alternating with it (paired overhead).
            pair = not device.startswith("cuda") and "engine" in paths and "http" in paths
            if "http" in paths:
                sizes = list(dict.fromkeys(f"{c.width}x{c.height}" for c in vcases))
                server = ServerProcess(model_name, device, mode, cache_dir, work / f"server-{variant}-{mode}.log",
                                       sizes)
                key = f"{variant}_{mode}"
                try:
                    with _phase(f"http_{key}", timings):
                        report["server"][f"{key}_first_start_to_ready_s"] = round(server.start(), 1)
                        measurements.extend(run_http(server, vcases, args.reps, mode, refs, args.warmups))
                    flush()
                    if pair:
                        with _phase(f"engine_{variant}_{mode}", timings):
                            res, info = run_engine(model_name, vcases, args.reps, mode, device, refs, cache_dir,
                                                   paired_server=server, warmups=args.warmups)
                        measurements.extend(res)
                        report["engine"][f"{variant}_{mode}"] = info
                    server.stop()
                    if args.restart:
                        report["server"][f"{key}_second_start_to_ready_s"] = round(server.start(), 1)
                        server.stop()
                except Exception as exc:
                    log.exception("http %s failed", key)
                    report["server"][f"{key}_error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    server.stop()
                flush()
            if "engine" in paths and not pair:
                try:
                    with _phase(f"engine_{variant}_{mode}", timings):
                        res, info = run_engine(model_name, vcases, args.reps, mode, device, refs, cache_dir,
                                               warmups=args.warmups)
                    measurements.extend(res)
                    report["engine"][f"{variant}_{mode}"] = info
                except Exception as exc:
                    log.exception("engine %s %s failed", variant, mode)
                    report["engine"][f"{variant}_{mode}_error"] = f"{type(exc).__name__}: {exc}"
                _free(device)
                flush()
        if variant not in ("tiny",) and not variant.startswith("tiny-"):
            shutil.rmtree(Path(model_name), ignore_errors=True)  # 38 GB: free the disk for the next variant
    flush()
    print()
    print(f"fluxserve bench — {report['versions']} — device {device} — {report['date']}")
    print_table(report["results"])
    if report["server"]:
        print("server:", json.dumps(report["server"]))
    if report["engine"]:
        print("engine:", json.dumps(report["engine"]))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
