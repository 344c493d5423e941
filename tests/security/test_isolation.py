"""One client cannot hurt another, in-process: every text field passes the same rules before a job
exists, the strict-JSON check cannot be side-stepped with a second Content-Type or another charset,
each request's compute is bounded, requests name only the models the operator enabled, and made-up
model names do not grow the metric labels.

Requests the validation wrongly lets through would be generated for real on the live app (tiny-flux),
so a regression shows as a 200 (or a 500 once the answer cannot be encoded), never as a hang.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from .helpers import assert_openai_error

GEN = "/v1/images/generations"
OK = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}
JSON = {"Content-Type": "application/json"}
SURROGATE = '"\\ud800"'  # a lone surrogate, written as JSON writes it


def _body(field: str, raw_value: str) -> bytes:
    """OK with ``field`` set to the JSON text ``raw_value`` (spliced verbatim: json.dumps would not)."""
    base = json.dumps({k: v for k, v in OK.items() if k != field})
    return (base[:-1] + f', "{field}": {raw_value}' + "}").encode()


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "user", "request_id", "model", "size",
                                   "response_format", "quality"])
@pytest.mark.parametrize("value", [SURROGATE, '"a\\u0000b"'], ids=["lone surrogate", "NUL"])
def test_every_text_field_refuses_surrogates_and_nul_naming_the_field(live_client: Any, field: str,
                                                                     value: str) -> None:
    response = live_client.post(GEN, content=_body(field, value), headers=JSON)
    assert_openai_error(response, 400, param=field)


def test_a_lone_surrogate_in_negative_prompt_is_refused_before_a_job_exists(live_client: Any) -> None:
    """The finding: it used to be generated, then fail JSON encoding (500) and every poll of the job."""
    for path in (GEN, "/v1/images/jobs"):
        response = live_client.post(path, content=_body("negative_prompt", SURROGATE), headers=JSON)
        error = assert_openai_error(response, 400, param="negative_prompt")
        assert "surrogate" in error["message"]
    assert live_client.get("/ready").status_code == 200


@pytest.mark.parametrize("raw", [
    '"style": {"nested": ["\\ud800"]}',          # inside an ignored OpenAI field
    '"newer_field": "\\udfff"',                   # the value of an unknown field
    '"\\ud800": 1',                               # the name of an unknown field (echoed in ignored_fields)
    '"x_list": ["ok", "\\u0000"]',
])
def test_text_rules_reach_ignored_and_unknown_fields(live_client: Any, raw: str) -> None:
    body = (json.dumps(OK)[:-1] + ", " + raw + "}").encode()
    assert_openai_error(live_client.post(GEN, content=body, headers=JSON), 400)


def test_other_routes_apply_the_same_text_rules(live_client: Any) -> None:
    for path, field in (("/v1/tokenize", "prompt"), ("/v1/models/select", "model"),
                        ("/v1/images/cancel", "request_id")):
        response = live_client.post(path, content=('{"' + field + '": ' + SURROGATE + "}").encode(), headers=JSON)
        assert_openai_error(response, 400, param=field)


# --- Content-Type: one header, UTF-8 only -------------------------------------------------------------
def test_two_content_type_headers_are_refused(live_client: Any) -> None:
    """The finding: application/json then text/plain skipped the strict check (NaN, duplicate keys)."""
    body = b'{"prompt": "x", "prompt": "y", "guidance_scale": NaN, "size": "64x64"}'
    for first, second in ((b"application/json", b"text/plain"), (b"text/plain", b"application/json"),
                          (b"application/json", b"application/json")):
        response = live_client.post(GEN, content=body, headers=[("content-type", first), ("content-type", second)])
        error = assert_openai_error(response, 400, code="invalid_content_type")
        assert "Content-Type" in error["message"]


@pytest.mark.parametrize("charset", ["utf-16", "UTF-16LE", "latin-1", "utf-32"])
def test_a_charset_other_than_utf8_is_refused(live_client: Any, charset: str) -> None:
    body = json.dumps(OK).encode(charset.lower().replace("latin-1", "latin-1"))
    response = live_client.post(GEN, content=body, headers={"Content-Type": f"application/json; charset={charset}"})
    assert_openai_error(response, 400, code="invalid_content_type")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_bodies_are_refused_without_a_charset(live_client: Any, encoding: str) -> None:
    response = live_client.post(GEN, content=json.dumps(OK).encode(encoding), headers=JSON)
    error = assert_openai_error(response, 400, code="invalid_json")
    assert "UTF-8" in error["message"]


def test_utf8_with_an_explicit_charset_still_works(live_client: Any) -> None:
    for charset in ("utf-8", "UTF-8", '"utf-8"', "utf8"):
        response = live_client.post(GEN, content=json.dumps(OK).encode(),
                                    headers={"Content-Type": f"application/json; charset={charset}"})
        assert response.status_code == 200, (charset, response.text[:300])


# --- compute budget --------------------------------------------------------------------------------------
def test_compute_budget_names_the_budget_and_the_param(bare_client: Callable[..., Any]) -> None:
    """A cost over FLUX_MAX_MEGAPIXEL_STEPS is a 400 before a job exists, naming what weighs most (tiny-flux's
    defaults: 128×128, 4 steps, 256 text tokens; costs in megapixel-steps as transformer + VAE)."""
    with bare_client(max_megapixel_steps=1.0, max_size=1024, max_pixels=1024 * 1024, max_images_per_request=64) \
            as client:
        cases = [({"n": 2, "size": "256x256", "num_inference_steps": 50}, "num_inference_steps"),  # 12.5 + 0.8
                 ({"n": 2, "size": "512x512"}, "size"),                                             # 2.5 + 3.1
                 ({"size": None, "width": 1024, "height": 256}, "width"),                           # 1.25 + 1.6
                 ({"n": 16}, "n")]                                                                  # 5 + 1.6
        for fields, param in cases:
            response = client.post(GEN, json={"prompt": "x", **fields})
            error = assert_openai_error(response, 400, param=param, code="compute_budget_exceeded")
            assert "FLUX_MAX_MEGAPIXEL_STEPS" in error["message"] and "megapixel-steps" in error["message"]


def test_a_request_within_the_compute_budget_runs(live_client: Any) -> None:
    assert live_client.post(GEN, json={**OK, "n": 2}).status_code == 200  # default budget: far above this


# --- models: only those the operator enabled -----------------------------------------------------------
def test_requests_name_only_enabled_models(bare_client: Callable[..., Any]) -> None:
    with bare_client() as client:  # FLUX_MODEL=tiny-flux, FLUX_MODELS empty
        for name in ("qwen", "tiny-qwen", "schnell", "black-forest-labs/FLUX.1-dev"):
            response = client.post(GEN, json={**OK, "model": name})
            error = assert_openai_error(response, 403, param="model", code="model_not_allowed")
            assert "FLUX_MODELS" in error["message"] and "tiny-flux" in error["message"]
        for name in ("made-up-model", "someone/some-repo", "/etc", "../../x"):
            assert_openai_error(client.post(GEN, json={**OK, "model": name}), 404, param="model",
                                code="model_not_found")
        cards = {m["id"]: m for m in client.get("/v1/models?all=true").json()["data"]}
        assert cards["tiny-flux"]["allowed"] and not cards["qwen"]["allowed"]


def test_flux_models_enables_models_loaded_on_first_use(bare_client: Callable[..., Any]) -> None:
    with bare_client(models=["tiny-qwen"]) as client:
        runtime = client.fastapi_app.state.runtime
        assert runtime.resolve("tiny-qwen").key == "tiny-qwen"  # allowed, and not preloaded
        assert runtime.scheduler.is_loaded("tiny-qwen") is False
        assert_openai_error(client.post(GEN, json={**OK, "model": "qwen"}), 403, code="model_not_allowed")


def test_made_up_model_names_do_not_grow_metric_labels(live_client: Any) -> None:
    for i in range(30):
        live_client.post(GEN, json={**OK, "model": f"made-up-{i}"})
    metrics = live_client.get("/metrics").text
    assert "made-up-" not in metrics
    labels = {line.split('model="', 1)[1].split('"', 1)[0] for line in metrics.splitlines()
              if line.startswith("fluxserve_requests_total{") and 'model="' in line}
    assert labels <= {"", "tiny-flux", "other"}, labels


def test_metric_labels_of_local_directories_carry_no_path() -> None:
    from fluxserve.observability.metrics import Metrics

    class Spec:
        key, source = "/srv/models/my-flux", "/srv/models/my-flux"

    metrics = Metrics()
    metrics.allow_models([Spec()])
    assert metrics.model_label("/srv/models/my-flux") == "local/my-flux"
    assert metrics.model_label("anything-else") == "other" and metrics.model_label(None) == ""


def test_model_errors_do_not_tell_whether_a_directory_exists(bare_client: Callable[..., Any], tmp_path: Any) -> None:
    present = tmp_path / "present"
    present.mkdir()  # a directory, but no diffusers pipeline in it
    absent = tmp_path / "absent"
    with bare_client(allow_any_model=True) as client:
        answers = [client.post(GEN, json={**OK, "model": str(path)}) for path in (present, absent)]
        messages = [assert_openai_error(a, 404, param="model", code="model_not_found")["message"] for a in answers]
        assert messages[0].replace("present", "X") == messages[1].replace("absent", "X")
        assert "model_index" not in messages[0] and "directory but" not in messages[0]


async def test_a_model_of_flux_models_loads_on_first_use(app_factory: Callable[..., Any]) -> None:
    async with app_factory(models=["tiny-qwen"]) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert not runtime.scheduler.is_loaded("tiny-qwen")  # enabled, not preloaded
        response = await client.post(GEN, json={**OK, "model": "tiny-qwen"})
        assert response.status_code == 200, response.text[:300]
        assert response.json()["data"][0]["model_key"] == "tiny-qwen" and runtime.scheduler.is_loaded("tiny-qwen")
        refused = await client.post(GEN, json={**OK, "model": "qwen"})  # still only what is enabled
        assert refused.status_code == 403
