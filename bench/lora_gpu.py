"""LoRA switching on full-size random-weight FLUX.1 (GPU), through the engine's own adapter code.

Measures, with random rank-16 and rank-64 adapters (all attention projections of every block):

1. eager (FLUX_COMPILE=off: one PEFT adapter each, ``set_adapters``): time to switch the active set;
2. one transformer forward at 1024² with no adapter, with an active rank-16 adapter (eager), and the same
   under regional compilation (``compile_repeated_blocks``) — with the adapter in a hot-swap slot padded
   to FLUX_LORA_MAX_RANK (the compiled path);
3. compiled: time to switch adapters and scales by hotswap, and the number of recompiles across 20
   switches (``torch._dynamo`` counters; each switch is followed by a forward so a recompile would show).

    python bench/lora_gpu.py              # on a CUDA GPU, full size (about 40 GB, a few minutes)
    python bench/lora_gpu.py --tiny       # on the CPU: tiny config, ranks 4/8, checks the script itself

It prints a table and writes ``lora_gpu.json`` to ``$OUT`` (or ``--out``) as it goes, so a run cut short
still leaves what it measured. Targets: switch ≤ 50 ms, 0 recompiles, rank-16 overhead ≤ 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fluxserve.engine.adapters import AdapterState
from fluxserve.loras import FAMILY_KEY, LoraInfo, describe

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SWITCHES = 20


def build_transformer(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel

    from fluxserve.engine.families.base import build_on, init_like_checkpoint

    def make() -> Any:
        if tiny:
            return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        return FluxTransformer2DModel()  # FLUX.1 schnell: 19 double + 38 single blocks, 11.9 B

    torch.manual_seed(0)
    transformer = build_on(device, dtype, make)
    init_like_checkpoint(transformer, 0)
    return transformer.eval().requires_grad_(False)


def pipeline_for(transformer: Any) -> Any:
    """A FluxPipeline holding only the transformer: the LoRA loader's path without the text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def write_random_lora(transformer: Any, path: Path, rank: int, seed: int, std: float = 0.01) -> LoraInfo:
    """A diffusers-format LoRA file (``transformer.<module>.lora_A/B.weight``) for every targeted linear."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen)
                                                           * std).to(transformer.dtype).contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen)
                                                           * std).to(transformer.dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", FAMILY_KEY: "flux"})
    return describe(path, path.stem, "flux")


def forward_inputs(transformer: Any, size: int, text_tokens: int) -> dict[str, Any]:
    cfg = transformer.config
    device, dtype = transformer.device, transformer.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    side = size // 16
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] += torch.arange(side, device=device)[:, None]
    img_ids[..., 2] += torch.arange(side, device=device)[None, :]
    kwargs = {
        "hidden_states": torch.randn(1, side * side, cfg.in_channels, device=device, dtype=dtype, generator=gen),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype,
                                             generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype), "txt_ids": torch.zeros(text_tokens, 3, device=device,
                                                                            dtype=dtype),
        "return_dict": False,
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.zeros(1, device=device, dtype=torch.float32)
    return kwargs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(transformer: Any, inputs: dict[str, Any], device: str, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            transformer(**inputs)
        times = []
        for _ in range(reps):
            sync(device)
            started = time.perf_counter()
            transformer(**inputs)
            sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_switch(state: AdapterState, wanted: tuple[tuple[str, float], ...], infos: dict[str, LoraInfo],
                 device: str) -> float:
    sync(device)
    started = time.perf_counter()
    with state.use(wanted, infos.get):
        sync(device)
        seconds = time.perf_counter() - started
    return seconds


def compile_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            "frames_ok": int(counters["frames"]["ok"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled measurements")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--slots", type=int, default=4, help="hot-swap slots (FLUX_MAX_LORAS_PER_REQUEST; default 4)")
    args = parser.parse_args(argv)

    tiny = args.tiny
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not tiny:
        parser.error("no CUDA device: run with --tiny on the CPU")
    dtype = torch.float32 if tiny else torch.bfloat16
    size, text_tokens = (64, 16) if tiny else (1024, 256)
    ranks = (4, 8) if tiny else (16, 64)
    max_rank = ranks[1]
    reps = 3 if tiny else args.reps
    out_dir = Path(args.out) if args.out else None
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "tiny": tiny, "ranks": list(ranks), "size": size,
                               "targets": list(TARGETS), "switches": SWITCHES}

    def save() -> None:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "lora_gpu.json").write_text(json.dumps(results, indent=2))

    import diffusers

    results["diffusers"] = diffusers.__version__
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    started = time.perf_counter()
    transformer = build_transformer(tiny, device, dtype)
    results["build_seconds"] = round(time.perf_counter() - started, 2)
    low, high = ranks
    infos = {
        f"a{low}": write_random_lora(transformer, work / f"a{low}.safetensors", low, 1),
        f"b{low}": write_random_lora(transformer, work / f"b{low}.safetensors", low, 2),
        f"c{high}": write_random_lora(transformer, work / f"c{high}.safetensors", high, 3),
    }
    results["adapter_bytes"] = {name: info.size_bytes for name, info in infos.items()}
    inputs = forward_inputs(transformer, size, text_tokens)
    pipe = pipeline_for(transformer)

    # 1. Eager forward without any adapter (the base model), then with rank-low active.
    results["forward_eager_none_s"] = time_forward(transformer, inputs, device, reps)
    eager = AdapterState(pipe, capacity=8)
    load_times = {name: eager.preload(info) for name, info in infos.items()}
    results["eager_load_s"] = load_times
    with eager.use(((f"a{low}", 1.0),), infos.get):
        results[f"forward_eager_rank{low}_s"] = time_forward(transformer, inputs, device, reps)
    save()

    # 2. Eager switching: set_adapters between loaded adapters (and none), never a reload.
    cycle: list[tuple[tuple[str, float], ...]] = [((f"a{low}", 1.0),), ((f"b{low}", 0.7),), ((f"c{high}", 1.0),),
                                                  (), ((f"a{low}", 0.5), (f"b{low}", 0.5))]
    eager_switch = [timed_switch(eager, cycle[i % len(cycle)], infos, device) for i in range(SWITCHES)]
    results["eager_switch_ms"] = {"median": statistics.median(eager_switch) * 1000,
                                  "max": max(eager_switch) * 1000}
    for name in list(infos):
        eager.unload(name)
    pipe.unload_lora_weights()  # back to plain nn.Linear for the compiled part
    save()

    if not args.no_compile:
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # 3. Compiled base (regional, as FLUX_COMPILE=regional), no adapter.
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
        compile_started = time.perf_counter()
        with torch.inference_mode():
            transformer(**inputs)
        sync(device)
        results["compile_first_forward_s"] = time.perf_counter() - compile_started
        results["forward_compiled_none_s"] = time_forward(transformer, inputs, device, reps)
        save()

        # 4. Compiled with hotswap slots (--slots, FLUX_MAX_LORAS_PER_REQUEST's default), padded to max_rank.
        pipe.enable_lora_hotswap(target_rank=max_rank)
        hot = AdapterState(pipe, capacity=8, hotswap=True, slots=args.slots, max_rank=max_rank)
        results["slots"] = args.slots
        for info in infos.values():
            hot.preload(info)
        first = time.perf_counter()
        # The first adapter in a slot changes the modules: compiled once more (both slots at once where two are
        # used, so that the switches below run on the slots they use).
        first_set = ((f"a{low}", 1.0), (f"b{low}", 0.5)) if args.slots > 1 else ((f"a{low}", 1.0),)
        with hot.use(first_set, infos.get), torch.inference_mode():
            transformer(**inputs)
        sync(device)
        results["first_adapter_compile_s"] = time.perf_counter() - first
        with hot.use(((f"a{low}", 1.0),), infos.get):
            results[f"forward_compiled_rank{low}_slot{max_rank}_s"] = time_forward(transformer, inputs, device, reps)
        save()

        before = compile_counters()
        hot_cycle: list[tuple[tuple[str, float], ...]] = [
            ((f"b{low}", 0.7),), ((f"c{high}", 1.0),), ((f"a{low}", 1.0),), ((f"a{low}", 0.3),), ()]
        if args.slots > 1:  # two at once: the second slot is created by a low-rank adapter, then takes the high
            hot_cycle += [((f"a{low}", 1.0), (f"b{low}", 0.5)), ((f"b{low}", 0.8), (f"c{high}", 0.6))]
        switch_times = []
        for i in range(SWITCHES):
            wanted = hot_cycle[i % len(hot_cycle)]
            switch_times.append(timed_switch(hot, wanted, infos, device))
            with hot.use(wanted, infos.get), torch.inference_mode():
                transformer(**inputs)
        sync(device)
        after = compile_counters()
        results["compiled_switch_ms"] = {"median": statistics.median(switch_times) * 1000,
                                         "max": max(switch_times) * 1000}
        results["dynamo_before"] = before
        results["dynamo_after"] = after
        results["recompiles_across_switches"] = (after["unique_graphs"] - before["unique_graphs"]) + (
            after["recompiles"] - before["recompiles"])
        save()

    _print_table(results, low)
    save()
    return 0


def _print_table(r: dict[str, Any], low: int) -> None:
    rows = [("device", r["device"]), ("build transformer (s)", r.get("build_seconds"))]
    none = r.get("forward_eager_none_s")
    with_lora = r.get(f"forward_eager_rank{low}_s")
    rows += [("forward eager, no adapter (s)", none), (f"forward eager, rank-{low} adapter (s)", with_lora)]
    if none and with_lora:
        rows.append((f"eager rank-{low} overhead", f"{(with_lora / none - 1) * 100:.1f} %"))
    rows.append(("eager switch, set_adapters (ms, median / max)", _pair(r.get("eager_switch_ms"))))
    if "forward_compiled_none_s" in r:
        slot = next(k for k in r if k.startswith("forward_compiled_rank"))
        rows += [("regional compile, first forward (s)", r["compile_first_forward_s"]),
                 ("forward compiled, no adapter (s)", r["forward_compiled_none_s"]),
                 (f"forward compiled, {slot.removeprefix('forward_compiled_').removesuffix('_s')} (s)", r[slot]),
                 ("compiled overhead", f"{(r[slot] / r['forward_compiled_none_s'] - 1) * 100:.1f} %"),
                 ("first adapters into the slots (s, includes the compile)", r["first_adapter_compile_s"]),
                 ("compiled switch, hotswap (ms, median / max)", _pair(r.get("compiled_switch_ms"))),
                 (f"recompiles across {r['switches']} switches", r["recompiles_across_switches"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"| {name.ljust(width)} | {text} |")


def _pair(value: dict[str, float] | None) -> str:
    return "-" if not value else f"{value['median']:.1f} / {value['max']:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
