"""``fluxserve bench`` pieces that the GPU runs depend on, run for real on the CPU with tiny models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest


def _safetensors_dtypes(path: Path) -> set[str]:
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + length])
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("key", ["tiny-qwen", "tiny-flux2-dev"])
def test_an_fp8_checkpoint_loads_back_with_exactly_the_in_memory_weights(tmp_path: Path, key: str) -> None:
    """--store-dtype float8_e4m3fn: the files hold fp8 (half of bf16), the in-memory pipeline keeps its dtype
    and holds the same rounded values that from_pretrained upcasts on load, so the baseline and the loaded
    paths compute on identical weights."""
    import diffusers
    import torch

    from fluxbench.serving import save_pipeline
    from fluxserve.engine.families import runner_for
    from fluxserve.models.registry import BUILTIN_MODELS

    runner = runner_for(BUILTIN_MODELS[key].family)
    pipe = runner.tiny_pipeline()
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    save_pipeline(pipe, tmp_path / "model", "float8_e4m3fn")
    weights = "diffusion_pytorch_model.safetensors"
    assert _safetensors_dtypes(tmp_path / "model" / "transformer" / weights) == {"F8_E4M3"}
    assert "F8_E4M3" not in _safetensors_dtypes(tmp_path / "model" / "vae" / weights)
    loaded = getattr(diffusers, runner.descriptor.pipeline_classes["generate"]).from_pretrained(
        tmp_path / "model", torch_dtype=torch.float32)
    for name in ("transformer", "text_encoder"):
        ours, theirs = dict(getattr(pipe, name).named_parameters()), dict(getattr(loaded, name).named_parameters())
        assert ours.keys() == theirs.keys()
        assert {p.dtype for p in ours.values()} == {p.dtype for p in theirs.values()} == {torch.float32}
        assert all(torch.equal(ours[n], theirs[n]) for n in ours), name
    moved = [n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])]
    assert moved  # the weights really were rounded to fp8 values
    assert max(float((p - before[n]).abs().max()) for n, p in pipe.transformer.named_parameters()) < 0.1


def test_the_edit_cases_run_on_every_path(tmp_path: Path) -> None:
    """img2img and inpaint through plain diffusers (the family's edit pipeline), the engine and a real server
    (images.edit, multipart with an RGBA mask): each path gives the baseline's image and reports the server's
    stage timings."""
    from fluxbench.serving import main

    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--cases", "img2img-128-4,inpaint-128-4", "--reps", "1", "--warmups", "1",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["case"], r["path"]): r for r in report["results"]}
    assert set(rows) == {(c, p) for c in ("img2img-128-4", "inpaint-128-4") for p in ("baseline", "engine", "http")}
    for case in ("img2img-128-4", "inpaint-128-4"):
        for path in ("engine", "http"):
            assert rows[case, path]["psnr_db"] is not None and rows[case, path]["psnr_db"] > 40, (case, path)
        stages = rows[case, "http"]["server_stage_median_s"]
        assert stages["denoise"] > 0 and stages["vae_decode"] > 0
    assert report["server"]["tiny_plain_first_start_to_ready_s"] > 0


def test_a_kept_checkpoint_is_reused_only_when_its_save_finished(tmp_path: Path) -> None:
    """--keep-model: the stamp is written after the save, so a directory whose save was cut short (no stamp, or
    a torn one) is never taken for a checkpoint; a stamped one says what it holds."""
    from fluxbench.serving import KEPT_STAMP, _kept_checkpoint

    checkpoint = tmp_path / "flux-schnell-random"
    assert _kept_checkpoint(checkpoint) is None  # nothing there
    checkpoint.mkdir()
    (checkpoint / "model_index.json").write_text("{}")
    assert _kept_checkpoint(checkpoint) is None  # saved files but no stamp: the save did not finish
    (checkpoint / KEPT_STAMP).write_text('{"variant": "schn')
    assert _kept_checkpoint(checkpoint) is None  # a torn stamp
    stamp = {"variant": "schnell", "store_dtype": "bfloat16", "diffusers": "0.42.1"}
    (checkpoint / KEPT_STAMP).write_text(json.dumps(stamp))
    assert _kept_checkpoint(checkpoint) == stamp
