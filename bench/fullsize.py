"""Full-size FLUX.1 with random weights, built directly on the GPU (see shared/GPU.md).

Used by ``bench/gpu_explore.py`` and by ``fluxserve bench`` on CUDA. The cost of a forward pass does not
depend on the weights' values, so timings are those of the published checkpoints; images are noise.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _init_like_checkpoint(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every floating parameter on its device: N(0, 0.02) weights, zero biases, unit norms.

    Constructors on the meta/GPU device leave some tensors uninitialized (empty): NaNs there would make
    quality checks meaningless, so every tensor gets a defined value.
    """
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.is_floating_point():
                continue
            if param.ndim == 1:
                if "norm" in name or name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)


def build_fullsize_flux(guidance_embeds: bool = False, device: str = "cuda",
                        dtype: torch.dtype = torch.bfloat16) -> tuple[Any, dict[str, float]]:
    """Build a FluxPipeline with the published architecture and random weights on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxserve.engine.tiny import _clip_tokenizer, _t5_tokenizer

    times: dict[str, float] = {}
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=guidance_embeds)
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", dropout_rate=0.0))
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                projection_dim=768, hidden_act="quick_gelu"))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
            )
    finally:
        torch.set_default_dtype(previous)
    for i, module in enumerate((transformer, t5, clip, vae)):
        _init_like_checkpoint(module, seed=i)
        module.eval()
    times["build_s"] = time.perf_counter() - started
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=_clip_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=_t5_tokenizer(512), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, times


def transformer_inputs(pipe: Any, width: int = 1024, height: int = 1024, batch: int = 1,
                       text_tokens: int = 256, guidance: float | None = None) -> dict[str, Any]:
    """Random inputs of the shapes the pipeline feeds the transformer at this size."""
    tr = pipe.transformer
    device, dtype = tr.device, tr.dtype
    seq = (height // 16) * (width // 16)
    gen = torch.Generator(device=device).manual_seed(0)
    img_ids = torch.zeros(height // 16, width // 16, 3, device=device)
    img_ids[..., 1] += torch.arange(height // 16, device=device)[:, None]
    img_ids[..., 2] += torch.arange(width // 16, device=device)[None, :]
    kwargs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, seq, 64, device=device, dtype=dtype, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096, device=device, dtype=dtype, generator=gen),
        "pooled_projections": torch.randn(batch, 768, device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if tr.config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), guidance if guidance is not None else 3.5, device=device,
                                        dtype=torch.float32)
    return kwargs
