"""``fluxserve bench``: the same work measured several ways on one machine in one run.

(a) **baseline** — plain diffusers ``FluxPipeline`` (bf16 on CUDA, no tricks, ``guidance_scale=0``), called
    directly (edit cases: the family's diffusers edit pipeline; ``--family``: that family's pipeline);
peers — the best public recipes called directly on the same checkpoint (:mod:`fluxbench.recipes`):
    **recipe-lossless** (the flux-fast recipe without quantization), **recipe-fp8** (with torchao float8 and
    the fastest attention kernel that installs) and **cache-dit** (its best configuration without step
    caching), each skipped with its reason where it cannot run;
(b) **engine** — fluxserve's :class:`~fluxserve.engine.engine.DeviceEngine` called directly;
(c) **http** — a real ``fluxserve serve`` subprocess on loopback, driven with the official ``openai``
    client (``response_format=b64_json``, extension fields through ``extra_body``).

Every path is timed end to end with the same image encoder — the server's own PNG encoder at the server's
level, then base64 (:class:`ServerEncoder`) — so the headline ratios compare generation, not PNG encoders; a
second, pipeline-only ratio leaves encoding out (for (c): the server's text_encode + denoise + vae_decode).
Engine and HTTP rows are compared with the recipe of the same numerics (lossless: recipe-lossless, fast:
recipe-fp8), then with plain diffusers. A compute section gives one transformer forward per path in TFLOP/s
against the GEMM ceiling measured on the same device in the same run.

On CUDA the model is the full-size FLUX.1 architecture with random weights, built on the GPU (a second)
and written with ``save_pretrained`` to a local directory so every other path loads it through the normal
``from_pretrained`` path; images are noise, timings are those of the real checkpoints. On CPU the tiny
registry model ``tiny-flux`` is used and the point is the server's own overhead ((c) − (b)).

Every timed request has a prompt of its own (the prompt-embedding cache never hits); the quality check
uses one fixed prompt and seed on every path and compares each with (a) by PSNR and max pixel diff.
Prints a table and writes JSON (``--out``) as it goes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import hashlib
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxbench.recipes import (
    AUTOTUNE_BUDGETS,
    COMPILE_MODES,
    COMPILE_TARGETS,
    MATCHING_RECIPE,
    PEER_PATHS,
    CompileCache,
    PeerOptions,
    PeerSetup,
    PeerUnavailable,
    forward_flops,
    fresh_pipeline,
    gemm_ceiling_tflops,
    median_forward_seconds,
    peer_problem,
    prepare_cache_dit,
    prepare_recipe,
    scoped_compile_config,
)
from fluxserve.generation import Task

log = logging.getLogger(__name__)

QUALITY_PROMPT = "a lighthouse on a cliff at dusk, oil painting"
QUALITY_SEED = 42
MAX_SEQUENCE_LENGTH = 256
"""T5 tokens on every path (FLUX.1-schnell's default, and the length the reference forward timings use)."""


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
    """baseline | recipe-lossless | recipe-fp8 | cache-dit | engine | http."""
    mode: str
    latencies: list[float] = field(default_factory=list)
    """End to end, encoding included (the same encoder on every path)."""
    pipeline_latencies: list[float] = field(default_factory=list)
    """The same requests without encoding (http: the server's text_encode + denoise + vae_decode)."""
    images: int = 0
    wall_s: float = 0.0
    peak_mem_gb: float | None = None
    psnr_db: float | None = None
    max_diff: int | None = None
    note: str = ""
    skipped: str | None = None
    """Why this path has no timings here (it cannot run on this device, its package is missing, it failed)."""
    warmup_s: float | None = None
    """The untimed warm-up calls together (for the peers: their compile, in the first)."""
    extra: dict[str, Any] = field(default_factory=dict)
    server_timing: dict[str, list[float]] = field(default_factory=dict)
    """http: the stage timings each timed response reports (``data[0].timing``: text_encode, denoise, ...)."""

    def summary(self) -> dict[str, Any]:
        lat, pipe = self.latencies, self.pipeline_latencies
        stages = {k: round(statistics.median(v), 4) for k, v in self.server_timing.items() if v}
        return {
            "case": self.case, "path": self.path, "mode": self.mode,
            "median_s": round(statistics.median(lat), 4) if lat else None,
            "min_s": round(min(lat), 4) if lat else None,
            "pipeline_median_s": round(statistics.median(pipe), 4) if pipe else None,
            "images_per_s": round(self.images / self.wall_s, 3) if self.wall_s else None,
            "requests": len(lat), "images": self.images, "peak_mem_gb": self.peak_mem_gb,
            "psnr_db": self.psnr_db, "max_diff": self.max_diff, "note": self.note,
            **({"skipped": self.skipped} if self.skipped else {}),
            **({"warmup_s": round(self.warmup_s, 2)} if self.warmup_s is not None else {}),
            **self.extra,
            **({"server_stage_median_s": stages} if stages else {}),
        }


class ServerEncoder:
    """Encode images exactly as ``fluxserve serve`` answers ``response_format=b64_json``: PNG by fluxserve's
    encoder (``storage/png.py``) at ``FLUX_PNG_COMPRESS_LEVEL``, then base64, the images of one call on
    ``FLUX_ENCODE_THREADS`` threads. Every path of the bench encodes with it (the server does the same)."""

    def __init__(self) -> None:
        from fluxserve.settings import load_settings

        settings = load_settings()
        self.level = settings.png_compress_level
        self.pool = ThreadPoolExecutor(settings.encode_threads)

    def encode(self, pixels: list[np.ndarray]) -> list[str]:
        from fluxserve.storage.images import encode_image, to_base64

        return list(self.pool.map(lambda px: to_base64(encode_image(px, "png", png_level=self.level)), pixels))

    def close(self) -> None:
        self.pool.shutdown()


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


def _first_transformer_call(pipe: Any, **call: Any) -> TransformerCall:
    """The transformer's arguments in the first forward of one pipeline call (a forward pre-hook)."""
    captured: list[TransformerCall] = []

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.append((args, dict(kwargs)))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        text_to_image(pipe)(num_inference_steps=1, output_type="latent", **call)
    finally:
        handle.remove()
    return captured[0]


def captured_transformer_inputs(pipe: Any, call_kwargs: dict[str, Any], width: int = 1024,
                                height: int = 1024) -> TransformerCall:
    """The transformer's arguments in a real one-step pipeline call at this size (any family): captured
    with a forward pre-hook, so a forward can be timed with exactly the pipeline's shapes."""
    with torch.inference_mode():
        return _first_transformer_call(pipe, prompt="a lighthouse", width=width, height=height, **call_kwargs)


def time_forward(pipe: Any, reps: int = 10, inputs: TransformerCall | None = None, *,
                 inference_mode: bool = True) -> float:
    """Median seconds of one transformer forward at 1024² (FLUX.1: 4096 image + 256 text tokens; other
    families: the arguments their pipeline passes, see :func:`captured_transformer_inputs`).

    ``inference_mode=False`` runs it under ``no_grad``, as a plain pipeline call does: a transformer compiled
    whole by a pipeline call would otherwise recompile for the other grad mode."""
    args, kwargs = inputs if inputs is not None else ((), transformer_inputs(pipe))
    device = str(pipe.transformer.device) if hasattr(pipe.transformer, "device") else "cpu"
    with torch.inference_mode() if inference_mode else torch.no_grad():
        return median_forward_seconds(lambda: pipe.transformer(*args, **kwargs), device, reps)


def pipeline_transformer_inputs(pipe: Any, case: Case) -> TransformerCall:
    """The transformer's arguments in a one-step plain call of ``pipe`` for ``case`` (its size, its call
    arguments), captured under the pipeline's own grad mode: the forward every path times for the compute
    section, with exactly the shapes and argument structure its pipeline calls use."""
    return _first_transformer_call(pipe, prompt=QUALITY_PROMPT, width=case.width, height=case.height,
                                   **_call_kwargs(case, pipe))


# --------------------------------------------------------------------------------------------------
# (a) baseline

def run_direct(pipe: Any, cases: list[Case], reps: int, device: str, encoder: ServerEncoder, *, path: str,
               mode: str, note: str = "", warmups: int = 1,
               refs: dict[str, np.ndarray] | None = None) -> tuple[list[Measurement], dict[str, np.ndarray]]:
    """Plain calls of ``pipe`` (the baseline's or a peer's), each image encoded by ``encoder`` as the server
    would. Returns measurements and each single-client case's quality image (compared with ``refs``, the
    baseline's, when given)."""
    results: list[Measurement] = []
    quality: dict[str, np.ndarray] = {}
    prompts = _prompts(path)

    def call(case: Case, prompts_: list[str], seeds: list[int]) -> tuple[list[np.ndarray], list[str], float]:
        """Pixels, encoded images and the seconds the pipeline call took (end to end: the caller's clock)."""
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        plain, edit = plain_pipeline(pipe, case)
        started = time.perf_counter()
        images = plain(prompt=prompts_, height=case.height, width=case.width, num_inference_steps=case.steps,
                       generator=gens, **_call_kwargs(case, pipe), **edit).images
        _sync(device)
        generated = time.perf_counter() - started
        pixels = [np.asarray(image.convert("RGB")) for image in images]
        return pixels, encoder.encode(pixels), generated

    for case in cases:
        n = case.clients
        m = Measurement(case.name, path, mode,
                        note="; ".join(x for x in (note, f"one pipeline call with {n} prompts" if n > 1 else "") if x))
        started = time.perf_counter()
        for _ in range(max(1, warmups)):
            call(case, [next(prompts) for _ in range(n)], [_seed_for(i) for i in range(n)])
        m.warmup_s = time.perf_counter() - started
        _sync(device)
        _reset_peak(device)
        begun = time.perf_counter()
        for r in range(reps):
            t = time.perf_counter()
            _, _, generated = call(case, [next(prompts) for _ in range(n)], [_seed_for(r * n + i) for i in range(n)])
            m.latencies.append(time.perf_counter() - t)
            m.pipeline_latencies.append(generated)
            m.images += n
        m.wall_s = time.perf_counter() - begun
        m.peak_mem_gb = _peak_gb(device)
        if case.clients == 1:
            pixels, _, _ = call(case, [QUALITY_PROMPT], [QUALITY_SEED])
            quality[case.name] = pixels[0]
            if refs is not None and case.name in refs:
                p, mx = case_psnr(case, pixels[0], refs[case.name])
                m.psnr_db, m.max_diff = round(p, 2), mx
            if path == "baseline":  # what the earlier headline counted: PIL's default PNG level
                m.extra["pil_default_png_s"] = round(_pil_default_png_seconds(pixels[0]), 4)
        results.append(m)
        log.info("%s %s: %s", path, case.name, m.summary())
    return results, quality


def run_baseline(pipe: Any, cases: list[Case], reps: int, device: str,
                 encoder: ServerEncoder | None = None) -> tuple[list[Measurement], dict[str, np.ndarray]]:
    """(a): plain pipeline calls, images encoded as the server encodes them. Returns measurements and the
    quality images every other path is compared with."""
    own = encoder is None
    encoder = encoder or ServerEncoder()
    try:
        return run_direct(pipe, cases, reps, device, encoder, path="baseline", mode="plain")
    finally:
        if own:
            encoder.close()


def _pil_default_png_seconds(pixels: np.ndarray, reps: int = 3) -> float:
    """Median seconds of PIL's default PNG (level 6) of ``pixels``, as a plain script would save it."""
    from PIL import Image

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        Image.fromarray(pixels).save(io.BytesIO(), format="PNG")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# peers: the public recipes, called directly

@dataclass
class PeerSource:
    """What the peers build on: the baseline's modules other than the transformer and the VAE (text encoders,
    tokenizers, scheduler), the checkpoint directory they load the rest from, its dtype and pipeline class."""

    components: dict[str, Any]
    local_dir: Path
    dtype: torch.dtype
    pipeline_class: str


def run_peer(path: str, source: PeerSource, cases: list[Case], reps: int, device: str, encoder: ServerEncoder,
             refs: dict[str, np.ndarray], options: PeerOptions, warmups: int,
             forward_inputs: TransformerCall | None, info: dict[str, Any] | None = None,
             flush: Callable[[], None] = lambda: None) -> tuple[list[Measurement], dict[str, Any]]:
    """One peer path on the text-to-image cases: a fresh transformer and VAE from the checkpoint over the
    baseline's text encoders, the recipe applied, each compiled target timed on its own (:func:`compile_peer`),
    then timed like the baseline. Where it cannot run, or fails, its rows carry the reason instead of timings.

    ``info`` (the report's entry for this peer) is filled in as the path goes and ``flush`` writes the report
    after each step, so a run stopped in the middle of a long compile still says how far it got."""
    generate = [c for c in cases if c.task == "generate"]
    info = {} if info is None else info
    rows = [Measurement(c.name, path, "—", skipped=f"{path} is timed on text-to-image cases only")
            for c in cases if c.task != "generate"]
    problem = peer_problem(path, source.pipeline_class, device)
    if problem or not generate:
        if problem:
            info["skipped"] = problem
        return rows + [Measurement(c.name, path, "—", skipped=problem) for c in generate], info
    pipe = None
    before = _compile_cache_counters()
    try:
        with scoped_compile_config():
            started = time.perf_counter()
            pipe = fresh_pipeline(source.components, source.local_dir, device, source.dtype, source.pipeline_class)
            info["load_s"] = round(time.perf_counter() - started, 2)
            if path == "cache-dit":
                setup: PeerSetup = prepare_cache_dit(pipe, options=options, device=device)
            else:
                setup = prepare_recipe(pipe, fp8=path == "recipe-fp8", options=options, device=device)
            info["applied"] = setup.applied
            info["fp8"] = setup.fp8
            flush()
            compile_peer(pipe, generate[0], forward_inputs, device, info, flush)
            mode = "fp8" if setup.fp8 else "lossless"
            measured, _ = run_direct(pipe, generate, reps, device, encoder, path=path, mode=mode, note=setup.note,
                                     warmups=warmups, refs=refs)
            rows.extend(measured)
            if forward_inputs is not None:
                info["forward_s"] = round(time_forward(pipe, inputs=forward_inputs, inference_mode=False), 4)
    except PeerUnavailable as exc:
        info["skipped"] = str(exc)
        rows.extend(Measurement(c.name, path, "—", skipped=str(exc)) for c in generate)
    except Exception as exc:  # a recipe that fails here is a row that says so, not a lost run
        log.exception("%s failed", path)
        done = {m.case for m in rows if m.latencies}
        reason = info["skipped"] = f"failed: {type(exc).__name__}: {exc}"
        rows.extend(Measurement(c.name, path, "—", skipped=reason) for c in generate if c.name not in done)
    finally:
        del pipe
        info["compile_cache_counters"] = _counters_since(before)
        torch._dynamo.reset()  # its compiled graphs and CUDA graph pools go with it
        _free(device)
    return rows, info


def compile_peer(pipe: Any, case: Case, forward_inputs: TransformerCall | None, device: str,
                 info: dict[str, Any], flush: Callable[[], None]) -> None:
    """Compile a prepared peer's targets one at a time before its first pipeline call, each on the inputs that
    call will pass (the transformer: the captured forward, :func:`pipeline_transformer_inputs`; ``vae.decode``:
    latents of the case's size), and record each one's seconds and cache hits in ``info["compile"]`` as it
    finishes. The pipeline's warm-up then meets compiled code (a test checks it compiles nothing more).

    Inductor writes a graph to its cache only when that graph's compile completes, so a run stopped in the
    middle of one target keeps nothing of it but its autotuning results; these entries say which target
    completed. Nothing happens for a pipeline that was not compiled (its targets are plain modules)."""
    steps: dict[str, Any] = info.setdefault("compile", {})
    targets: list[tuple[str, Callable[[], Any]]] = []
    if forward_inputs is not None and _is_compiled(pipe.transformer):
        args, kwargs = forward_inputs
        targets.append(("transformer", lambda: pipe.transformer(*args, **kwargs)))
    # FLUX.1's latents are known; other families' VAEs take other shapes, so their first pipeline call compiles it
    if _is_compiled(pipe.vae.decode) and type(pipe).__name__ == "FluxPipeline":
        vae = pipe.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.randn(1, vae.config.latent_channels, case.height // factor, case.width // factor,
                              device=vae.device, dtype=vae.dtype)
        targets.append(("vae.decode", lambda: vae.decode(latents, return_dict=False)))
    for name, call in targets:
        before = _compile_cache_counters()
        log.info("compiling %s ...", name)
        started = time.perf_counter()
        with torch.no_grad():  # a pipeline call's grad mode: the same guards, so the pipeline reuses the graph
            call()
        _sync(device)
        steps[name] = {"seconds": round(time.perf_counter() - started, 1), "counters": _counters_since(before)}
        log.info("compiled %s: %s", name, steps[name])
        flush()


def _is_compiled(target: Any) -> bool:
    """A ``torch.compile`` result: an ``OptimizedModule`` or a compiled function."""
    return isinstance(target, torch._dynamo.eval_frame.OptimizedModule) or hasattr(target, "_torchdynamo_orig_callable")


def _counters_since(before: dict[str, int]) -> dict[str, int]:
    after = _compile_cache_counters()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _compile_cache_counters() -> dict[str, int]:
    """Inductor's and AOTAutograd's cache hit/miss/bypass counts so far in this process (did a warm start hit?)."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": int(value) for group in ("inductor", "aot_autograd")
            for name, value in counters[group].items() if "cache" in name}


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# (b) engine

def run_engine(model_name: str, cases: list[Case], reps: int, mode: str, device: str,
               refs: dict[str, np.ndarray], cache_dir: Path,
               paired_server: ServerProcess | None = None,
               warmups: int = 2, encoder: ServerEncoder | None = None,
               forward_inputs: TransformerCall | None = None) -> tuple[list[Measurement], dict[str, Any]]:
    """(b). With ``paired_server`` (a running server of the same model), single-client cases also run
    ``reps`` alternating engine/HTTP pairs: the per-pair difference is the server's own overhead, robust
    to load drifting on a shared machine. ``forward_inputs`` (:func:`pipeline_transformer_inputs`): one
    transformer forward of the loaded model is timed on them for the compute section."""
    from fluxserve.generation import GenerationParams, ImageRequest
    from fluxserve.runtime import Runtime
    from fluxserve.settings import load_settings
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
    own_encoder = encoder is None
    encoder = encoder or ServerEncoder()
    prompts = _prompts(f"engine-{mode}")
    results: list[Measurement] = []
    stages: dict[str, list[float]] = {}

    @functools.cache
    def digest(case: Case) -> str | None:  # what the HTTP layer computes once per request, once per case here
        images, mask = edit_inputs(case)
        return inputs_digest(images, mask) if images else None

    def call(case: Case, prompts_: list[str], seeds: list[int]) -> tuple[list[str], float]:
        """Encoded images and the seconds the engine took to generate them (before encoding)."""
        images, mask = edit_inputs(case)
        params = GenerationParams(spec.key, case.width, case.height, case.steps, case.guidance, MAX_SEQUENCE_LENGTH,
                                  task=case.task, strength=case.strength, inputs=digest(case))
        requests = [ImageRequest(p, [s], images=list(images), mask=mask) for p, s in zip(prompts_, seeds, strict=True)]
        t = time.perf_counter()
        out = engine.generate(model, params, requests)
        generated = time.perf_counter() - t
        for key, value in out[0].timings.items():
            stages.setdefault(f"{case.name}:{key}", []).append(value)
        pixels = [img for result in out for img in result.images]
        t = time.perf_counter()
        encoded = encoder.encode(pixels)
        stages.setdefault(f"{case.name}:png_base64", []).append(time.perf_counter() - t)
        return encoded, generated

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
                _, generated = call(case, [next(prompts) for _ in range(n)], [_seed_for(r * n + i) for i in range(n)])
                m.latencies.append(time.perf_counter() - t)
                m.pipeline_latencies.append(generated)
                m.images += n
            m.wall_s = time.perf_counter() - begun
            m.peak_mem_gb = _peak_gb(device)
            if case.name in refs:
                b64 = call(case, [QUALITY_PROMPT], [QUALITY_SEED])[0][0]
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
        if forward_inputs is not None and model.primary is not None:
            info["forward_s"] = round(time_forward(model.primary, inputs=forward_inputs), 4)
    finally:
        if own_encoder:
            encoder.close()
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
                 warmup_sizes: list[str], env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.model, self.device, self.mode = model, device, mode
        self.cache_dir, self.log_path, self.warmup_sizes = cache_dir, log_path, warmup_sizes
        self.env = env or {}
        """FLUX_ settings laid over the bench's own (``FLUX_MAX_BATCH``, ``FLUX_JOB_STORE``, ...)."""
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
        env.update(self.env)
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


PIPELINE_STAGES = ("text_encode", "denoise", "vae_decode")
"""The server's stages that a plain pipeline call covers (the pipeline-only time of an HTTP request)."""


def run_http(server: ServerProcess, cases: list[Case], reps: int, mode: str,
             refs: dict[str, np.ndarray], warmups: int = 2) -> list[Measurement]:
    client = _openai_client(server)
    prompts = _prompts(f"http-{mode}")
    lock = threading.Lock()
    timed: Measurement | None = None  # the timed requests' server timings go to its server_timing

    def request(case: Case, prompt: str, seed: int) -> tuple[float, str]:
        seconds, b64, timing = _http_request(client, server.model, case, prompt, seed)
        if timed is not None:
            with lock:
                for key, value in timing.items():
                    timed.server_timing.setdefault(key, []).append(value)
                if all(stage in timing for stage in PIPELINE_STAGES):  # the pipeline-only time of this request
                    timed.pipeline_latencies.append(sum(timing[stage] for stage in PIPELINE_STAGES))
        return seconds, b64

    def next_prompt() -> str:
        with lock:
            return next(prompts)

    results: list[Measurement] = []
    for case in cases:
        n = case.clients
        m = Measurement(case.name, "http", mode, note=f"{n} concurrent clients" if n > 1 else "")
        with ThreadPoolExecutor(n) as pool:
            timed = None
            for _ in range(warmups if n == 1 else warmups + 1):  # warm-up: compiles this shape (and batch sizes)
                list(pool.map(lambda i, c=case: request(c, next_prompt(), _seed_for(i)), range(n)))
            mem = [server.gpu_memory_gb()]
            timed = m
            begun = time.perf_counter()

            def client_loop(index: int, c: Case = case) -> list[float]:
                return [request(c, next_prompt(), _seed_for(index * reps + r))[0] for r in range(reps)]

            for lat in pool.map(client_loop, range(n)):
                m.latencies.extend(lat)
            m.wall_s = time.perf_counter() - begun
            m.images = n * reps
            timed = None
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
                          store_dtype: str = "bfloat16") -> tuple[str, Any, Path]:
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

        path = ensure_tiny_model(tiny_model_dir(load_settings(cache_dir=str(work / "cache")).engine, spec), spec.tiny)
        pipe = cls.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return key, pipe.to(device), path
    with _phase(f"build_{key}", timings):
        components = runner.full_size_components(device, torch.bfloat16, family.full_size_variants.get(key))
        pipe = cls(**components)
        pipe.set_progress_bar_config(disable=True)
    path = work / f"{key}-random"
    with _phase(f"save_{key}", timings):
        if path.exists():
            shutil.rmtree(path)
        save_pipeline(pipe, path, store_dtype)
    return str(path), pipe, path


def _prepare_model(variant: str, device: str, work: Path, timings: dict[str, float],
                   store_dtype: str = "bfloat16", keep_model: bool = False) -> tuple[str, Any, Path]:
    """Return (model name for fluxserve, in-memory baseline pipeline, its checkpoint directory).

    ``keep_model`` (full-size FLUX.1): a checkpoint of the same variant that an earlier run left in ``work``
    is loaded instead of building and saving a new one (the save is ~35 s of a GPU run)."""
    if variant not in FLUX_VARIANTS:
        return _prepare_family_model(variant, device, work, timings, store_dtype)
    if variant == "tiny":
        from diffusers import FluxPipeline

        from fluxserve.engine.loading import tiny_model_dir
        from fluxserve.engine.tiny import ensure_tiny_model
        from fluxserve.models.registry import resolve_model
        from fluxserve.settings import load_settings

        spec = resolve_model("tiny-flux")
        path = ensure_tiny_model(tiny_model_dir(load_settings(cache_dir=str(work / "cache")).engine, spec), "flux")
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return "tiny-flux", pipe.to(device), path
    path = work / f"flux-{variant}-random"
    stamp = {"variant": variant, "store_dtype": store_dtype, "diffusers": _versions()["diffusers"]}
    if keep_model and _kept_checkpoint(path) == stamp:
        from diffusers import FluxPipeline

        try:
            with _phase(f"load_kept_{variant}", timings):  # the checkpoint a run before this one wrote and kept
                kwargs: dict[str, Any] = {"device_map": device} if device.startswith("cuda") else {}
                pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16, **kwargs)
                pipe.set_progress_bar_config(disable=True)
            return str(path), pipe, path
        except (OSError, ValueError, RuntimeError):  # unreadable: build and save a new one instead
            log.exception("the kept checkpoint %s could not be loaded; building a new one", path)
            _free(device)
    with _phase(f"build_{variant}", timings):
        pipe = build_fullsize_flux(guidance_embeds=variant == "dev", device=device)
    with _phase(f"save_{variant}", timings):
        if path.exists():
            shutil.rmtree(path)
        save_pipeline(pipe, path, store_dtype)
        (path / KEPT_STAMP).write_text(json.dumps(stamp))
    return str(path), pipe, path


KEPT_STAMP = "fluxbench-checkpoint.json"
"""Written last into a saved random-weight checkpoint: what it is, for ``--keep-model`` runs that reuse it."""


def _kept_checkpoint(path: Path) -> dict[str, Any] | None:
    """The stamp of a complete checkpoint at ``path`` (None: none there, or one whose save did not finish)."""
    try:
        stamp = json.loads((path / KEPT_STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """The ratios of each row, from the medians of the same case (all timed with the same encoder).

    ``vs_recipe`` / ``vs_recipe_pipeline``: engine and HTTP rows against the recipe of their numerics
    (:data:`~fluxbench.recipes.MATCHING_RECIPE`), end to end and pipeline only; ``vs_cache_dit`` likewise
    against cache-dit; ``vs_plain`` / ``vs_plain_pipeline``: every row against plain diffusers (``speedup`` is
    ``vs_plain``, the name earlier runs used). Above 1 means faster than the row compared with.
    """
    def ratio(slow: dict[str, Any] | None, fast: dict[str, Any], key: str) -> float | None:
        if slow is None or not slow.get(key) or not fast.get(key):
            return None
        return round(slow[key] / fast[key], 3)

    timed = {(r["case"], r["path"]): r for r in rows if r.get("median_s")}
    for r in rows:
        if not r.get("median_s"):
            continue
        plain = timed.get((r["case"], "baseline"))
        if plain is not None:
            r["speedup"] = r["vs_plain"] = ratio(plain, r, "median_s")
            r["vs_plain_pipeline"] = ratio(plain, r, "pipeline_median_s")
            if r["images_per_s"] and plain["images_per_s"]:
                r["throughput_ratio"] = round(r["images_per_s"] / plain["images_per_s"], 3)
        if r["path"] in ("engine", "http"):
            recipe_path = MATCHING_RECIPE.get(r["mode"])
            recipe = timed.get((r["case"], recipe_path)) if recipe_path else None
            if recipe is not None:
                r["recipe"] = recipe_path
                r["vs_recipe"] = ratio(recipe, r, "median_s")
                r["vs_recipe_pipeline"] = ratio(recipe, r, "pipeline_median_s")
            cache_dit = timed.get((r["case"], "cache-dit"))
            if cache_dit is not None:
                r["vs_cache_dit"] = ratio(cache_dit, r, "median_s")
                r["vs_cache_dit_pipeline"] = ratio(cache_dit, r, "pipeline_median_s")


RATIO_LEGEND = (
    "e2e s: median seconds per request, end to end, every path encoding with fluxserve's PNG encoder + base64; "
    "pipe s: the same without encoding (http: the server's text_encode+denoise+vae_decode). x recipe: against "
    "the recipe of the same numerics (lossless/plain: recipe-lossless, fast: recipe-fp8), called directly; "
    "x plain: against plain diffusers; each as e2e/pipe. Above 1 = faster."
)


def print_table(rows: list[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout

    def f(v: Any, fmt: str) -> str:
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return "—".rjust(width) if v is None else format(v, fmt)

    def pair(r: dict[str, Any], key: str) -> str:
        a, b = r.get(key), r.get(f"{key}_pipeline")
        return "—" if a is None else f"{a:.2f}/{'—' if b is None else format(b, '.2f')}"

    header = (f"{'case':<11} {'path':<15} {'mode':<8} {'e2e s':>8} {'pipe s':>8} {'x recipe':>11} {'x plain':>11} "
              f"{'img/s':>7} {'peak GB':>7} {'PSNR dB':>7} {'maxdiff':>7}")
    print(RATIO_LEGEND, file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    skipped = []
    for r in rows:
        if r.get("skipped"):
            skipped.append(r)
            print(f"{r['case']:<11} {r['path']:<15} {'—':<8} skipped (below)", file=out)
            continue
        print(f"{r['case']:<11} {r['path']:<15} {r['mode']:<8} {f(r['median_s'], '8.4f')} "
              f"{f(r.get('pipeline_median_s'), '8.4f')} {pair(r, 'vs_recipe'):>11} {pair(r, 'vs_plain'):>11} "
              f"{f(r['images_per_s'], '7.3f')} {f(r['peak_mem_gb'], '7.2f')} {f(r['psnr_db'], '7.2f')} "
              f"{f(r['max_diff'], '7d')}", file=out)
    for r in rows:
        if r.get("note") and not r.get("skipped"):
            print(f"  {r['case']} {r['path']}: {r['note']}", file=out)
    for r in skipped:
        print(f"  {r['case']} {r['path']} skipped: {r['skipped']}", file=out)


def print_compute(compute: dict[str, Any], out: Any = None) -> None:
    """The compute section: one transformer forward per path against the GEMM ceiling of this run."""
    out = out or sys.stdout
    ceiling = compute.get("gemm_ceiling_tflops") or {}
    print("GEMM ceiling measured in this run: "
          + (", ".join(f"{k} {v} TFLOP/s" for k, v in ceiling.items()) or "—"), file=out)
    for variant, entry in compute.items():
        if variant == "gemm_ceiling_tflops" or not isinstance(entry, dict) or "paths" not in entry:
            continue
        tokens = f" ({entry['tokens']} tokens)" if entry.get("tokens") else ""
        print(f"{variant}: one transformer forward at {entry['width']}x{entry['height']}{tokens}, "
              f"{entry['tflop']} TFLOP", file=out)
        print(f"  {'path':<24} {'forward s':>10} {'TFLOP/s':>8} {'of ceiling':>11}", file=out)
        for name, row in entry["paths"].items():
            share = row.get("of_ceiling")
            print(f"  {name:<24} {row['forward_s']:>10.4f} {row['tflops']:>8.4g} "
                  f"{'—' if share is None else format(share, '.2f'):>6} {row.get('ceiling', ''):<5}"
                  f"{'  (' + row['source'] + ')' if row.get('source') else ''}", file=out)


def compute_entry(flops: float, forward_s: float | None, ceiling: dict[str, float], ceiling_key: str,
                  source: str = "") -> dict[str, Any] | None:
    """One path's forward in the compute section: seconds, achieved TFLOP/s, share of the ceiling it runs at."""
    if not forward_s:
        return None
    tflops = flops / forward_s / 1e12
    entry: dict[str, Any] = {"forward_s": round(forward_s, 4), "tflops": float(f"{tflops:.4g}"),
                             "ceiling": ceiling_key}
    if ceiling.get(ceiling_key):
        entry["of_ceiling"] = round(tflops / ceiling[ceiling_key], 3)
    if source:
        entry["source"] = source
    return entry


def _versions() -> dict[str, str]:
    import importlib.metadata

    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    for package in ("torchao", "cache-dit", "flash-attn-3"):  # the peers' packages, where installed
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = str(os.cpu_count())
    return info


ALL_PATHS = ("baseline", *PEER_PATHS, "engine", "http")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--cases", help="comma-separated case names (default: all for the device)")
    parser.add_argument("--modes", help="comma-separated: plain, lossless, fast (default CUDA lossless,fast; "
                                        "CPU plain)")
    parser.add_argument("--paths", help=f"comma-separated, of {','.join(ALL_PATHS)} (default CUDA: all; "
                                        "CPU: baseline,engine,http)")
    parser.add_argument("--reps", type=int, default=5, help="timed requests per case and client (default 5)")
    parser.add_argument("--restart", action="store_true",
                        help="after the HTTP cases, restart the server and time start-to-ready again")
    parser.add_argument("--work-dir", type=Path, help="where models and compile caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON output file")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--warmups", type=int, default=2,
                        help="untimed requests per case before the timed ones, peers, engine and http (default 2)")
    parser.add_argument("--store-dtype", choices=STORE_DTYPES, default="bfloat16",
                        help="dtype of the random-weight checkpoint on disk (CUDA): float8_e4m3fn halves it for "
                             "models whose bf16 files do not fit the disk; weights are rounded to fp8 in memory "
                             "first and upcast on load, so every path computes in bf16 on the same values")
    parser.add_argument("--family", help="bench another family instead of FLUX.1: a family (klein, zimage, qwen, "
                                         "...) or a registry key (klein-9b, qwen-2512, ...); on CPU its tiny model")
    parser.add_argument("--compile-cache", type=Path, metavar="DIR",
                        help="keep Inductor's caches in DIR/inductor for every compile of the run (recipes, engine "
                             "and server) and a bundle of the compiled artifacts in DIR, loaded before anything "
                             "compiles and written when the run ends: a later run that finds DIR skips the "
                             "recipes' max-autotune compile")
    parser.add_argument("--keep-model", action="store_true",
                        help="keep the random-weight checkpoint in --work-dir after the run, and load the one an "
                             "earlier run kept there instead of building and saving another (full-size FLUX.1)")
    parser.add_argument("--autotune-budget", choices=tuple(AUTOTUNE_BUDGETS), default="recipe",
                        help="recipe: the recipes' autotuning as published; bounded: coordinate descent without "
                             "the all-directions check and shorter benchmarks of each candidate kernel; aten: "
                             "bounded, and matrix products and convolutions from cuBLAS/cuDNN only, no Triton "
                             "templates (the rows say which)")
    parser.add_argument("--recipe-compile", choices=COMPILE_MODES, default="max-autotune",
                        help="the peers' torch.compile mode: max-autotune (the recipe's, with CUDA graphs), "
                             "default (no autotuning, no CUDA graphs) or none")
    parser.add_argument("--recipe-compile-targets", default=",".join(COMPILE_TARGETS),
                        help="what the recipes compile: transformer,vae (the recipe: the transformer and "
                             "vae.decode) or one of them")
    return parser


def _parse_paths(value: str | None, device: str) -> list[str] | str:
    """The paths asked for, in the order they run, or the error message."""
    if value is None:
        return list(ALL_PATHS) if device.startswith("cuda") else ["baseline", "engine", "http"]
    asked = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in asked if p not in ALL_PATHS]
    if unknown or not asked:
        return f"--paths: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_PATHS)}"
    return [p for p in ALL_PATHS if p in asked]


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
    parsed = _parse_paths(args.paths, device)
    if isinstance(parsed, str):
        print(parsed, file=sys.stderr)
        return 2
    paths = set(parsed)
    targets = tuple(t.strip() for t in args.recipe_compile_targets.split(",") if t.strip())
    if not targets or any(t not in COMPILE_TARGETS for t in targets):
        print(f"--recipe-compile-targets: choose from {', '.join(COMPILE_TARGETS)}", file=sys.stderr)
        return 2
    peer_options = PeerOptions(compile_mode=args.recipe_compile, compile_targets=targets,
                               autotune_budget=args.autotune_budget)
    modes = (args.modes.split(",") if args.modes else (["lossless", "fast"] if device.startswith("cuda")
                                                       else ["plain"]))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fluxserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # Every path, the server's too, runs torch's default matmul precision: TF32 in this process alone would change
    # its float32 matmuls (T5's feed-forward outputs stay float32 in a bf16 pipeline), so the in-process paths'
    # prompt embeddings, and images, would differ from the server's.
    # On CPU fluxserve leaves one core to the HTTP server; every path gets the same threads.
    if not device.startswith("cuda"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
        "command": "fluxserve bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": _versions(), "reps": args.reps, "warmups": args.warmups, "store_dtype": args.store_dtype,
        "max_sequence_length": MAX_SEQUENCE_LENGTH, "paths": parsed,
        "peer_options": {"recipe_compile": args.recipe_compile, "recipe_compile_targets": list(targets),
                         "autotune_budget": args.autotune_budget},
        "results": [], "engine": {}, "server": {}, "peers": {}, "compute": {}, "phases": {},
    }
    measurements: list[Measurement] = []
    cache = CompileCache(args.compile_cache, device) if args.compile_cache else None

    def flush() -> None:
        rows = [m.summary() for m in measurements]
        add_ratios(rows)
        report["results"] = rows
        args.out.write_text(json.dumps(report, indent=2))

    if cache is not None:  # before anything compiles
        report["compile_cache"] = cache.activate()
    # What this run benches names its compile-cache bundle: runs of the same kind replace each other's.
    bundle_tag = hashlib.sha1(json.dumps(
        {"cases": [c.name for c in cases], "paths": parsed, "modes": modes, "family": args.family,
         "peer_options": report["peer_options"]}, sort_keys=True).encode()).hexdigest()[:10]
    previous_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `timeout` still leaves JSON and cache
    try:
        _run_variants(args, device, cases, modes, paths, peer_options, work, report, measurements, flush)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if cache is not None:
            saved = cache.save(bundle_tag)
            if saved is not None:
                report["compile_cache"]["saved"] = saved
        flush()
    print()
    print(f"fluxserve bench — {report['versions']} — device {device} — {report['date']}")
    print_table(report["results"])
    print_compute(report["compute"])
    if report["server"]:
        print("server:", json.dumps(report["server"]))
    if report["engine"]:
        print("engine:", json.dumps(report["engine"]))
    if report["peers"]:
        print("peers:", json.dumps(report["peers"]))
    if report.get("compile_cache"):
        print("compile cache:", json.dumps(report["compile_cache"]))
    print(f"JSON: {args.out}")
    return 0


def _tokens(call: TransformerCall) -> int | None:
    """Image + text tokens of one transformer call (FLUX-style arguments), None where it has others."""
    kwargs = call[1]
    if "hidden_states" not in kwargs or "encoder_hidden_states" not in kwargs:
        return None
    return int(kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1])


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_variants(args: argparse.Namespace, device: str, cases: list[Case], modes: list[str], paths: set[str],
                  peer_options: PeerOptions, work: Path, report: dict[str, Any], measurements: list[Measurement],
                  flush: Callable[[], None]) -> None:
    """Every path of every model variant the cases need, in order; results go to ``measurements`` and
    ``report`` (``flush`` writes the JSON as it goes)."""
    timings: dict[str, float] = report["phases"]
    compute: dict[str, Any] = report["compute"]
    encoder = ServerEncoder()
    report["encoder"] = {"png_level": encoder.level, "base64": True}
    model_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with _phase("gemm_ceiling", timings):
        ceiling = gemm_ceiling_tflops(device, model_dtype)
    compute["gemm_ceiling_tflops"] = ceiling
    flush()
    base_key = str(model_dtype).removeprefix("torch.")
    fp8_key = "fp8" if "fp8" in ceiling else base_key

    for variant in dict.fromkeys(c.variant for c in cases):
        vcases = [c for c in cases if c.variant == variant]
        model_name, pipe, local_dir = _prepare_model(variant, device, work, timings, args.store_dtype,
                                                     keep_model=args.keep_model)
        refs: dict[str, np.ndarray] = {}
        # The compute section: one forward of each path at the first single text-to-image case's size.
        compute_case = next((c for c in vcases if c.task == "generate" and c.clients == 1), None)
        forward_inputs: TransformerCall | None = None
        flops = 0.0
        entry: dict[str, Any] = {}
        if compute_case is not None:
            try:
                forward_inputs = pipeline_transformer_inputs(pipe, compute_case)
                flops = forward_flops(pipe.transformer, *forward_inputs)
            except Exception as exc:  # the compute section is extra: a family it cannot count keeps its rows
                log.exception("no compute section for %s", variant)
                compute[variant] = {"error": f"{type(exc).__name__}: {exc}"}
                forward_inputs = None
            else:
                entry = {"case": compute_case.name, "width": compute_case.width, "height": compute_case.height,
                         "tokens": _tokens(forward_inputs), "tflop": float(f"{flops / 1e12:.4g}"), "paths": {}}
                compute[variant] = entry

        def add_compute(name: str, forward_s: float | None, key: str, source: str = "",
                        entry_: dict[str, Any] = entry, flops_: float = flops) -> None:
            row = compute_entry(flops_, forward_s, ceiling, key, source) if entry_ else None
            if row is not None:
                entry_["paths"][name] = row

        if paths & {"baseline", *PEER_PATHS, "engine", "http"}:
            with _phase(f"baseline_{variant}", timings):
                res, refs = run_baseline(pipe, vcases, args.reps, device, encoder)
            if "baseline" in paths:
                measurements.extend(res)
            if device.startswith("cuda"):
                report["engine"][f"baseline_{variant}_forward_1024_s"] = round(
                    time_forward(pipe, inputs=_forward_inputs(pipe, vcases[0])), 4)
            if forward_inputs is not None:
                add_compute("baseline plain", time_forward(pipe, inputs=forward_inputs, inference_mode=False),
                            base_key)
        source = PeerSource({k: v for k, v in pipe.components.items() if k not in ("transformer", "vae")},
                            local_dir, pipe.transformer.dtype, type(pipe).__name__)
        del pipe
        _free(device)
        flush()
        for path in PEER_PATHS:
            if path not in paths:
                continue
            info: dict[str, Any] = {}
            report["peers"][f"{variant}_{path}"] = info
            with _phase(f"{path}_{variant}", timings):
                res, info = run_peer(path, source, vcases, args.reps, device, encoder, refs, peer_options,
                                     args.warmups, forward_inputs, info, flush)
            measurements.extend(res)
            add_compute(path, info.get("forward_s"), fp8_key if info.get("fp8") else base_key)
            flush()
        del source
        _free(device)
        for mode in modes:
            cache_dir = work / f"cache-{variant}-{mode}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            mode_key = fp8_key if mode == "fast" else base_key
            # On CPU the engine runs while the server is up, alternating with it (paired overhead).
            pair = not device.startswith("cuda") and "engine" in paths and "http" in paths
            if "http" in paths:
                sizes = list(dict.fromkeys(f"{c.width}x{c.height}" for c in vcases))
                # run_http sends MAX_SEQUENCE_LENGTH: warming only the model's default (512 for a FLUX.1
                # checkpoint outside the registry) would leave a compile for the first request after /ready.
                server = ServerProcess(model_name, device, mode, cache_dir, work / f"server-{variant}-{mode}.log",
                                       sizes, env={"FLUX_WARMUP_TEXT_LENGTHS": str(MAX_SEQUENCE_LENGTH)})
                key = f"{variant}_{mode}"
                try:
                    with _phase(f"http_{key}", timings):
                        report["server"][f"{key}_first_start_to_ready_s"] = round(server.start(), 1)
                        http_rows = run_http(server, vcases, args.reps, mode, refs, args.warmups)
                        measurements.extend(http_rows)
                    if compute_case is not None:
                        denoise = next((m.server_timing.get("denoise") for m in http_rows
                                        if m.case == compute_case.name), None)
                        if denoise:
                            add_compute(f"http {mode}", statistics.median(denoise) / compute_case.steps, mode_key,
                                        "server denoise stage / steps")
                    flush()
                    if pair:
                        with _phase(f"engine_{variant}_{mode}", timings):
                            res, info = run_engine(model_name, vcases, args.reps, mode, device, refs, cache_dir,
                                                   paired_server=server, warmups=args.warmups, encoder=encoder,
                                                   forward_inputs=forward_inputs)
                        measurements.extend(res)
                        report["engine"][f"{variant}_{mode}"] = info
                        add_compute(f"engine {mode}", info.get("forward_s"), mode_key)
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
                                               warmups=args.warmups, encoder=encoder, forward_inputs=forward_inputs)
                    measurements.extend(res)
                    report["engine"][f"{variant}_{mode}"] = info
                    add_compute(f"engine {mode}", info.get("forward_s"), mode_key)
                except Exception as exc:
                    log.exception("engine %s %s failed", variant, mode)
                    report["engine"][f"{variant}_{mode}_error"] = f"{type(exc).__name__}: {exc}"
                _free(device)
                flush()
        if variant not in ("tiny",) and not variant.startswith("tiny-") and not args.keep_model:
            shutil.rmtree(Path(model_name), ignore_errors=True)  # 38 GB: free the disk for the next variant
    encoder.close()


if __name__ == "__main__":
    raise SystemExit(main())
