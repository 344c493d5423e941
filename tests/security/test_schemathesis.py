"""Property-based fuzzing of every operation in /openapi.json with schemathesis, in-process (ASGI).

Schema-valid (positive) and schema-invalid (negative) requests are generated for every operation.
Checked on every response: no 5xx, the status code is documented, the content type is documented,
the body matches the documented schema, and schema-invalid requests are rejected with a 4xx.

Bounded: MAX_EXAMPLES per operation and mode, no shrinking, derandomized (the same cases on every
run), no example database on disk. The live app's small limits (64..256 px, ≤ 4 steps, n ≤ 2) keep
the requests that do generate cheap. (schemathesis' own pytest loader, ``from_fixture``, does not
work with pytest 9, so its strategies are driven with Hypothesis here.)
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# Operator actions that change which models are loaded: fuzzed by their own test below, so the cases
# for everything else run against a loaded model.
UNSATISFIABLE: list[str] = []
STATUSES: defaultdict[str, list[int]] = defaultdict(list)
STATEFUL = {("POST", "/v1/models/unload"), ("POST", "/v1/memory/release"), ("POST", "/v1/models/select")}


@pytest.fixture(scope="module")
def api_schema(live_app: Any) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", live_app)
    # A schema-violating request must get a 4xx; 413 (body too large) is as good a "no" as 400.
    schema.config.checks.negative_data_rejection.expected_statuses = ["4XX"]
    return schema


def _operations(schema: Any) -> list[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [f"{op.method} {op.path}" for op in operations]
    return operations


def _fuzz(operation: Any, mode: Any) -> list[str]:
    """Run MAX_EXAMPLES cases; return the failures (all of them, not just the first)."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        try:
            response = case.call_and_validate(checks=CHECKS)
            STATUSES[f"{operation.method.upper()} {operation.path} {mode.value}"].append(response.status_code)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis groups its findings
            failures.append(f"{operation.method.upper()} {operation.path} [{mode.value}]: "
                            f"{type(exc).__name__}: {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # nothing to vary (e.g. GET /health in negative mode: no input to make invalid)
        UNSATISFIABLE.append(f"{operation.method.upper()} {operation.path} [{mode.value}]")
    return failures


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_and_never_fails(api_schema: Any, mode: str, live_client: Any) -> None:
    failures: list[str] = []
    for operation in _operations(api_schema):
        if (operation.method.upper(), operation.path) not in STATEFUL:
            failures += _fuzz(operation, schemathesis.GenerationMode(mode))
    print("no case could be generated for:", UNSATISFIABLE)
    for key, codes in sorted(STATUSES.items()):
        print(key, dict(Counter(codes)))
    assert not failures, "\n\n".join(failures[:10])
    if mode == "positive":  # the fuzzer did reach the engine, not only the validation
        assert 200 in STATUSES["POST /v1/images/generations positive"]
        assert 202 in STATUSES["POST /v1/images/jobs positive"]
    assert live_client.get("/ready").status_code == 200


def test_operator_actions_conform_and_never_fail(api_schema: Any, live_client: Any) -> None:
    failures: list[str] = []
    for operation in _operations(api_schema):
        if (operation.method.upper(), operation.path) in STATEFUL:
            for mode in schemathesis.GenerationMode:
                failures += _fuzz(operation, mode)
    assert not failures, "\n\n".join(failures[:10])
    # whatever was unloaded, the default model comes back for the next request
    again = live_client.post("/v1/images/generations", json={"prompt": "back", "size": "64x64",
                                                             "num_inference_steps": 1})
    assert again.status_code == 200, again.text[:300]


def test_responses_fuzzing_cannot_reach_conform(api_schema: Any, live_client: Any) -> None:
    """Responses that need state random inputs never create (an issued file id, a live job, a
    request_id in use, an event stream) are checked against the schema with hand-made cases."""
    gen = {"prompt": "explicit", "size": "64x64", "num_inference_steps": 1}
    url = live_client.post("/v1/images/generations", json={**gen, "response_format": "url"}).json()["data"][0]["url"]
    created = live_client.post("/v1/images/jobs", json=gen)
    assert created.status_code == 202, created.text
    job = created.json()["id"]
    for _ in range(200):  # let it finish (and its images be encoded) so GET returns the result
        if live_client.get(f"/v1/images/jobs/{job}").json()["status"] == "succeeded":
            break
        time.sleep(0.05)
    cases = [
        ("POST", "/v1/images/generations", {"body": {**gen, "stream": True, "partial_images": 1}}, 200),
        ("GET", "/v1/images/files/{name}", {"path_parameters": {"name": url.rsplit("/", 1)[1]}}, 200),
        ("GET", "/v1/images/jobs/{job_id}", {"path_parameters": {"job_id": job}}, 200),
        ("GET", "/v1/images/jobs/{job_id}/events", {"path_parameters": {"job_id": job}}, 200),
        ("DELETE", "/v1/images/jobs/{job_id}", {"path_parameters": {"job_id": job}}, 409),
        # 403 while tiny-qwen is not in FLUX_MODELS; 409 (not loaded) once the fuzzing above selected and
        # unloaded it (an admin's select enables a model)
        ("POST", "/v1/tokenize", {"body": {"prompt": "x", "model": "tiny-qwen"}}, (403, 409)),
        ("POST", "/v1/models/unload", {"body": {"model": "tiny-qwen"}}, 404),
    ]
    failures = []
    for method, path, parts, status in cases:
        operation = api_schema[path][method]
        case = operation.Case(media_type="application/json" if "body" in parts else None, **parts)
        try:
            response = case.call_and_validate(checks=CHECKS)
            wanted = status if isinstance(status, tuple) else (status,)
            assert response.status_code in wanted, (response.status_code, response.text[:300])
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{method} {path}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
