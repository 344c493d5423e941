"""JSON is bounded before it is parsed, in request bodies and in JSON held in a field (``loras`` as a
string, which is how multipart edits send it): nesting past 32 levels and bodies of more than 10 000
values are refused with a 400 naming the field, duplicate keys inside ``loras`` too. Before, a ``loras``
string nested 1000 deep raised RecursionError (500) on all four routes that take it, and a body nested a
few hundred deep or holding tens of thousands of values was parsed and generated.

In-process app with a started runtime (tiny-flux on the CPU); each refusal is checked for the OpenAI
error shape.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from .helpers import assert_openai_error

SMALL = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
ROUTES = {  # route -> (extra JSON fields, multipart files or None)
    "/v1/images/generations": ({}, None),
    "/v1/images/jobs": ({}, None),
    "/v1/images/edits": ({"image": DATA_URL, "num_inference_steps": 2}, {"image": ("in.png", PNG, "image/png")}),
    "/v1/images/edits/jobs": ({"image": DATA_URL, "num_inference_steps": 2}, {"image": ("in.png", PNG, "image/png")}),
}
CASES = [(route, form) for route, (_, files) in ROUTES.items() for form in ("json", "multipart") if files or
         form == "json"]


def _post(client: TestClient, route: str, form: str, **fields: Any) -> Any:
    extra, files = ROUTES[route]
    if form == "json":
        return client.post(route, json={**SMALL, **extra, **fields})
    text = {key: str(value) for key, value in {**SMALL, **fields}.items()}
    return client.post(route, data=text, files=files)


@pytest.mark.parametrize(("route", "form"), CASES)
def test_loras_nested_a_thousand_deep_is_a_400_naming_loras(live_client: TestClient, route: str, form: str) -> None:
    response = _post(live_client, route, form, loras="[" * 1000 + "]" * 1000)
    error = assert_openai_error(response, 400, param="loras", code="invalid_value")
    assert "nested more than 32 levels" in error["message"]


@pytest.mark.parametrize(("route", "form"), CASES)
def test_duplicate_keys_inside_a_loras_string_are_refused(live_client: TestClient, route: str, form: str) -> None:
    response = _post(live_client, route, form, loras='[{"name": "style", "scale": 0.5, "name": "other"}]')
    error = assert_openai_error(response, 400, param="loras", code="invalid_value")
    assert "duplicate key 'name'" in error["message"]


def test_a_loras_string_of_many_values_is_refused(live_client: TestClient) -> None:
    loras = json.dumps([0] * 12_000)  # 12 000 values in 24 KB, under the body limit
    error = assert_openai_error(live_client.post("/v1/images/generations", json={**SMALL, "loras": loras}), 400,
                                param="loras", code="invalid_value")
    assert "more than 10000 JSON values" in error["message"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_body_nested_past_the_bound_is_refused_naming_the_field(live_client: TestClient, route: str) -> None:
    body = json.dumps({**SMALL, **ROUTES[route][0]})[:-1] + ', "style": ' + "[" * 100 + "]" * 100 + "}"
    response = live_client.post(route, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, param="style", code="json_too_complex")
    assert "nested more than 32 levels" in error["message"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_body_of_too_many_values_is_refused(live_client: TestClient, route: str) -> None:
    body = {**SMALL, **ROUTES[route][0], "style": [0] * 20_000}  # 40 KB of body, 20 000 Python objects
    response = live_client.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, param="style", code="json_too_complex")
    assert "more than 10000 JSON values" in error["message"]


def test_bounded_json_still_serves_every_route(live_client: TestClient) -> None:
    """The bounds leave ordinary requests alone: a bracket-heavy prompt and an ignored nested field."""
    prompt = "a [red] {barn}, " * 4 + "[" * 60  # brackets inside strings do not nest anything
    for route in ROUTES:
        body = {**SMALL, **ROUTES[route][0], "prompt": prompt, "style": [[[{"a": [1, 2]}]]]}
        response = live_client.post(route, json=body)
        assert response.status_code in (200, 202), (route, response.text[:300])
    assert live_client.get("/ready").status_code == 200
