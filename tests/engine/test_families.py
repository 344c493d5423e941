"""Every registered family: its descriptor and its runner, walked through generate on its tiny model via the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluxserve.engine.device import select_device_dtype
from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.families import runner_for
from fluxserve.generation import GenerationParams, ImageRequest
from fluxserve.models.registry import BUILTIN_MODELS, FAMILIES, family_of_class, resolve_model

TINY_KEYS = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]
FAMILY_KEYS = list({BUILTIN_MODELS[key].tiny: key for key in reversed(TINY_KEYS)}.values())[::-1]
"""One tiny model per family (tiny-qwen-2512 and tiny-klein-9b are the same builds as tiny-qwen and tiny-klein;
tests/e2e/test_families_http.py serves every key)."""


def test_registry_and_families_import_without_torch() -> None:
    """The HTTP layer reads the registry: building it must not load torch or diffusers."""
    code = ("import sys, json; import fluxserve.models.registry as r; "
            "print(json.dumps([len(r.BUILTIN_MODELS), 'torch' in sys.modules, 'diffusers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    count, torch_loaded, diffusers_loaded = json.loads(out.stdout)
    assert count == len(BUILTIN_MODELS) and not torch_loaded and not diffusers_loaded


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_declares_the_contract(name: str) -> None:
    family = FAMILIES[name]
    runner = runner_for(name)
    assert family.name == name and runner.descriptor is family
    assert "generate" in family.pipeline_classes
    assert set(family.pipeline_classes) <= {"generate", "img2img", "inpaint", "edit"}
    assert ("edit" in family.pipeline_classes) == (family.max_input_images > 0)
    assert family.defaults.steps > 0 and family.defaults.size_multiple % 8 == 0
    for spec in family.models:
        assert spec.family == name and BUILTIN_MODELS[spec.key] is spec
        assert spec.licence, f"{spec.key} has no licence"
        if spec.tiny is not None:
            assert spec.key.startswith("tiny-") and spec.tiny == name and runner.has_tiny
    if not family.serves_any_pipeline:
        assert family_of_class(family.pipeline_classes["generate"]) == name
        assert any(spec.tiny is None for spec in family.models), "a family serves at least one real checkpoint"
        assert any(spec.tiny is not None for spec in family.models), "and has a tiny offline version"


def test_every_real_model_has_a_tiny_version() -> None:
    real = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is None and key not in ("schnell", "dev")]
    for key in real:
        assert f"tiny-{key}" in BUILTIN_MODELS, f"{key} has no tiny-{key}"


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> DeviceEngine:
    from fluxserve.settings import Settings

    settings = Settings(cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    return DeviceEngine(settings.engine, select_device_dtype("cpu"))


@pytest.mark.parametrize("key", TINY_KEYS)
def test_every_tiny_model_generates_reproducibly_in_a_mixed_batch(engine: DeviceEngine, key: str) -> None:
    """Loaded by from_pretrained, two prompts batched in one call; seeds reproduce; a partial image arrives,
    decoded at the requested size."""
    spec = resolve_model(key)
    family = FAMILIES[spec.family]
    model, _ = engine.load(spec)
    assert model.descriptor is family and model.runner is runner_for(family)
    assert model.pipeline_class == family.pipeline_classes["generate"]
    side = 2 * spec.size_multiple * 2
    params = GenerationParams(key, side, side, 2, spec.guidance, min(spec.max_sequence_length, 64))
    previews: list[object] = []
    first, other = engine.generate(model, params, [
        ImageRequest("a red fox", [7], on_progress=lambda s, t, p: previews.append(p), partial_images=1),
        ImageRequest("a lighthouse on a cliff", [8])])
    alone = engine.generate(model, params, [ImageRequest("a red fox", [7])])[0]
    image = first.images[0]
    assert image.shape == (side, side, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - alone.images[0].astype(int)).max() <= 2  # batched = alone, up to rounding
    assert np.abs(image.astype(int) - other.images[0].astype(int)).mean() > 1
    assert len(previews) == 2 and previews[1] is None  # the last step's image is the final one
    if family.supports_previews:
        partial = previews[0]
        assert isinstance(partial, np.ndarray) and partial.shape == (side, side, 3) and partial.dtype == np.uint8


def test_a_partial_image_decodes_the_clean_latents_the_model_predicted() -> None:
    """Euler flow-matching steps along the velocity noise − clean give back the clean latents exactly, from the
    latents before and after a step; without the latents before it, the current ones are decoded."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxserve.engine.engine import predicted_clean_latents

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    latents = (1 - scheduler.sigmas[0]) * clean + scheduler.sigmas[0] * noise
    for timestep in scheduler.timesteps[:2]:
        previous = latents
        latents = scheduler.step(noise - clean, timestep, latents, return_dict=False)[0]
        estimate = predicted_clean_latents(scheduler, latents, previous)
        assert torch.allclose(estimate, clean, atol=1e-4)
        assert (latents - clean).abs().mean() > 0.1  # the current latents are still noisy
    assert predicted_clean_latents(scheduler, latents, None) is latents


@pytest.mark.parametrize("key", [k for k in FAMILY_KEYS if FAMILIES[BUILTIN_MODELS[k].family].uses_negative_prompt])
def test_guidance_with_a_negative_prompt_runs_in_a_batch(engine: DeviceEngine, key: str) -> None:
    """True CFG (where the family has it): negatives of different lengths batch with their positives."""
    spec = resolve_model(key)
    model, _ = engine.load(spec)
    params = GenerationParams(key, 64, 64, 2, 3.0, min(spec.max_sequence_length, 64))
    assert model.descriptor.wants_negative(3.0)
    one, two = engine.generate(model, params, [ImageRequest("a red fox", [7], negative_prompt="blurry"),
                                               ImageRequest("a cat", [8], negative_prompt="low quality, text")])
    assert one.images[0].shape == (64, 64, 3)
    assert np.abs(one.images[0].astype(int) - two.images[0].astype(int)).mean() > 0


EDIT_CASES = [(key, task) for key in FAMILY_KEYS
              for task in FAMILIES[BUILTIN_MODELS[key].family].pipeline_classes if task != "generate"]


def _edit(engine: DeviceEngine, key: str, task: str, side: int, seed: int) -> tuple[np.ndarray, np.ndarray, object]:
    """Run ``task`` the way the engine runs any declared edit mode: the family's edit pipeline (from_pipe),
    its edit_call_kwargs passed through denoise, decoded by the loaded pipeline."""
    import torch

    from fluxserve.engine.families import DenoiseArgs
    from fluxserve.engine.families.base import to_uint8

    spec = resolve_model(key)
    model, _ = engine.load(spec)
    family, runner = model.descriptor, model.runner
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[: side // 2] = 255
    images = [source] * (min(2, family.max_input_images) if task == "edit" else 1)
    with model.view() as view, torch.inference_mode():
        pipe = view.pipeline
        edit = runner.edit_pipeline(pipe, task)  # type: ignore[arg-type]
        assert runner.edit_pipeline(pipe, task) is edit  # type: ignore[arg-type]  # made once per view
        assert type(edit).__name__ == family.pipeline_classes[task]  # type: ignore[index]
        assert edit.transformer is pipe.transformer and edit.vae is pipe.vae  # shared weights, no copy
        positive = runner.encode(pipe, "a red fox", 32)
        negatives = [runner.encode(pipe, " ", 32)] if family.wants_negative(spec.guidance) else None
        kwargs = runner.edit_call_kwargs(task, images, mask if task == "inpaint" else None,  # type: ignore[arg-type]
                                         0.6 if task != "edit" else None, side, side)
        args = DenoiseArgs(width=side, height=side, steps=2, guidance=spec.guidance,
                           generators=view.seeded_generators([seed]), callback=lambda *a: {},
                           max_sequence_length=32, call_kwargs=kwargs)
        latents = runner.denoise(edit, [positive], negatives, args)
        pixels = to_uint8(runner.decode(pipe, latents, side, side))[0]
    return pixels, source, edit


@pytest.mark.parametrize(("key", "task"), EDIT_CASES)
def test_every_declared_edit_mode_runs_on_the_tiny_model(engine: DeviceEngine, key: str, task: str) -> None:
    side = 64
    first, source, _ = _edit(engine, key, task, side, 3)
    again, _, _ = _edit(engine, key, task, side, 3)
    assert first.shape == (side, side, 3) and first.dtype == np.uint8
    assert first.tobytes() == again.tobytes()  # seeded edits reproduce
    assert not np.array_equal(first, source)


FULL_SIZE = [  # (family, variant, component, published size in billions of parameters)
    ("flux", None, "transformer", 11.9), ("flux", None, "text_encoder_2", 4.76),
    ("qwen", None, "transformer", 20.4), ("qwen", None, "text_encoder", 8.29),  # Qwen2.5-VL-7B
    ("klein", None, "transformer", 3.9), ("klein", None, "text_encoder", 4.02),  # Qwen3-4B
    ("klein", "9b", "transformer", 9.1), ("klein", "9b", "text_encoder", 8.19),  # Qwen3-8B
    ("zimage", None, "transformer", 6.15), ("zimage", None, "text_encoder", 4.02),
    ("flux2", None, "transformer", 32.2), ("flux2", None, "text_encoder", 24.0),  # Mistral Small 3.1 24B
]


@pytest.mark.parametrize(("name", "variant"), sorted({(f, v) for f, v, _, _ in FULL_SIZE}, key=str))
def test_full_size_architectures_have_the_published_parameter_counts(name: str, variant: str | None) -> None:
    """Built on the meta device (no memory): the configs GPU benches use are those of the checkpoints."""
    import inspect

    import diffusers
    import torch

    runner = runner_for(name)
    components = runner.full_size_components("meta", torch.bfloat16, variant)
    cls = getattr(diffusers, runner.descriptor.pipeline_classes["generate"])
    assert set(components) <= set(inspect.signature(cls.__init__).parameters)  # a valid pipeline signature
    for fam, var, component, billions in FULL_SIZE:
        if (fam, var) == (name, variant):
            count = sum(p.numel() for p in components[component].parameters()) / 1e9
            assert abs(count - billions) / billions < 0.02, f"{name} {variant} {component}: {count:.3f}B"


@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_bench_captures_each_familys_transformer_inputs(engine: DeviceEngine, key: str) -> None:
    """``fluxserve bench --family`` times one forward with the inputs the family's own pipeline passes."""
    import torch

    from fluxbench.serving import Case, _call_kwargs, captured_transformer_inputs

    spec = resolve_model(key)
    model, _ = engine.load(spec)
    pipe = model.primary
    args, kwargs = captured_transformer_inputs(pipe, _call_kwargs(Case("c", 64, 64, 1, variant=key), pipe), 64, 64)
    assert args or kwargs
    with torch.inference_mode():
        out = pipe.transformer(*args, **kwargs)
    assert out is not None


@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_declared_optimizations_match_the_transformer(engine: DeviceEngine, key: str) -> None:
    """Regional compile blocks are the transformer's repeated blocks; fused QKV is declared exactly where
    fusing changes modules (and keeps the output), so FLUX_FUSE_QKV never reports a no-op as applied."""
    import copy

    import torch

    from fluxbench.serving import Case, _call_kwargs, captured_transformer_inputs
    from fluxserve.engine.optimize import _fuse_qkv

    spec = resolve_model(key)
    model, _ = engine.load(spec)
    family, pipe = model.descriptor, model.primary
    assert family.optimizations.compile_blocks == tuple(pipe.transformer._repeated_blocks)
    args, kwargs = captured_transformer_inputs(pipe, _call_kwargs(Case("c", 64, 64, 1, variant=key), pipe), 64, 64)
    transformer = copy.deepcopy(pipe.transformer)
    with torch.inference_mode():
        before = transformer(*args, **kwargs)[0]
        _fuse_qkv(pipe, transformer)
        fused = [n for n, m in transformer.named_modules() if getattr(m, "fused_projections", False)]
        after = transformer(*args, **kwargs)[0]
    assert bool(fused) == family.optimizations.fused_qkv
    if isinstance(before, list):
        before, after = torch.stack(before), torch.stack(after)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_fuse_qkv_is_not_reported_where_the_family_cannot_fuse(make_settings: Any) -> None:
    from fluxserve.engine.optimize import apply_optimizations

    plan = select_device_dtype("cpu")
    for key in ("tiny-qwen", "tiny-klein"):
        spec = resolve_model(key)
        pipe = runner_for(spec.family).tiny_pipeline()
        applied = apply_optimizations(pipe, make_settings(fuse_qkv=True).engine, plan, FAMILIES[spec.family])
        assert ("fuse_qkv" in applied) == FAMILIES[spec.family].optimizations.fused_qkv


@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_the_stage_split_matches_one_plain_pipeline_call(engine: DeviceEngine, key: str) -> None:
    """encode → denoise → decode through the family gives the image the diffusers pipeline itself makes."""
    import torch

    from fluxbench.serving import Case, _call_kwargs

    spec = resolve_model(key)
    model, _ = engine.load(spec)
    params = GenerationParams(key, 64, 64, 2, spec.guidance, min(spec.max_sequence_length, 64))
    ours = engine.generate(model, params, [ImageRequest("a red fox", [5])])[0].images[0]
    pipe = model.primary
    kwargs = _call_kwargs(Case("c", 64, 64, 2, variant=key, guidance=spec.guidance), pipe)
    if kwargs.get("negative_prompt") is not None and spec.negative_prompt is not None:
        kwargs["negative_prompt"] = spec.negative_prompt
    kwargs["max_sequence_length"] = params.max_sequence_length
    with torch.inference_mode():
        plain = model.runner.text_to_image(pipe)(prompt="a red fox", width=64, height=64, num_inference_steps=2,
                     generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kwargs).images[0]
    theirs = (np.clip(plain, 0, 1) * 255).round().astype(np.int16)
    assert np.abs(ours.astype(np.int16) - theirs).max() <= 2


def test_models_outside_the_registry_get_their_familys_defaults_and_no_borrowed_licence(cache_dir: Path) -> None:
    local = resolve_model(str(cache_dir / "models" / "tiny-zimage"))
    assert local.family == "zimage" and (local.steps, local.guidance) == (8, 0.0)
    assert local.licence == "unknown: see the model card" and local.tiny is None
    hub = resolve_model("someone/some-model")
    assert hub.licence == "unknown: see the model card" and hub.commercial_use and not hub.gated
