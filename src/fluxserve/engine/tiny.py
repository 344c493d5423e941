"""Tiny random-weight pipelines built offline, saved in diffusers format.

They exist so that the demo and the tests run the exact code path of a real model (``from_pretrained``
of a diffusers directory) on a machine with no hub access. Weights come from fixed seeds, so every
machine builds the same model and the same seed gives the same image everywhere.

The shapes keep the real models' structure where it matters to the server: FLUX's VAE downsamples by
8 and the transformer packs 2×2 patches (sizes are multiples of 16), T5 pads to ``max_sequence_length``
and the Qwen-Image prompt template is tokenized exactly as with the real tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Family = Literal["flux", "qwen"]
TINY_FORMAT_VERSION = 1
_MARKER = "fluxserve_tiny.json"

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte→printable-character map used by byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _byte_level_vocab() -> dict[str, int]:
    return {ch: i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))}


def _clip_tokenizer(max_length: int = 77):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer

    vocab = _byte_level_vocab()
    vocab.update({ch + "</w>": len(vocab) + i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))})
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 512):  # type: ignore[no-untyped-def]
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += [(ch, -3.0) for ch in printable] + [("▁" + ch, -2.5) for ch in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _qwen_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]})
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    return tok


def _build_flux():  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=False,
    )
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id, hidden_act="quick_gelu",
    ))
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
    ))
    torch.manual_seed(3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    return pipe


def _build_qwen():  # type: ignore[no-untyped-def]
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()

    def ids(token: str) -> int:
        return int(tok.convert_tokens_to_ids(token))

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    torch.manual_seed(2)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tok),
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                             tokenizer=tok)
    return pipe


def build_tiny_pipeline(family: Family):  # type: ignore[no-untyped-def]
    """Build (in memory) the tiny pipeline of ``family`` with fixed-seed float32 weights."""
    builders = {"flux": _build_flux, "qwen": _build_qwen}
    if family in builders:
        pipe = builders[family]()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # as from_pretrained leaves them: no dropout
        return pipe
    raise ValueError(f"unknown tiny model family {family!r}; expected 'flux' or 'qwen'")


def is_tiny_model_dir(path: Path, family: Family) -> bool:
    """True when ``path`` holds a complete tiny model of ``family`` in the current format."""
    marker = path / _MARKER
    if not (marker.is_file() and (path / "model_index.json").is_file()):
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(meta.get("family") == family and meta.get("version") == TINY_FORMAT_VERSION)


def write_tiny_model(path: Path, family: Family) -> Path:
    """Build the tiny pipeline and save it to ``path`` with ``save_pretrained``.

    Written to a temporary sibling directory and renamed, so a crash never leaves half a model that
    a later start would try to load.
    """
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(family)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps({"family": family, "version": TINY_FORMAT_VERSION}))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote tiny %s model to %s", family, path)
    return path


def ensure_tiny_model(path: Path, family: Family) -> Path:
    """Return ``path``, building the tiny model there first if it is missing or outdated."""
    if not is_tiny_model_dir(path, family):
        write_tiny_model(path, family)
    return path
