"""A family added the way docs/families.md says, and nothing else: one descriptor, one runner (both in this module)
and one registry line (``registered``, what ``BUILTIN_FAMILIES`` does for the built-in ones). The server then
serves it over HTTP: generations, edits, its card in /v1/models and token counts, each read from the
descriptor or run by the runner, with no line of fluxserve naming the family.

The family, ``mosaic``, serves ``FluxPipeline`` checkpoints (a pipeline class another family serves too: the
model's own family wins) and builds its tiny model from tiny-flux's components.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.engine.families import runner_for
from fluxserve.engine.families.base import DenoiseArgs, FamilyRunner, PromptEmbedding, stack
from fluxserve.models.descriptor import FamilyDescriptor, Tokenizer
from fluxserve.models.registry import registered
from fluxserve.models.spec import TINY_PRESETS, FamilyDefaults, ModelSpec

if TYPE_CHECKING:
    import torch

# --- the descriptor ---------------------------------------------------------------------------------------
MOSAIC = FamilyDescriptor(
    name="mosaic",
    title="Mosaic (a FluxPipeline family declared by a test)",
    runner=f"{__name__}:MosaicRunner",
    pipeline_classes={"generate": "FluxPipeline", "img2img": "FluxImg2ImgPipeline"},
    defaults=FamilyDefaults(steps=3, guidance=0.0, sources={"steps": "this test"}),
    models=(ModelSpec(key="tiny-mosaic", source="tiny-mosaic", family="mosaic", tiny="mosaic",
                      licence="Apache-2.0", steps=2, guidance=0.0, max_sequence_length=48, width=64, height=64,
                      presets=TINY_PRESETS),),
    tokenizers=(Tokenizer("tokenizer", limit=77), Tokenizer("tokenizer_2")),
    default_strength=0.9,
)


# --- the runner -------------------------------------------------------------------------------------------
class MosaicRunner(FamilyRunner):
    descriptor = MOSAIC

    def encode(self, pipe: Any, prompt: str, max_sequence_length: int) -> PromptEmbedding:
        embeds, pooled, _ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe._execution_device,
                                                  max_sequence_length=max_sequence_length)
        return PromptEmbedding({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    def denoise(self, pipe: Any, positives: Sequence[PromptEmbedding], negatives: Sequence[PromptEmbedding] | None,
                args: DenoiseArgs) -> torch.Tensor:
        return pipe(prompt_embeds=stack(positives, "prompt_embeds"),
                    pooled_prompt_embeds=stack(positives, "pooled_prompt_embeds"), width=args.width,
                    height=args.height, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    generator=args.generators, output_type="latent", return_dict=False,
                    callback_on_step_end=args.callback, **args.call_kwargs)[0]

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def decode(self, pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        vae = pipe.vae
        latents = self.spatial_latents(pipe, latents, width, height)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def tiny_pipeline(self) -> Any:
        return runner_for("flux").tiny_pipeline()  # an existing tiny pipeline class and its components


# --- served ----------------------------------------------------------------------------------------------
@pytest.fixture
def mosaic() -> Iterator[FamilyDescriptor]:
    with registered(MOSAIC) as family:  # the registry line
        yield family


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _image(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


async def test_a_family_added_through_its_descriptor_runner_and_registry_line_is_served(
        mosaic: FamilyDescriptor, app_factory: Callable[..., Any], tmp_path: Path) -> None:
    async with app_factory(model="tiny-mosaic", cache_dir=tmp_path / "cache", warmup_sizes=["64x64"]) as client:
        body = {"prompt": "a tiled floor", "size": "64x64", "num_inference_steps": 2, "seed": 3}
        response = await client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        assert _image(response.json()["data"][0]).size == (64, 64)
        model = client.app.state.runtime.model_info("tiny-mosaic")["cpu"]
        assert model.descriptor is mosaic and type(model.runner) is MosaicRunner  # not FluxPipeline's first family

        card = (await client.get("/v1/models/tiny-mosaic")).json()
        assert card["family"] == "mosaic" and card["loaded"] is True
        assert card["guidance_parameter"] == "guidance_scale"
        assert card["edits"] == {"without_mask": "img2img", "with_mask": None, "max_images": 1,
                                 "masked_by_compositing": False}
        assert card["defaults"]["num_inference_steps"] == 2

        tokens = (await client.post("/v1/tokenize", json={"prompt": "a tiled floor"})).json()
        assert tokens["limits"] == {"tokenizer": 77, "tokenizer_2": 48} and set(tokens["counts"]) == set(
            tokens["limits"])

        edited = await client.post("/v1/images/edits", files={"image": ("in.png", _png(), "image/png")},
                                   data={"prompt": "make it blue", "num_inference_steps": "3"})
        assert edited.status_code == 200, edited.text
        params = edited.json()["data"][0]["params"]
        assert params["task"] == "img2img" and params["strength"] == 0.9  # the descriptor's default strength

        masked = await client.post("/v1/images/edits", files={"image": ("in.png", _png(), "image/png"),
                                                               "mask": ("mask.png", _png(), "image/png")},
                                   data={"prompt": "make it blue"})
        assert masked.status_code == 400  # it declares no inpainting pipeline
        assert masked.json()["error"]["param"] == "mask"


def test_the_family_is_named_nowhere_in_fluxserve() -> None:
    source = Path(__file__).resolve().parents[2] / "src"
    assert not [path for path in source.rglob("*.py") if "mosaic" in path.read_text(encoding="utf-8").lower()]
