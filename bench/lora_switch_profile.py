"""Where a LoRA switch spends its time: FLUX.1's full block structure (19 double + 38 single blocks, the same
~500 adapted linears) at a tiny width on the CPU, so the per-layer Python of a switch is what is measured and
the tensor copies are negligible.

    PYTHONPATH=src python bench/lora_switch_profile.py [--top 25]

Switches between three loaded adapters through the engine's ``AdapterState``, eager (``set_adapters``) and
hot-swapped (``load_lora_weights(hotswap=True)`` into slots padded to the larger rank, uncompiled: the switch
itself is the same code as under compilation), prints the median switch time of each and the functions that
take the most cumulative time under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_gpu import pipeline_for, write_random_lora

from fluxserve.engine.adapters import AdapterState


def structure_transformer() -> Any:
    """FLUX.1's block counts at a tiny width (random weights, float32, CPU)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model: Any = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return model.eval().requires_grad_(False)


def profile_switches(state: AdapterState, cycle: list[tuple[tuple[str, float], ...]], infos: dict[str, Any],
                     switches: int, top: int, title: str) -> float:
    times = []
    profiler = cProfile.Profile()
    for i in range(switches):
        wanted = cycle[i % len(cycle)]
        started = time.perf_counter()
        profiler.enable()
        with state.use(wanted, infos.get):
            profiler.disable()
            times.append(time.perf_counter() - started)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    median = statistics.median(times) * 1000
    print(f"## {title}: median switch {median:.1f} ms, max {max(times) * 1000:.1f} ms over {switches} switches")
    print(out.getvalue())
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--switches", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lora-profile-"))
    transformer = structure_transformer()
    linears = sum(1 for module in transformer.modules() if isinstance(module, torch.nn.Linear))
    infos = {"a4": write_random_lora(transformer, work / "a4.safetensors", 4, 1),
             "b4": write_random_lora(transformer, work / "b4.safetensors", 4, 2),
             "c8": write_random_lora(transformer, work / "c8.safetensors", 8, 3)}
    print(f"{linears} linear layers; adapters on every attention projection")
    cycle: list[tuple[tuple[str, float], ...]] = [(("a4", 1.0),), (("b4", 0.7),), (("c8", 1.0),), (),
                                                  (("a4", 0.5),)]
    pipe = pipeline_for(transformer)
    eager = AdapterState(pipe, capacity=8)
    for info in infos.values():
        eager.preload(info)
    profile_switches(eager, cycle, infos, args.switches, args.top, "eager (collected layers)")
    for name in list(infos):
        eager.unload(name)
    pipe.unload_lora_weights()
    pipe.enable_lora_hotswap(target_rank=8)
    hot = AdapterState(pipe, capacity=8, hotswap=True, slots=1, max_rank=8)
    for info in infos.values():
        hot.preload(info)
    with hot.use((("a4", 1.0),), infos.get):  # the first adapter into the slot creates it
        pass
    profile_switches(hot, cycle, infos, args.switches, args.top, "hot-swap (copies into the slot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
