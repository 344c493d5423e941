"""The compute budget counts what a request costs: transformer passes over image and text tokens, and the
VAE per output megapixel, so a few-step request for many huge images is refused like a many-step one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxserve.api.protocol import ImageGenerationRequest
from fluxserve.api.serving import compute_cost
from fluxserve.generation import GenerationParams
from fluxserve.models.registry import family_descriptor, resolve_model

from .helpers import assert_openai_error

GEN = "/v1/images/generations"


def test_many_huge_images_in_one_step_are_refused_at_the_default_budget(bare_client: Callable[..., Any]) -> None:
    """n=4 × 2048² × 1 step: 16 megapixels to decode, most of the work on a CPU; refused before a job exists."""
    with bare_client() as client:
        response = client.post(GEN, json={"prompt": "x", "n": 4, "size": "2048x2048", "num_inference_steps": 1})
        error = assert_openai_error(response, 400, param="size", code="compute_budget_exceeded")
        assert "FLUX_MAX_MEGAPIXEL_STEPS" in error["message"] and "VAE" in error["message"]


def test_a_typical_request_is_within_the_default_budget(bare_client: Callable[..., Any]) -> None:
    """1024² × 28 steps × n=1 with 512 text tokens (FLUX.1-dev's defaults) is accepted: the service builds
    its job (it is not run here: on a CPU that would take minutes)."""
    with bare_client() as client:
        body = ImageGenerationRequest.model_validate({"prompt": "a lighthouse", "size": "1024x1024",
                                                      "num_inference_steps": 28, "max_sequence_length": 512})
        job = client.fastapi_app.state.images.build_job(body)
        assert (job.params.width, job.params.height, job.params.steps, job.n) == (1024, 1024, 28, 1)


def test_true_cfg_doubles_the_transformer_cost_and_inputs_add_vae_encodes() -> None:
    plain, cfg = resolve_model("tiny-flux"), resolve_model("tiny-qwen")
    params = GenerationParams(plain.key, 1024, 1024, 10, 4.0, 512)
    transformer, vae = compute_cost(params, 1, family_descriptor(plain.family), vae_megapixel_cost=6.0)
    assert transformer == 10 * (4096 + 512) / 4096 and abs(vae - 6.0 * 1.048576) < 1e-9
    doubled, _ = compute_cost(params, 1, family_descriptor(cfg.family), vae_megapixel_cost=6.0)
    assert doubled == 2 * transformer
    _, with_input = compute_cost(params, 1, family_descriptor(plain.family), vae_megapixel_cost=6.0, input_images=1)
    assert abs(with_input - 2 * vae) < 1e-9
