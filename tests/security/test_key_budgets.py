"""One key's traffic cannot expire another key's stored results or ``url`` files before their TTL while
that key stays within its own budget (FLUX_RESULTS_MAX_BYTES_PER_KEY, FLUX_FILES_MAX_BYTES_PER_KEY).

A real server on tiny-flux with two API keys: key A keeps a few results and one ``url`` file, well within
its budgets; key B then stores many times the global budgets. A's file still downloads and every one of
A's results still polls; B's own oldest are the ones gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai

KEY_A = "sk-key-a-0123456789abcdefgh"
KEY_B = "sk-key-b-0123456789abcdefgh"
SMALL = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}
BUDGETS = {"FLUX_API_KEYS": f"{KEY_A},{KEY_B}", "FLUX_RESULTS_MAX_BYTES": "300000",
           "FLUX_RESULTS_MAX_BYTES_PER_KEY": "150000", "FLUX_FILES_MAX_BYTES": "200000",
           "FLUX_FILES_MAX_BYTES_PER_KEY": "100000", "FLUX_MAX_QUEUED_PER_KEY": "0"}


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _stored_job(base: str, key: str, seed: int) -> str:
    """Queue an async job, follow its events to the end, then read it back once its result is stored."""
    response = httpx.post(f"{base}/v1/images/jobs", json={**SMALL, "n": 4 if key == KEY_B else 1, "seed": seed},
                          headers=_headers(key), timeout=120)
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    with httpx.stream("GET", f"{base}/v1/images/jobs/{job_id}/events", headers=_headers(key), timeout=120) as events:
        ended = next(json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")
                     and json.loads(line[6:]).get("type") in ("succeeded", "failed", "cancelled"))
    assert ended["type"] == "succeeded", ended
    for _ in range(1000):  # the result is encoded right after the job ends; each read is a round trip
        polled = httpx.get(f"{base}/v1/images/jobs/{job_id}", headers=_headers(key), timeout=120)
        if polled.status_code != 200 or polled.json().get("result") is not None:
            break
    return job_id


def _poll_status(base: str, key: str, job_id: str) -> int:
    return httpx.get(f"{base}/v1/images/jobs/{job_id}", headers=_headers(key), timeout=120).status_code


def test_a_flooding_key_expires_only_its_own_results_and_files(server_factory: Callable[..., Any]) -> None:
    server = server_factory(BUDGETS)
    base = server.base_url
    client_a = openai.OpenAI(api_key=KEY_A, base_url=base + "/v1", max_retries=0)
    client_b = openai.OpenAI(api_key=KEY_B, base_url=base + "/v1", max_retries=0)

    # 1. Key A: one url image and three stored results, far within its budgets.
    a_images = client_a.images.generate(model="tiny-flux", prompt="a lighthouse", size="64x64",
                                        response_format="url", extra_body={"num_inference_steps": 1}).data
    assert a_images is not None
    a_url = a_images[0].url
    assert a_url is not None and httpx.get(a_url, headers=_headers(KEY_A), timeout=60).status_code == 200
    a_jobs = [_stored_job(base, KEY_A, seed) for seed in range(3)]
    assert [_poll_status(base, KEY_A, job_id) for job_id in a_jobs] == [200] * 3

    # 2. Key B floods: many times both global budgets in url images and stored results.
    b_urls = []
    for _ in range(12):
        flood = client_b.images.generate(model="tiny-flux", prompt="flood", size="64x64", n=4,
                                         response_format="url", extra_body={"num_inference_steps": 1}).data
        assert flood is not None
        b_urls += [item.url for item in flood]
    b_jobs = [_stored_job(base, KEY_B, seed) for seed in range(12)]

    # 3. A's file and results are all still there (their TTL is an hour); B lost its own oldest.
    assert httpx.get(a_url, headers=_headers(KEY_A), timeout=60).status_code == 200
    assert [_poll_status(base, KEY_A, job_id) for job_id in a_jobs] == [200] * 3
    assert httpx.get(str(b_urls[0]), headers=_headers(KEY_B), timeout=60).status_code == 404
    assert httpx.get(str(b_urls[-1]), headers=_headers(KEY_B), timeout=60).status_code == 200
    assert _poll_status(base, KEY_B, b_jobs[0]) == 410 and _poll_status(base, KEY_B, b_jobs[-1]) == 200
