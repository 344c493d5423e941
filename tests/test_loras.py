"""The LoRA library (torch-free): what a file's header says, families, names, and the request rules."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fluxserve.loras import LoraError, LoraLibrary, read_header, resolve_loras


def write_header_only(path: Path, shapes: dict[str, list[int]], metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file with zero-filled float32 tensors, written without torch."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def peft(module: str, rank: int, width: int = 8) -> dict[str, list[int]]:
    return {f"transformer.{module}.lora_A.weight": [rank, width], f"transformer.{module}.lora_B.weight": [width, rank]}


def test_headers_give_rank_targets_family_and_format(tmp_path: Path) -> None:
    write_header_only(tmp_path / "flux" / "a.safetensors",
                      {**peft("transformer_blocks.0.attn.to_q", 4), **peft("transformer_blocks.0.attn.to_out.0", 8)})
    write_header_only(tmp_path / "meta.safetensors", peft("blocks.0.to_k", 2), {"fluxserve.family": "qwen",
                                                                               "fluxserve.base_model": "tiny-qwen"})
    write_header_only(tmp_path / "kohya.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [16, 8],
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [24, 16],
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": [],
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": [16, 8],
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": [8, 16]})
    write_header_only(tmp_path / "qwen-guess.safetensors", peft("transformer_blocks.0.img_mlp.net.0.proj", 2))
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    write_header_only(tmp_path / "no-lora.safetensors", {"weight": [2, 2]})
    library = LoraLibrary(tmp_path).scan()
    assert set(library) == {"a", "meta", "kohya", "qwen-guess"}  # unreadable and non-LoRA files skipped
    a = library["a"]
    assert (a.family, a.rank, a.target_modules, a.format, a.text_encoder) == ("flux", 8, ("to_out.0", "to_q"),
                                                                           "peft", False)
    assert library["meta"].family == "qwen" and library["meta"].base_model == "tiny-qwen"
    kohya = library["kohya"]
    assert (kohya.family, kohya.format, kohya.rank, kohya.text_encoder) == ("flux", "kohya", 16, True)
    assert library["qwen-guess"].family == "qwen"
    card = a.card(["tiny-flux@cpu"])
    assert "path" not in card and card["loaded"] == ["tiny-flux@cpu"] and card["size_bytes"] > 0
    assert read_header(tmp_path / "flux" / "a.safetensors")["transformer.transformer_blocks.0.attn.to_q.lora_A"
                                                             ".weight"]["shape"] == [4, 8]


def test_names_found_twice_keep_the_first_and_changes_are_seen(tmp_path: Path) -> None:
    write_header_only(tmp_path / "style.safetensors", peft("x.to_q", 2))
    write_header_only(tmp_path / "qwen" / "style.safetensors", peft("x.to_q", 4))
    library = LoraLibrary(tmp_path)
    found = library.scan()
    assert found["style"].rank == 2 and found["qwen/style"].rank == 4 and found["qwen/style"].family == "qwen"
    write_header_only(tmp_path / "style.safetensors", peft("x.to_q", 32, width=16))  # a new size: re-read
    assert library.scan()["style"].rank == 32
    (tmp_path / "style.safetensors").unlink()
    assert set(library.scan()) == {"style"} and library.scan()["style"].family == "qwen"


def test_resolve_loras_rules(tmp_path: Path) -> None:
    write_header_only(tmp_path / "flux" / "b.safetensors", peft("x.to_q", 2))
    write_header_only(tmp_path / "flux" / "a.safetensors", peft("x.to_q", 2))
    write_header_only(tmp_path / "tiny.safetensors", peft("x.to_q", 2), {"fluxserve.base_model": "tiny-flux"})
    library = LoraLibrary(tmp_path)

    def resolve(loras: list[tuple[str, float]], **kw: object) -> tuple[tuple[str, float], ...]:
        args: dict[str, object] = {"model_key": "schnell", "family": "flux", "max_count": 2, "max_scale": 2.0}
        args.update(kw)
        return resolve_loras(library, loras, **args)  # type: ignore[arg-type]

    assert resolve([]) == ()
    assert resolve([("b", 1), ("a", 0.5)]) == (("a", 0.5), ("b", 1.0))  # sorted: one batching key per set
    for loras, kw, status, code in (
            ([("nope", 1.0)], {}, 404, "lora_not_found"),
            ([("a", 1.0)], {"family": "qwen", "model_key": "qwen"}, 400, "lora_family_mismatch"),
            ([("tiny", 1.0)], {}, 400, "lora_model_mismatch"),
            ([("a", 2.5)], {}, 400, "invalid_value"),
            ([("a", float("nan"))], {}, 400, "invalid_value"),
            ([("a", 1.0), ("a", 0.5)], {}, 400, "invalid_value"),
            ([("a", 1.0), ("b", 1.0), ("tiny", 1.0)], {}, 400, "too_many_loras"),
            ([("a", 1.0)], {"unavailable": "not here"}, 400, "loras_unavailable")):
        with pytest.raises(LoraError) as caught:
            resolve(loras, **kw)
        assert (caught.value.status, caught.value.code) == (status, code), loras
        assert "'loras'" in caught.value.message and str(tmp_path) not in caught.value.message
    assert resolve([("tiny", 1.0)], model_key="tiny-flux") == (("tiny", 1.0),)


def test_the_library_loads_no_torch() -> None:
    code = "import sys, fluxserve.loras; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
