"""LoRA adapters on real tiny pipelines: effect, scale 0, A→B→A, kohya conversion, tiny-qwen, the prompt-cache
key of text-encoder adapters, the LRU, and two concurrent views with different adapters."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxserve.engine.adapters import (
    TINY_TARGETS,
    AdapterGate,
    _peft_name,
    build_tiny_lora,
    ensure_demo_lora,
    pad_new_slots,
)
from fluxserve.engine.engine import DeviceEngine
from fluxserve.engine.loading import LoadedModel, load_model
from fluxserve.generation import AdapterError, GenerationParams, ImageRequest
from fluxserve.loras import LoraLibrary
from fluxserve.models.devices import DevicePlan
from fluxserve.models.registry import BUILTIN_MODELS, FAMILIES
from fluxserve.settings import Settings
from tests.conftest import assert_same_image_within_rounding

CPU = DevicePlan("cpu", "float32", "float32", "cpu")


def write_kohya_flux_lora(pipe: Any, path: Path, seed: int = 11, rank: int = 2) -> Path:
    """A kohya (sd-scripts) FLUX LoRA for tiny-flux's shapes: BFL module names with lora_down/lora_up/alpha,
    one double-block and one single-block projection plus the attention projections of CLIP's first layer."""
    gen = torch.Generator().manual_seed(seed)
    tr, te = pipe.transformer, pipe.text_encoder
    encoder = te.text_model.encoder if hasattr(te, "text_model") else te.encoder  # transformers 5 flattened it
    shapes = {
        "lora_unet_double_blocks_0_img_attn_proj": tr.transformer_blocks[0].attn.to_out[0].weight.shape,
        "lora_unet_single_blocks_0_linear2": tr.single_transformer_blocks[0].proj_out.weight.shape,
    }
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # diffusers recognises a CLIP part by its out_proj
        shapes[f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"] = getattr(
            encoder.layers[0].self_attn, proj).weight.shape
    tensors = {}
    for name, (out_f, in_f) in shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("loras")
    flux = cache_dir / "models" / "tiny-flux"
    build_tiny_lora(flux, directory / "flux" / "a.safetensors", family="flux", base_model="tiny-flux", seed=1)
    build_tiny_lora(flux, directory / "flux" / "b.safetensors", family="flux", base_model="tiny-flux", seed=2)
    build_tiny_lora(flux, directory / "flux" / "c8.safetensors", family="flux", base_model="tiny-flux", seed=4,
                    rank=8)
    build_tiny_lora(cache_dir / "models" / "tiny-qwen", directory / "qwen" / "q.safetensors", family="qwen",
                    base_model="tiny-qwen", seed=3)
    return directory


def make_engine(cache_dir: Path, lora_dir: Path, **overrides: Any) -> DeviceEngine:
    values: dict[str, Any] = {"model": "tiny-flux", **overrides}
    settings = Settings(cache_dir=cache_dir, device="cpu", lora_dir=lora_dir, _env_file=None,  # type: ignore[call-arg]
                        **values)
    return DeviceEngine(settings.engine, CPU)


@pytest.fixture(scope="module")
def engine(cache_dir: Path, lora_dir: Path) -> DeviceEngine:
    return make_engine(cache_dir, lora_dir, max_concurrent=2)


@pytest.fixture(scope="module")
def flux(engine: DeviceEngine) -> LoadedModel:
    return engine.load(BUILTIN_MODELS["tiny-flux"])[0]


def image(engine: DeviceEngine, model: LoadedModel, loras: tuple[tuple[str, float], ...] = (),
          prompt: str = "a red fox", seed: int = 5, key: str = "tiny-flux", guidance: float = 0.0) -> np.ndarray:
    params = GenerationParams(key, 64, 64, 2, guidance, 64, loras=loras)
    return engine.generate(model, params, [ImageRequest(prompt, [seed])])[0].images[0]


def test_an_adapter_changes_the_image_and_scale_zero_is_none(engine: DeviceEngine, flux: LoadedModel) -> None:
    plain = image(engine, flux)
    with_a = image(engine, flux, (("a", 1.0),))
    zero = image(engine, flux, (("a", 0.0),))
    assert np.abs(with_a.astype(int) - plain.astype(int)).max() > 8  # the adapter really acts
    assert np.abs(zero.astype(int) - plain.astype(int)).max() <= 1  # scale 0: the model itself (rounding)
    assert np.array_equal(image(engine, flux), plain)  # and without adapters afterwards, exactly as before


def test_switching_a_b_a_gives_a_byte_identical(engine: DeviceEngine, flux: LoadedModel) -> None:
    first = image(engine, flux, (("a", 0.8),))
    other = image(engine, flux, (("b", 0.8),))
    again = image(engine, flux, (("a", 0.8),))
    assert not np.array_equal(first, other)
    assert np.array_equal(first, again)
    both = image(engine, flux, (("a", 0.8), ("b", 0.8)))
    assert not np.array_equal(both, first) and not np.array_equal(both, other)
    loaded = flux.loras.loaded_names() if flux.loras else []
    assert {"a", "b"} <= set(loaded)  # kept loaded: switching is set_adapters, not a reload
    switches = flux.loras.switches if flux.loras else 0
    assert image(engine, flux, (("a", 0.8), ("b", 0.8))).shape == both.shape
    assert flux.loras is not None and flux.loras.switches == switches  # same set again: no switch at all


def test_internal_adapter_names_are_one_to_one() -> None:
    """Library names that differ only in punctuation once shared one PEFT adapter (and its weights)."""
    import re

    names = ["style.v1", "style_v1", "style-v1", "style v1", "flux/dup", "flux_dup", "_2e_", ".", "é", "a_2e_b",
             "a.b", "tiny-flux-demo"]
    keys = [_peft_name(name) for name in names]
    assert len(set(keys)) == len(names)
    for name, key in zip(names, keys, strict=True):
        assert key.isascii() and "." not in key and "/" not in key  # a valid module key
        decoded = re.sub(r"_([0-9a-f]+)_", lambda m: chr(int(m.group(1), 16)), key.removeprefix("lora_"))
        assert decoded == name  # reads back: one-to-one


def test_a_kohya_file_is_converted_and_its_text_encoder_part_keys_the_prompt_cache(
        engine: DeviceEngine, flux: LoadedModel, lora_dir: Path) -> None:
    path = write_kohya_flux_lora(flux.primary, lora_dir / "flux" / "kohya-style.safetensors")
    info = LoraLibrary(lora_dir).get("kohya-style")
    assert info is not None and info.format == "kohya" and info.text_encoder and info.family == "flux"
    plain = image(engine, flux, prompt="kohya prompt")
    styled = image(engine, flux, (("kohya-style", 1.0),), prompt="kohya prompt")
    assert not np.array_equal(plain, styled)
    adapted = flux.primary.get_list_adapters()
    assert "lora_kohya-style" in adapted["transformer"] and "lora_kohya-style" in adapted["text_encoder"]
    # The cached embedding of "kohya prompt" without the adapter must not be reused with it, and back.
    keys = list(flux.prompt_cache._items)
    assert any(len(k) == 4 and k[1] == "kohya prompt" for k in keys)
    assert np.array_equal(image(engine, flux, prompt="kohya prompt"), plain)
    path.unlink()


def test_tiny_qwen_takes_its_adapter(cache_dir: Path, lora_dir: Path) -> None:
    engine = make_engine(cache_dir, lora_dir, model="tiny-qwen")
    qwen = engine.load(BUILTIN_MODELS["tiny-qwen"])[0]
    plain = image(engine, qwen, key="tiny-qwen", guidance=1.0)
    styled = image(engine, qwen, (("q", 1.0),), key="tiny-qwen", guidance=1.0)
    assert not np.array_equal(plain, styled)
    assert np.abs(image(engine, qwen, (("q", 0.0),), key="tiny-qwen", guidance=1.0).astype(int)
                  - plain.astype(int)).max() <= 1
    engine.unload("tiny-qwen")


def test_an_adapter_that_does_not_fit_fails_clearly_and_leaves_the_model_working(
        engine: DeviceEngine, flux: LoadedModel, lora_dir: Path) -> None:
    wrong = lora_dir / "flux" / "wrong-shape.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 999),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(999, 2)}, str(wrong))
    plain = image(engine, flux)
    with_a = image(engine, flux, (("a", 1.0),))
    with pytest.raises(AdapterError, match="does not fit"):
        image(engine, flux, (("a", 1.0), ("wrong-shape", 1.0)))  # "a" is activated, then the second fails
    assert np.array_equal(image(engine, flux, (("a", 1.0),)), with_a)  # the set is restored, not assumed
    assert np.array_equal(image(engine, flux), plain)
    assert np.array_equal(image(engine, flux, (("a", 0.8),)), image(engine, flux, (("a", 0.8),)))
    wrong.unlink()


def test_the_lru_keeps_at_most_lora_cache_adapters(cache_dir: Path, lora_dir: Path) -> None:
    engine = make_engine(cache_dir, lora_dir, lora_cache=1)
    model = engine.load(BUILTIN_MODELS["tiny-flux"])[0]
    assert model.loras is not None
    first = image(engine, model, (("a", 1.0),))
    image(engine, model, (("b", 1.0),))
    assert model.loras.loaded_names() == ["b"]
    assert np.array_equal(image(engine, model, (("a", 1.0),)), first)  # reloaded after eviction: same image
    assert model.loras.loaded_names() == ["a"]


def test_two_views_with_different_adapters_at_once_each_give_their_own_image(
        engine: DeviceEngine, flux: LoadedModel) -> None:
    """FLUX_MAX_CONCURRENT=2: A is mid-denoising when B (another adapter set) arrives. B waits at the
    adapter gate until A is done; each image equals the one it gives alone."""
    alone_a = image(engine, flux, (("a", 1.0),), seed=21)
    alone_b = image(engine, flux, (("b", 1.0),), seed=22)
    assert flux.loras is not None
    gate = flux.loras.gate
    a_started = threading.Event()
    b_waiting = threading.Event()
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def progress(step: int, _total: int, _preview: Any) -> None:
        if step == 1:
            a_started.set()
            assert gate.wait_for_waiters(1, timeout=60), "B never reached the gate"
            b_waiting.set()

    def run(name: str, loras: tuple[tuple[str, float], ...], seed: int, on_progress: Any = None) -> None:
        try:
            params = GenerationParams("tiny-flux", 64, 64, 2, 0.0, 64, loras=loras)
            request = ImageRequest("a red fox", [seed], on_progress=on_progress)
            results[name] = engine.generate(flux, params, [request])[0].images[0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread_a = threading.Thread(target=run, args=("a", (("a", 1.0),), 21, progress))
    thread_a.start()
    assert a_started.wait(60)
    thread_b = threading.Thread(target=run, args=("b", (("b", 1.0),), 22))
    thread_b.start()
    thread_a.join(120)
    thread_b.join(120)
    assert not errors, errors
    assert b_waiting.is_set()  # B really arrived while A was running on the other view
    assert np.array_equal(results["a"], alone_a)
    assert np.array_equal(results["b"], alone_b)


def test_same_set_batches_share_the_model_at_once(engine: DeviceEngine, flux: LoadedModel) -> None:
    """Two views with the same adapter set run side by side (no switch in between)."""
    assert flux.loras is not None
    gate = flux.loras.gate
    both_in = threading.Barrier(2, timeout=60)
    seen: list[int] = []

    def progress(step: int, _total: int, _preview: Any) -> None:
        if step == 1:
            seen.append(gate.users)
            both_in.wait()

    def run(seed: int) -> None:
        params = GenerationParams("tiny-flux", 64, 64, 2, 0.0, 64, loras=(("a", 0.5),))
        engine.generate(flux, params, [ImageRequest("a red fox", [seed], on_progress=progress)])

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert seen and max(seen) == 2


def test_serving_tiny_flux_writes_its_demo_adapter(cache_dir: Path, tmp_path: Path) -> None:
    flux = FAMILIES["flux"]
    path = ensure_demo_lora(tmp_path, BUILTIN_MODELS["tiny-flux"], flux, cache_dir / "models" / "tiny-flux")
    assert path is not None and path.is_file()
    info = LoraLibrary(tmp_path).get("tiny-flux-demo")
    assert info is not None and info.family == "flux" and info.base_model == "tiny-flux" and info.rank == 4
    assert set(info.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert ensure_demo_lora(tmp_path, BUILTIN_MODELS["schnell"], flux, cache_dir / "models" / "tiny-flux") is None


def test_fp8_models_take_no_adapters(cache_dir: Path, lora_dir: Path) -> None:
    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", lora_dir=lora_dir,  # type: ignore[call-arg]
                        _env_file=None)
    model = load_model(BUILTIN_MODELS["tiny-flux"], CPU, settings.engine)
    from fluxserve.engine.loading import _adapter_state

    state, reason = _adapter_state(model.primary, replace(settings.engine, quantize="fp8"))
    assert state is None and reason is not None and "FLUX_QUANTIZE=fp8" in reason


def test_hotswap_slots_give_the_eager_images_and_keep_scales_as_tensors(
        cache_dir: Path, lora_dir: Path, engine: DeviceEngine, flux: LoadedModel) -> None:
    """The compiled path's switching (hot-swap into slots padded to FLUX_LORA_MAX_RANK, scales written in
    place), here without compiling: the same images as eager set_adapters, A→B→A byte-identical, and the
    scalings stay tensors (a Python float there would recompile per scale value)."""
    from peft.tuners.lora import LoraLayer

    from fluxserve.engine.adapters import AdapterState

    eager_a = image(engine, flux, (("a", 0.8),))
    eager_ab = image(engine, flux, (("a", 0.5), ("b", 1.0)))
    plain = image(engine, flux)

    hot_engine = make_engine(cache_dir, lora_dir)
    model = load_model(BUILTIN_MODELS["tiny-flux"], CPU, hot_engine.settings)
    model.primary.enable_lora_hotswap(target_rank=8)
    model.loras = AdapterState(model.primary, capacity=8, hotswap=True, slots=2, max_rank=8)
    hot_a = image(hot_engine, model, (("a", 0.8),))
    assert np.abs(hot_a.astype(int) - eager_a.astype(int)).max() <= 1
    hot_ab = image(hot_engine, model, (("a", 0.5), ("b", 1.0)))
    assert np.abs(hot_ab.astype(int) - eager_ab.astype(int)).max() <= 1
    assert np.abs(image(hot_engine, model).astype(int) - plain.astype(int)).max() <= 1  # every slot at 0
    assert np.array_equal(image(hot_engine, model, (("a", 0.8),)), hot_a)
    layers = [m for m in model.primary.transformer.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(v, torch.Tensor) for m in layers for v in m.scaling.values())
    assert all(m.lora_A["fluxserve_slot0"].weight.shape[0] == 8 for m in layers)  # padded to the slot rank


def test_under_regional_compile_switching_never_recompiles(cache_dir: Path, lora_dir: Path, engine: DeviceEngine,
                                                          flux: LoadedModel) -> None:
    """FLUX_COMPILE=regional through load_model: hotswap is enabled before compiling; after the first adapter
    is put into the slot, switching adapters, scales and back to none adds no compiled graph, A→B→A gives
    A's image byte-identical, and none gives the eager model's own image (tens of seconds of compiling on a
    CPU). The first call already carries an adapter: a call without one would compile every block once more
    before the slot exists, which proves nothing here."""
    from torch._dynamo.utils import counters

    plain = image(engine, flux)  # the eager model of the module's engine, without adapters
    compiled = make_engine(cache_dir, lora_dir, compile="regional", lora_max_rank=8, max_loras_per_request=1)
    model = compiled.load(BUILTIN_MODELS["tiny-flux"])[0]
    assert "lora_hotswap_rank8" in model.modes and "compile_regional" in model.modes
    first = image(compiled, model, (("a", 1.0),))  # the slot is created and its blocks compile
    graphs = counters["stats"]["unique_graphs"]
    other = image(compiled, model, (("b", 0.7),))
    weaker = image(compiled, model, (("a", 0.3),))
    none = image(compiled, model)
    again = image(compiled, model, (("a", 1.0),))
    assert counters["stats"]["unique_graphs"] == graphs, "a switch recompiled"
    assert not np.array_equal(first, other) and not np.array_equal(first, weaker)
    assert np.array_equal(again, first)
    assert_same_image_within_rounding(none, plain)  # every slot at 0: the model itself (compiled vs eager)
    with pytest.raises(AdapterError, match="slots"):
        image(compiled, model, (("a", 1.0), ("b", 1.0)))
    compiled.unload("tiny-flux")


def test_two_compiled_slots_switch_without_recompiling(cache_dir: Path, lora_dir: Path) -> None:
    """Two slots under FLUX_COMPILE=regional: the second slot is created by a rank-4 adapter and padded, so a
    rank-8 adapter there, pairs in either order, one adapter and none add no compiled graph; the first pair
    comes back byte-identical."""
    from torch._dynamo.utils import counters

    compiled = make_engine(cache_dir, lora_dir, compile="regional", lora_max_rank=8, max_loras_per_request=2)
    model = compiled.load(BUILTIN_MODELS["tiny-flux"])[0]
    first = image(compiled, model, (("a", 1.0), ("b", 0.8)))  # both slots are created, the blocks compile
    graphs = counters["stats"]["unique_graphs"]
    higher = image(compiled, model, (("a", 1.0), ("c8", 0.8)))  # rank 8 into the slot a rank-4 adapter made
    swapped = image(compiled, model, (("b", 0.8), ("a", 1.0)))
    image(compiled, model, (("c8", 0.5),))
    image(compiled, model)
    again = image(compiled, model, (("a", 1.0), ("b", 0.8)))
    assert counters["stats"]["unique_graphs"] == graphs, "a switch recompiled"
    assert not np.array_equal(first, higher)
    assert_same_image_within_rounding(swapped, first)  # the same sum, added in the other order
    assert np.array_equal(again, first)
    compiled.unload("tiny-flux")


# --- the gate alone (no model): who waits for whom --------------------------------------------------------
BOUND = 20.0


def in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_the_gate_is_not_locked_while_a_set_is_switched_in() -> None:
    """The switch reads adapters from disk and loads them under the process-wide build lock (behind any
    model load). The gate's condition used to stay locked meanwhile: nobody could even ask it anything."""
    gate = AdapterGate()
    switching, finish = threading.Event(), threading.Event()

    def switch(_wanted: Any) -> None:
        switching.set()
        assert finish.wait(BOUND)

    def batch(loras: Any) -> None:
        with gate.use(loras, switch):
            pass

    first = in_thread(lambda: batch((("a", 1.0),)))
    assert switching.wait(BOUND)
    answers: list[Any] = []
    asked = in_thread(lambda: answers.extend([gate.users, gate.active]))
    asked.join(BOUND)
    assert answers == [0, ()], "the gate's lock was held during the switch"
    second = in_thread(lambda: batch((("b", 1.0),)))  # another set queues behind the switch
    assert gate.wait_for_waiters(1, timeout=BOUND)
    finish.set()
    first.join(BOUND)
    second.join(BOUND)
    assert not first.is_alive() and not second.is_alive() and gate.active == (("b", 1.0),)


def test_loading_an_adapter_outside_a_batch_waits_for_the_batches_in_and_newcomers_wait_for_it() -> None:
    gate = AdapterGate()
    order: list[str] = []
    inside, leave = threading.Event(), threading.Event()

    def running() -> None:
        with gate.use((), lambda _wanted: None):
            inside.set()
            assert leave.wait(BOUND)
            order.append("batch")

    def newcomer() -> None:
        with gate.use((), lambda _wanted: None):
            order.append("newcomer")

    def preload() -> None:
        with gate.alone():
            order.append("alone")

    threads = [in_thread(running)]
    assert inside.wait(BOUND)
    threads.append(in_thread(preload))
    assert gate.wait_for_waiters(1, timeout=BOUND)
    threads.append(in_thread(newcomer))  # same set as the batch inside, but behind the waiting preload
    assert gate.wait_for_waiters(2, timeout=BOUND)
    leave.set()
    for thread in threads:
        thread.join(BOUND)
    assert order == ["batch", "alone", "newcomer"]


# --- the switch against the previous one (diffusers' set_adapters and load_lora_weights(hotswap=True)) ------
class PreviousSwitch:
    """How a switch was made before it copied into pre-collected layers and slots: through diffusers on every
    switch. Kept here as the reference the fast switch must equal bit for bit (same computation)."""

    @staticmethod
    def activate(state: Any, wanted: tuple[tuple[str, float], ...]) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import _convert_scalings_to_tensor

        pipe = state.pipe
        if not state.hotswap:
            if not wanted:
                if pipe.get_list_adapters():
                    pipe.disable_lora()
                return
            pipe.enable_lora()
            pipe.set_adapters([_peft_name(n) for n, _ in wanted], adapter_weights=[s for _, s in wanted])
            return
        while len(state._slot_filled) < state.slots:
            state._slot_filled.append(False)
        created = False
        for index, (name, _) in enumerate(wanted):
            pipe.load_lora_weights(dict(state._loaded[name].state_dict), adapter_name=f"fluxserve_slot{index}",
                                   hotswap=state._slot_filled[index])
            if not state._slot_filled[index]:
                pad_new_slots(pipe, state.max_rank)  # what a slot needs to keep one shape (module doc)
            created = created or not state._slot_filled[index]
            state._slot_filled[index] = True
        filled = [f"fluxserve_slot{i}" for i, full in enumerate(state._slot_filled) if full]
        modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules() if isinstance(m, LoraLayer)]
        if created:
            pipe.set_adapters(filled, adapter_weights=[1.0] * len(filled))
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    _convert_scalings_to_tensor(component)
        scales = {f"fluxserve_slot{i}": scale for i, (_, scale) in enumerate(wanted)}
        with torch.no_grad():
            for module in modules:
                for slot, value in module.scaling.items():
                    if isinstance(value, torch.Tensor):
                        value.mul_(scales[slot]) if slot in scales else value.fill_(0.0)


@pytest.fixture(scope="module")
def switch_library(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraLibrary:
    """Adapters of ranks 4 and 8 (the slot's), one on fewer layers, one kohya file with a text-encoder part."""
    directory = tmp_path_factory.mktemp("switch-loras")
    flux = cache_dir / "models" / "tiny-flux"
    for name, seed, rank, targets in (("a", 1, 4, TINY_TARGETS), ("b", 2, 4, TINY_TARGETS),
                                      ("c", 3, 8, TINY_TARGETS), ("qk", 4, 2, ("to_q", "to_k"))):
        build_tiny_lora(flux, directory / "flux" / f"{name}.safetensors", family="flux", base_model="tiny-flux",
                        seed=seed, rank=rank, targets=targets)
    return LoraLibrary(directory)


def latents_after_each_switch(cache_dir: Path, library: LoraLibrary, hotswap: bool, previous: bool,
                              sequence: list[tuple[tuple[str, float], ...]]) -> list[torch.Tensor]:
    from fluxserve.engine.adapters import AdapterState

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    pipe = load_model(BUILTIN_MODELS["tiny-flux"], CPU, settings.engine).primary
    if hotswap:
        pipe.enable_lora_hotswap(target_rank=8)
    state = AdapterState(pipe, capacity=8, hotswap=hotswap, slots=2, max_rank=8)
    if previous:
        state._activate = lambda wanted: PreviousSwitch.activate(state, wanted)  # type: ignore[method-assign]
    outputs = []
    for wanted in sequence:
        with state.use(wanted, library.get), torch.inference_mode():
            latents = pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, max_sequence_length=64,
                           output_type="latent", generator=torch.Generator().manual_seed(5)).images
        outputs.append(latents)
    if hotswap and not previous:  # every slot kept the padded rank, whatever rank created it
        assert len(state._slot_tensors) == 2
        for slot in state._slot_tensors:
            assert slot.weights and {w.shape[d] for w, d in zip(slot.weights, slot.rank_dims, strict=True)} == {8}
    return outputs


@pytest.mark.parametrize(("hotswap", "sequence"), [
    (False, [(("a", 0.8),), (("b", 0.8),), (("a", 0.8), ("b", 0.5)), (), (("c", 1.0),), (("qk", 1.3),),
             (("kohya", 1.0),), (("a", 0.3), ("kohya", 0.6)), (), (("a", 0.8),)]),
    (True, [(("a", 1.0),), (("b", 0.7),), (("c", 1.0),), (), (("qk", 1.3),), (("a", 0.5),),
            # from here on each adapter is already read back from its slot: the switch only copies
            (("c", 0.3),), (("qk", 1.0),), (("b", 1.0),), (("c", 1.0),), (("a", 1.0),), (), (("qk", 0.9),),
            # the second slot: created by a rank-4 adapter, then ranks 8 and 2 there, and one slot again
            (("a", 0.8), ("b", 0.5)), (("b", 1.0), ("c", 0.7)), (("c", 0.6), ("qk", 1.1)), (("a", 1.0),),
            (("qk", 1.0), ("a", 0.4)), (("b", 0.5), ("c", 0.7))]),
], ids=["eager", "hotswap"])
def test_the_switch_gives_exactly_the_previous_switchs_outputs(
        cache_dir: Path, switch_library: LoraLibrary, hotswap: bool,
        sequence: list[tuple[tuple[str, float], ...]]) -> None:
    """Ranks 2, 4 and 8 in slots padded to 8, an adapter on fewer layers (zeroed in the slot), scales, none, two
    at once (the second slot created by a rank-4 adapter, then ranks 8 and 2 in it); eager also a kohya file with
    a text-encoder part: after every switch the pipeline's latents equal the previous switch's bit for bit."""
    if not hotswap:
        write_kohya_flux_lora(load_model(BUILTIN_MODELS["tiny-flux"], CPU, Settings(  # type: ignore[call-arg]
            model="tiny-flux", cache_dir=cache_dir, device="cpu", _env_file=None).engine).primary,
            switch_library.directory / "flux" / "kohya.safetensors")
    fast = latents_after_each_switch(cache_dir, switch_library, hotswap, False, sequence)
    previous = latents_after_each_switch(cache_dir, switch_library, hotswap, True, sequence)
    for index, (ours, theirs) in enumerate(zip(fast, previous, strict=True)):
        assert torch.equal(ours, theirs), f"switch {index} to {sequence[index]} differs"
    assert not torch.equal(fast[0], fast[1]) and not torch.equal(fast[0], fast[3])  # the adapters really act
