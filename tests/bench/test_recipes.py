"""The peer paths of ``fluxserve bench`` (the public recipes) and what the bench reports about them, run for
real on the CPU with the tiny model: the rows and ratios a GPU run prints, the recipe's attention processor,
the FLOP count, the compile cache across processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

ALL_PATHS = "baseline,recipe-lossless,recipe-fp8,cache-dit,engine,http"


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in report["results"]}


@pytest.mark.e2e
def test_one_run_prints_every_path_with_both_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """baseline, both recipes, cache-dit, the engine and a real server in one run: each timed path has an
    end-to-end and a pipeline-only time, the engine and HTTP rows both ratios against the recipe of their
    numerics and against plain diffusers, every path a PSNR against plain; a path that cannot run here has
    a row that says why."""
    from fluxbench.serving import main

    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--cases", "64-1", "--paths", ALL_PATHS, "--recipe-compile", "none",
                 "--reps", "1", "--warmups", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = _rows(report)
    assert set(rows) == set(ALL_PATHS.split(","))
    timed = [p for p, r in rows.items() if not r.get("skipped")]
    assert {"baseline", "recipe-lossless", "engine", "http"} <= set(timed)
    for path in timed:
        row = rows[path]
        assert row["median_s"] > 0 and row["pipeline_median_s"] > 0, path
        assert row["vs_plain"] > 0 and row["vs_plain_pipeline"] > 0, path
        if path != "baseline":
            assert row["psnr_db"] is not None and row["psnr_db"] > 40, path  # fp32, no quantization: ~identical
    for path in ("engine", "http"):
        assert rows[path]["recipe"] == "recipe-lossless"  # plain mode: no quantization
        assert rows[path]["vs_recipe"] > 0 and rows[path]["vs_recipe_pipeline"] > 0, path
    assert "fused QKV" in rows["recipe-lossless"]["note"] and "channels-last VAE" in rows["recipe-lossless"]["note"]
    for path in ("recipe-fp8", "cache-dit"):  # no fp8 on a CPU; cache-dit only where it is installed
        row = rows[path]
        if row.get("skipped"):
            assert row["median_s"] is None and len(row["skipped"]) > 20, row
    assert rows["recipe-fp8"]["skipped"]  # torchao's float8 needs a CUDA GPU of capability 8.9+
    assert report["encoder"]["png_level"] == 1  # the server's level: every path encodes like the server
    assert rows["baseline"]["pil_default_png_s"] > 0

    compute = report["compute"]
    assert next(iter(compute["gemm_ceiling_tflops"].values())) > 0
    tiny = compute["tiny"]
    assert tiny["tokens"] == 16 + 256 and tiny["tflop"] > 0  # 64² → 4x4 latent patches, 256 T5 tokens
    for name in ("baseline plain", "recipe-lossless", "engine plain", "http plain"):
        assert tiny["paths"][name]["tflops"] > 0, name

    printed = capsys.readouterr().out
    assert "x recipe" in printed and "x plain" in printed
    assert "recipe-fp8 skipped:" in printed
    assert "GEMM ceiling measured in this run" in printed


def test_unknown_paths_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from fluxbench.serving import main

    assert main(["--device", "cpu", "--paths", "baseline,recipe-bf16"]) == 2
    assert "recipe-bf16" in capsys.readouterr().err


def test_ratios_pair_each_mode_with_the_recipe_of_its_numerics() -> None:
    from fluxbench.serving import add_ratios

    def row(path: str, mode: str, e2e: float | None, pipe: float | None = None, **extra: Any) -> dict[str, Any]:
        return {"case": "c", "path": path, "mode": mode, "median_s": e2e, "pipeline_median_s": pipe,
                "images_per_s": None, **extra}

    rows = [row("baseline", "plain", 2.0, 1.5), row("recipe-lossless", "lossless", 1.0, 0.9),
            row("recipe-fp8", "fp8", 0.8, 0.7), row("cache-dit", "—", None, skipped="cache-dit is not installed"),
            row("engine", "lossless", 0.5, 0.45), row("http", "fast", 0.4, 0.35)]
    add_ratios(rows)
    by = {r["path"]: r for r in rows}
    assert by["engine"]["recipe"] == "recipe-lossless" and by["engine"]["vs_recipe"] == 2.0
    assert by["engine"]["vs_recipe_pipeline"] == 2.0 and by["engine"]["vs_plain"] == 4.0
    assert by["http"]["recipe"] == "recipe-fp8" and by["http"]["vs_recipe"] == 2.0
    assert by["http"]["vs_plain_pipeline"] == round(1.5 / 0.35, 3)
    assert by["recipe-fp8"]["vs_plain"] == 2.5 and "vs_recipe" not in by["recipe-fp8"]
    assert "vs_plain" not in by["cache-dit"] and "vs_cache_dit" not in by["engine"]


def test_the_recipe_attention_processor_computes_what_diffusers_does() -> None:
    """The processor that runs FlashAttention-3 in recipe-fp8 is FLUX's attention with the kernel swapped:
    with PyTorch's SDPA as the kernel it gives diffusers' own output, fused projections or not."""
    from diffusers import FluxTransformer2DModel

    from fluxbench.recipes import KernelFluxAttnProcessor, sdpa_attention

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    inputs = {"hidden_states": torch.randn(1, 16, 4), "encoder_hidden_states": torch.randn(1, 8, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}
    with torch.no_grad():
        expected = model(**inputs)[0]
        for fuse in (False, True):
            if fuse:
                model.fuse_qkv_projections()
            model.set_attn_processor(KernelFluxAttnProcessor(sdpa_attention))
            got = model(**inputs)[0]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(expected, torch.zeros_like(expected))


def test_the_flop_count_of_flux1_follows_from_its_config() -> None:
    """One FLUX.1 forward at 1024² counted on the meta device equals the architecture's arithmetic: 57 blocks
    of 24·D²·N for the linears and 4·N²·D for attention (D = 3072, N image + text tokens), within the small
    per-image terms (embedders, modulation): 74.4 TFLOP with 512 text tokens (69.5 with the bench's 256)."""
    from diffusers import FluxTransformer2DModel

    from fluxbench.recipes import forward_flops

    with torch.device("meta"):
        model = FluxTransformer2DModel().to(torch.bfloat16)  # the published FLUX.1 config, no weights
    for text_tokens, tflop in ((512, 74.38),):
        with torch.device("meta"):
            kwargs = {"hidden_states": torch.empty(1, 4096, 64, dtype=torch.bfloat16),
                      "encoder_hidden_states": torch.empty(1, text_tokens, 4096, dtype=torch.bfloat16),
                      "pooled_projections": torch.empty(1, 768, dtype=torch.bfloat16),
                      "timestep": torch.empty(1, dtype=torch.bfloat16),
                      "img_ids": torch.empty(4096, 3, dtype=torch.bfloat16),
                      "txt_ids": torch.empty(text_tokens, 3, dtype=torch.bfloat16), "return_dict": False}
        counted = forward_flops(model, (), kwargs)
        n, d = 4096 + text_tokens, 3072
        arithmetic = 57 * (24 * d * d * n + 4 * n * n * d)
        assert math.isclose(counted, arithmetic, rel_tol=2e-3), (counted, arithmetic)
        assert round(counted / 1e12, 2) == tflop


def test_the_recipe_settings_do_not_leak_into_the_rest_of_the_run() -> None:
    import torch._inductor.config as inductor_config

    from fluxbench.recipes import AUTOTUNE_BUDGETS, RECIPE_INDUCTOR_FLAGS, scoped_compile_config, set_inductor_flags

    before = inductor_config.get_config_copy()
    with scoped_compile_config():
        applied, _ = set_inductor_flags({**RECIPE_INDUCTOR_FLAGS, **AUTOTUNE_BUDGETS["bounded"]})
        assert "epilogue_fusion=False" in applied and inductor_config.epilogue_fusion is False
        assert inductor_config.coordinate_descent_check_all_directions is False  # the budget over the recipe
    assert inductor_config.get_config_copy() == before


@pytest.mark.parametrize("budget", ["bounded", "aten"])
def test_every_autotune_budget_names_settings_this_torch_has(budget: str) -> None:
    """A misspelt or retired Inductor setting would be reported missing and the budget silently not bounded."""
    import torch._inductor.config as inductor_config

    from fluxbench.recipes import AUTOTUNE_BUDGETS, RECIPE_INDUCTOR_FLAGS, scoped_compile_config, set_inductor_flags

    with scoped_compile_config():
        _, missing = set_inductor_flags({**RECIPE_INDUCTOR_FLAGS, **AUTOTUNE_BUDGETS[budget]})
        assert missing == []
        if budget == "aten":
            assert inductor_config.max_autotune_gemm_backends == "ATEN"
            assert inductor_config.max_autotune_conv_backends == "ATEN"


def test_peers_say_why_they_cannot_run() -> None:
    from fluxbench.recipes import fp8_problem, peer_problem

    assert "CUDA" in (fp8_problem("cpu") or "")
    assert "no fluxserve family serves" in (peer_problem("recipe-lossless", "StableDiffusionPipeline", "cpu") or "")
    assert "FluxPipeline only" in (peer_problem("cache-dit", "QwenImagePipeline", "cpu") or "")
    for pipeline_class in ("FluxPipeline", "QwenImagePipeline", "Flux2KleinPipeline", "ZImagePipeline"):
        assert peer_problem("recipe-lossless", pipeline_class, "cpu") is None
        assert "CUDA" in (peer_problem("recipe-fp8", pipeline_class, "cpu") or "")


_COMPILE_ONCE = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from fluxbench.recipes import CompileCache

    cache = CompileCache(Path(sys.argv[1]), "cpu")
    loaded = cache.activate()["loaded"]
    model = torch.nn.Linear(16, 4, bias=False)  # one matrix product: a graph to cache, no C++ kernel to build
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(8, 16))
    saved = cache.save("test")
    print(json.dumps({"loaded": loaded, "saved": saved, "inductor": dict(counters["inductor"])}))
""")


def _compile_once(directory: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, str(directory)], capture_output=True, text=True,
                          timeout=240, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_another_machine_reuses_the_compile_cache_bundle(tmp_path: Path) -> None:
    """--compile-cache: the first process compiles into DIR/inductor and bundles what it compiled; a second
    process that has only the bundle (as another machine would) loads it and finds the compiled graph instead
    of compiling it."""
    import shutil

    first = _compile_once(tmp_path / "cc")
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1 and first["saved"]["bytes"] > 0
    assert any((tmp_path / "cc" / "inductor").rglob("*"))  # Inductor wrote its caches where it was pointed
    bundle = Path(first["saved"]["saved"])
    assert bundle.parent == tmp_path / "cc" and bundle.exists()
    shutil.rmtree(tmp_path / "cc" / "inductor")
    second = _compile_once(tmp_path / "cc")
    assert second["loaded"][bundle.name]["artifacts"]["inductor"] >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not second["inductor"].get("fxgraph_cache_miss")


def test_the_recipe_pipeline_is_captured_whole_and_draws_what_plain_diffusers_draws(tmp_path: Path) -> None:
    """recipe-lossless as it is compiled on the GPU — fused QKV, channels-last VAE, the recipe's Inductor flags,
    torch.compile(fullgraph=True) of the transformer and of vae.decode — traced by Dynamo here (the eager
    backend: the same capture, no kernel build; the compile-cache test builds kernels): no graph break, and
    the image of plain diffusers."""
    import numpy as np
    from diffusers import FluxPipeline
    from torch._dynamo.utils import counters

    from fluxbench.recipes import PeerOptions, fresh_pipeline, prepare_recipe, scoped_compile_config
    from fluxbench.serving import CPU_CASES, _prepare_model, psnr

    case = next(c for c in CPU_CASES if c.name == "64-1")
    _, plain, local_dir = _prepare_model("tiny", "cpu", tmp_path, {})
    assert isinstance(plain, FluxPipeline)
    call = {"prompt": "a lighthouse", "width": case.width, "height": case.height, "num_inference_steps": 2,
            "guidance_scale": 0.0, "max_sequence_length": 256}
    expected = np.asarray(plain(**call, generator=torch.Generator().manual_seed(3)).images[0])
    shared = {k: v for k, v in plain.components.items() if k not in ("transformer", "vae")}
    torch._dynamo.reset()
    counters.clear()
    with scoped_compile_config():
        pipe = fresh_pipeline(shared, local_dir, "cpu", torch.float32)
        setup = prepare_recipe(pipe, fp8=False, options=PeerOptions(compile_mode="default", backend="eager"),
                               device="cpu")
        got = np.asarray(pipe(**call, generator=torch.Generator().manual_seed(3)).images[0])
    torch._dynamo.reset()
    assert "fused QKV" in setup.applied and "channels-last VAE" in setup.applied
    assert any("fullgraph=True) on transformer and vae.decode" in words for words in setup.applied)
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    assert got.dtype == np.uint8 and psnr(got, expected)[0] > 40


def test_the_compile_step_compiles_each_target_once_and_the_pipeline_reuses_it(tmp_path: Path) -> None:
    """compile_peer compiles the transformer and vae.decode on their own, one at a time (so a run stopped in a
    long compile says which target finished), on exactly the inputs the pipeline passes: the pipeline call that
    follows captures no further graph (eager backend: the same capture and guards, no kernel build)."""
    from torch._dynamo.utils import counters

    from fluxbench.recipes import PeerOptions, fresh_pipeline, prepare_recipe, scoped_compile_config
    from fluxbench.serving import CPU_CASES, _prepare_model, compile_peer, pipeline_transformer_inputs

    case = next(c for c in CPU_CASES if c.name == "64-1")
    _, plain, local_dir = _prepare_model("tiny", "cpu", tmp_path, {})
    forward_inputs = pipeline_transformer_inputs(plain, case)
    shared = {k: v for k, v in plain.components.items() if k not in ("transformer", "vae")}
    torch._dynamo.reset()
    counters.clear()
    info: dict[str, Any] = {}
    flushed: list[list[str]] = []
    with scoped_compile_config():
        pipe = fresh_pipeline(shared, local_dir, "cpu", torch.float32)
        prepare_recipe(pipe, fp8=False, options=PeerOptions(compile_mode="default", backend="eager"), device="cpu")
        compile_peer(pipe, case, forward_inputs, "cpu", info, lambda: flushed.append(list(info["compile"])))
        graphs = counters["stats"]["unique_graphs"]
        pipe(prompt="a lighthouse", width=case.width, height=case.height, num_inference_steps=case.steps,
             guidance_scale=0.0, max_sequence_length=256)
        after = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert flushed == [["transformer"], ["transformer", "vae.decode"]]  # written as each target finished
    assert all(step["seconds"] >= 0 for step in info["compile"].values())
    assert graphs == 2 and after == graphs  # one graph per target, none added by the pipeline call


@pytest.mark.parametrize("key", ["tiny-klein", "tiny-zimage", "tiny-qwen"])
def test_the_recipe_applies_to_every_family_and_draws_what_plain_diffusers_draws(tmp_path: Path, key: str) -> None:
    """recipe-lossless on another family's pipeline (klein, Z-Image, Qwen-Image), as far as each step fits it:
    fused QKV only where the family has a fused path, channels-last only for a 2-D VAE; traced whole by Dynamo
    (eager backend) and drawing the image of plain diffusers."""
    import numpy as np
    from torch._dynamo.utils import counters

    from fluxbench.recipes import PeerOptions, fresh_pipeline, prepare_recipe, scoped_compile_config
    from fluxbench.serving import _call_kwargs, _prepare_model, family_cases, psnr

    case = family_cases(key.removeprefix("tiny-"), "cpu")[0]
    _, plain, local_dir = _prepare_model(key, "cpu", tmp_path, {})
    call = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2,
            **_call_kwargs(case, plain)}
    expected = np.asarray(plain(**call, generator=torch.Generator().manual_seed(3)).images[0])
    shared = {k: v for k, v in plain.components.items() if k not in ("transformer", "vae")}
    torch._dynamo.reset()
    counters.clear()
    with scoped_compile_config():
        pipe = fresh_pipeline(shared, local_dir, "cpu", torch.float32, type(plain).__name__)
        assert type(pipe) is type(plain)
        setup = prepare_recipe(pipe, fp8=False, options=PeerOptions(compile_mode="default", backend="eager"),
                               device="cpu")
        got = np.asarray(pipe(**call, generator=torch.Generator().manual_seed(3)).images[0])
    torch._dynamo.reset()
    fusable = key != "tiny-zimage" and key != "tiny-qwen"  # the families' descriptors: klein fuses, the others not
    assert any(words.startswith("fused QKV") for words in setup.applied) is fusable
    assert ("channels-last VAE" in setup.applied) is (key != "tiny-qwen")  # Qwen-Image's VAE is a 3-D one
    assert counters["stats"]["unique_graphs"] >= 2
    assert bool(counters["graph_break"]) is (key == "tiny-zimage")  # whole graphs but Z-Image's (the row says so)
    assert any("fullgraph=False on the transformer" in words for words in setup.applied) is (key == "tiny-zimage")
    assert got.dtype == np.uint8 and psnr(got, expected)[0] > 40
