"""In-process tests of POST /v1/images/edits, /v1/images/edits/jobs and /v1/images/variations on the tiny
models: multipart and JSON bodies, tasks, sizes, seeds, masks, streaming, async jobs, metrics, batching key."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fluxserve.models.registry import BUILTIN_MODELS

TINY_KEYS = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]
"""Requests may name every tiny model here (FLUX_MODELS)."""

pytestmark = pytest.mark.asyncio(loop_scope="module")

EDIT = "/v1/images/edits"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def photo(width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like test image (blocks of colour), deterministic."""
    blocks = np.random.default_rng(seed).integers(0, 255, (height // 8 + 1, width // 8 + 1, 3))
    return np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)[:height, :width]


def left_half_mask(width: int = 64, height: int = 64) -> np.ndarray:
    """OpenAI's mask: transparent pixels (alpha 0) mark the area to change — here the left half."""
    mask = np.full((height, width, 4), 255, np.uint8)
    mask[:, : width // 2, 3] = 0
    return mask


def pixels_of(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


@pytest.fixture(scope="module")
async def client(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fluxserve.settings import Settings
    from tests.conftest import running_app

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, output_dir=tmp_path_factory.mktemp("out"),
                        device="cpu", warmup_sizes=["64x64"], preload_models=["tiny-kontext"], models=TINY_KEYS,
                        store_local=False,
                        max_batch=1, _env_file=None)  # type: ignore[call-arg]
    async with running_app(settings) as c:
        yield c


def form(**fields: Any) -> dict[str, str]:
    defaults = {"prompt": "a red barn", "num_inference_steps": 2, "seed": 5}
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in {**defaults, **fields}.items()}


async def test_img2img_multipart_auto_size_seeds_and_fields(client: Any) -> None:
    image = photo(100, 70)
    response = await client.post(EDIT, files={"image": ("in.png", png(image), "image/png")},
                                 data=form(n=2, strength=0.75, output_format="webp", user="u1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "96x64"  # "auto" (the default): the first image's size on the model's multiple of 16
    assert body["output_format"] == "webp" and len(body["data"]) == 2
    first, second = body["data"]
    assert (first["seed"], second["seed"]) == (5, 6)
    assert first["params"]["task"] == "img2img" and first["params"]["strength"] == 0.75
    assert Image.open(io.BytesIO(base64.b64decode(first["b64_json"]))).format == "WEBP"
    assert {"text_encode", "denoise", "vae_decode", "total"} <= set(first["timing"])
    assert response.headers["x-job-id"] == first["job_id"] == first["request_id"]  # no label: the job id


async def test_same_seed_same_bytes_and_json_equals_multipart(client: Any) -> None:
    image = png(photo())
    runs = [await client.post(EDIT, files={"image": ("in.png", image, "image/png")}, data=form()) for _ in range(2)]
    as_json = await client.post(EDIT, json={"prompt": "a red barn", "num_inference_steps": 2, "seed": 5,
                                            "image": data_url(image)})
    openai_json = await client.post(EDIT, json={"prompt": "a red barn", "num_inference_steps": 2, "seed": 5,
                                                "images": [{"image_url": data_url(image)}]})
    other_seed = await client.post(EDIT, files={"image": ("in.png", image, "image/png")}, data=form(seed=6))
    blobs = [r.json()["data"][0]["b64_json"] for r in (*runs, as_json, openai_json)]
    assert len(set(blobs)) == 1
    assert other_seed.json()["data"][0]["b64_json"] != blobs[0]


async def test_strength_moves_the_result_away_from_the_input(client: Any) -> None:
    image = photo()
    distances = []
    for strength in (0.5, 1.0):
        response = await client.post(EDIT, files={"image": ("in.png", png(image), "image/png")},
                                     data=form(strength=strength, num_inference_steps=4))
        distances.append(np.abs(pixels_of(response.json()["data"][0]).astype(int) - image).mean())
    assert distances[0] != distances[1]


@pytest.fixture(scope="module")
def tiny_vae_round_trip_error(cache_dir: Path) -> float:
    """How far the tiny FLUX VAE's encode → decode moves the test image: what a kept area would drift by
    without the copy-back."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(cache_dir / "models" / "tiny-flux")
    with torch.inference_mode():
        x = pipe.image_processor.preprocess(Image.fromarray(photo()), 64, 64)
        latents = pipe.vae.encode(x).latent_dist.mode()
        back = pipe.vae.decode(latents, return_dict=False)[0]
    restored = ((back.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return float(np.abs(restored[:, 32:].astype(int) - photo()[:, 32:]).max())


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-kontext"])
async def test_inpaint_keeps_the_unmasked_pixels(client: Any, model: str, tiny_vae_round_trip_error: float) -> None:
    image = photo()
    response = await client.post(EDIT, files={"image": ("in.png", png(image), "image/png"),
                                              "mask": ("mask.png", png(left_half_mask()), "image/png")},
                                 data=form(model=model, num_inference_steps=3))
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["params"]["task"] == "inpaint"
    out = pixels_of(item)
    kept = np.abs(out[:, 32:].astype(int) - image[:, 32:]).max()
    changed = np.abs(out[:, :32].astype(int) - image[:, :32]).mean()
    # The random-weight VAE's round trip alone moves these pixels by up to ~255; the area outside the mask is
    # the input's own pixels (copied back after decoding), so it is within that bound — exactly equal, in fact.
    assert tiny_vae_round_trip_error > 10
    assert kept <= tiny_vae_round_trip_error
    assert kept == 0
    assert changed > 5


async def test_kontext_edits_by_instruction(client: Any) -> None:
    image = png(photo())
    response = await client.post(EDIT, files={"image": ("in.png", image, "image/png")},
                                 data=form(model="tiny-kontext", prompt="make it snowy", input_fidelity="high"))
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["params"]["task"] == "edit" and "strength" not in item["params"]  # exclude_none: no strength
    assert item["model_key"] == "tiny-kontext" and item["params"]["width"] == 64


async def test_variations_are_prompt_free_img2img(client: Any) -> None:
    image = png(photo(80, 64))
    response = await client.post("/v1/images/variations", files={"image": ("in.png", image, "image/png")},
                                 data={"n": "2", "seed": "9", "num_inference_steps": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "80x64" and [d["seed"] for d in body["data"]] == [9, 10]
    assert body["data"][0]["params"]["task"] == "img2img" and body["data"][0]["params"]["strength"] == 0.75
    as_json = await client.post("/v1/images/variations", json={"image": data_url(image), "n": 2, "seed": 9,
                                                               "num_inference_steps": 4})
    assert as_json.json()["data"][0]["b64_json"] == body["data"][0]["b64_json"]
    refused = await client.post("/v1/images/variations", files={"image": ("in.png", image, "image/png")},
                                data={"model": "tiny-kontext"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


async def _edit_events(client: Any, **fields: Any) -> list[dict[str, Any]]:
    async with client.stream("POST", EDIT, files={"image": ("in.png", png(photo()), "image/png")},
                             data=form(stream=True, partial_images=1, num_inference_steps=4, strength=1.0,
                                       **fields)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


async def test_streamed_edit_events(client: Any) -> None:
    """OpenAI's edit events only: the partial image (at the output size), then the image."""
    events = await _edit_events(client)
    assert [e["type"] for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial, completed = events
    assert Image.open(io.BytesIO(base64.b64decode(partial["b64_json"]))).size == (64, 64)
    assert partial["size"] == "64x64" and partial["partial_image_index"] == 0
    assert completed["size"] == "64x64" and completed["b64_json"] and completed["params"]["task"] == "img2img"


async def test_streamed_edit_progress_is_a_form_field_away(client: Any) -> None:
    events = await _edit_events(client, stream_progress="true")
    types = [e["type"] for e in events]
    assert "image_edit.partial_image" in types and types[-1] == "image_edit.completed"
    assert not any(t.startswith("image_generation.") for t in types)
    progress = [e for e in events if e["type"] == "image_edit.progress" and e["status"] == "running" and e["step"]]
    assert [e["step"] for e in progress] == [1, 2, 3, 4] and progress[-1]["total"] == 4


async def test_async_edit_job(client: Any) -> None:
    response = await client.post(EDIT + "/jobs", files={"image": ("in.png", png(photo()), "image/png")},
                                 data=form(request_id="edit-job-1"))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]  # issued by the server; the client's request_id is a label
    assert response.json()["request_id"] == "edit-job-1" and response.headers["location"] == f"/v1/images/jobs/{job_id}"
    async with client.stream("GET", f"/v1/images/jobs/{job_id}/events") as events:
        seen = [json.loads(line[6:])["type"] async for line in events.aiter_lines()
                if line.startswith("data: {")]
    assert seen[-1] == "succeeded"  # the result is stored before the job is recorded as succeeded
    polled = (await client.get(f"/v1/images/jobs/{job_id}")).json()
    assert polled["status"] == "succeeded"
    assert polled["result"]["data"][0]["params"]["task"] == "img2img"


async def test_finished_jobs_do_not_keep_their_inputs(client: Any) -> None:
    """Async jobs stay pollable with their result for FLUX_JOB_TTL; their input pixels (up to 16 images and a
    mask) must not stay in memory: the job store keeps the uploaded files as objects beside the results (a
    restart needs them) and deletes them with the job's results."""
    response = await client.post(EDIT + "/jobs", files={"image": ("in.png", png(photo()), "image/png"),
                                                        "mask": ("m.png", png(left_half_mask()), "image/png")},
                                 data=form(request_id="edit-kept-1"))
    assert response.status_code == 202
    job_id = response.json()["id"]
    async with client.stream("GET", f"/v1/images/jobs/{job_id}/events") as events:
        seen = [json.loads(line[6:])["type"] async for line in events.aiter_lines() if line.startswith("data: {")]
    assert seen[-1] == "succeeded"
    assert client.app.state.runtime.scheduler.table.get(job_id, None) is None  # no job (no pixels) in memory
    jobs = client.app.state.jobs
    stored = jobs.store.load(job_id)
    assert stored is not None and "image" not in json.dumps(stored.request["body"])  # no pixels in the database
    inputs = jobs.results.get(f"{job_id}/input-0")
    assert inputs == png(photo())  # the upload, kept for a restart, deleted with the job's results
    jobs.results.delete_job(job_id)
    with pytest.raises(LookupError):
        jobs.results.get(f"{job_id}/input-mask")


async def test_metrics_count_images_by_task(client: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def count(task: str) -> float:
        text = (await client.get("/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "fluxserve_images_generated_total" and s.labels.get("task") == task)

    before = await count("inpaint")
    await client.post(EDIT, files={"image": ("in.png", png(photo()), "image/png"),
                                   "mask": ("m.png", png(left_half_mask()), "image/png")}, data=form(n=2))
    assert await count("inpaint") == before + 2


def test_batching_key_holds_identical_inputs_together(cache_dir: Path) -> None:
    """Edit jobs share a batch only when their inputs are byte-identical: the inputs digest is in the key."""
    from fluxserve.api.editing import EditService, Upload
    from fluxserve.api.protocol import ImageEditRequest
    from fluxserve.api.serving import ImageService
    from fluxserve.runtime import Runtime
    from fluxserve.settings import Settings

    settings = Settings(model="tiny-flux", cache_dir=cache_dir, device="cpu", _env_file=None)  # type: ignore[call-arg]
    edits = EditService(ImageService(Runtime(settings), settings.http))
    body = ImageEditRequest(prompt="a", num_inference_steps=2)
    a, b = png(photo(seed=1)), png(photo(seed=2))

    def job(image: bytes, prompt: str = "a", mask: bytes | None = None) -> Any:
        return edits.build_job(body.model_copy(update={"prompt": prompt}), [Upload("image", image)],
                               Upload("mask", mask) if mask else None, "id")

    assert job(a).params == job(a, prompt="another prompt").params  # same inputs: may batch
    assert job(a).params != job(b).params  # other pixels: never together
    assert job(a).params != job(a, mask=png(left_half_mask())).params
    generation = edits.images.build_job(body, request_id="id")
    assert generation.params.inputs is None and generation.params != job(a).params
    assert job(a).images[0].shape == (64, 64, 3) and job(a, mask=png(left_half_mask())).mask is not None


EDIT_MODELS = [key for key, spec in BUILTIN_MODELS.items() if spec.tiny is not None]


@pytest.mark.parametrize("model", EDIT_MODELS)
async def test_every_tiny_family_edits_and_keeps_the_unmasked_area(client: Any, model: str) -> None:
    """Each tiny model through HTTP: the family's task without a mask, its masked task with the area outside
    the mask kept, and a 400 naming ``image`` past its image count."""
    from fluxserve.api.editing import edit_modes
    from fluxserve.models.registry import resolve_model

    modes = edit_modes(resolve_model(model))
    assert modes is not None, f"{model} cannot edit"
    image = photo(seed=3)
    plain = await client.post(EDIT, files={"image": ("in.png", png(image), "image/png")}, data=form(model=model))
    assert plain.status_code == 200, plain.text
    assert plain.json()["data"][0]["params"]["task"] == modes.without_mask
    inputs = {"image": ("in.png", png(image), "image/png"), "mask": ("m.png", png(left_half_mask()), "image/png")}
    masked = await client.post(EDIT, files=inputs, data=form(model=model, n=2))
    assert masked.status_code == 200, masked.text
    first, second = masked.json()["data"]
    assert first["params"]["task"] == modes.with_mask
    for item in (first, second):
        assert np.array_equal(pixels_of(item)[:, 32:], image[:, 32:])
    # Image i depends on its own seed only: the second of the pair is the next seed's image alone.
    alone = await client.post(EDIT, files=inputs, data=form(model=model, seed=second["seed"]))
    assert np.abs(pixels_of(alone.json()["data"][0]).astype(int) - pixels_of(second)).max() <= 2
    too_many = [("image[]", (f"{i}.png", png(photo(seed=i)), "image/png")) for i in range(modes.max_images + 1)]
    refused = await client.post(EDIT, files=too_many, data=form(model=model))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image"
