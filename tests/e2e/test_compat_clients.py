"""Clients people already use, against a real `fluxserve serve` (the package's shared ``live`` server,
tests/e2e/conftest.py): the official openai SDK with OpenAI's own model names, HEAD probes, and a streamed
request the client hangs up on."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def test_openai_sdk_with_openai_model_names(live: ServerProcess) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    b64 = client.images.generate(model="gpt-image-1", prompt="a red fox", size="64x64", n=2)
    assert len(b64.data) == 2 and all(d.b64_json and not d.url for d in b64.data)
    extras = [d.model_extra or {} for d in b64.data]
    assert [e["model"] for e in extras] == ["tiny-flux", "tiny-flux"]
    assert extras[1]["seed"] == extras[0]["seed"] + 1 and extras[1]["seed"] < 2**53

    url = client.images.generate(model="dall-e-3", prompt="a red fox", size="64x64")  # OpenAI's rule: a url
    assert url.data[0].url and url.data[0].b64_json is None
    assert httpx.get(url.data[0].url).content[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1", prompt="a", size="64x64", background="transparent")
    assert refused.value.body["param"] == "background"  # type: ignore[index]
    opaque = client.images.generate(model="gpt-image-1", prompt="a", size="64x64", background="opaque")
    assert opaque.background == "opaque" and base64.b64decode(opaque.data[0].b64_json or "")


def test_head_probes(live: ServerProcess) -> None:
    for path in ("/health", "/ready", "/metrics", "/v1/models"):
        head = httpx.head(live.base_url + path, timeout=30)
        assert head.status_code == 200 and head.content == b"", path
        assert int(head.headers["content-length"]) > 0, path


def _requests_total(live: ServerProcess) -> dict[str, float]:
    """fluxserve_requests_total of the generations endpoint by status, plus "cancelled": jobs cancelled."""
    text = httpx.get(live.base_url + "/metrics", timeout=30).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    counts = {s.labels["status"]: s.value for s in samples
              if s.name == "fluxserve_requests_total" and s.labels.get("endpoint") == "generations"}
    counts["cancelled"] = sum(s.value for s in samples if s.name == "fluxserve_cancelled_total")
    return counts


def _access_record(line: str) -> dict[str, Any] | None:
    """The access-log record of a generations request in this server log line, if it is one."""
    if not line.startswith("{"):
        return None
    record: dict[str, Any] = json.loads(line)
    is_access = record.get("logger") == "fluxserve.access" and record.get("endpoint") == "generations"
    return record if is_access else None


def _job_cancelled_record(line: str) -> bool:
    """The record a job's end writes right after counting it (``fluxserve_cancelled_total``)."""
    record = json.loads(line) if line.startswith("{") else {}
    return bool(record.get("message") == "generation finished" and record.get("outcome") == "cancelled")


def test_cancelled_stream_is_counted_and_logged_as_cancelled(live: ServerProcess) -> None:
    for probe in ("/health", "/ready"):  # probes are logged at DEBUG only (checked below)
        assert httpx.get(live.base_url + probe, timeout=30).status_code == 200
    before = _requests_total(live)
    mark = live.log_mark()
    body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 400, "stream": True, "stream_progress": True}
    with httpx.stream("POST", live.base_url + "/v1/images/generations", json=body, timeout=60) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("status") == "running":
                break  # the job runs: hang up
    # The server counts the request, then writes its access record, and counts the cancelled job, then logs its
    # end: once both records are there, so are both counts.
    access = _access_record(live.wait_for_log(lambda line: _access_record(line) is not None, since=mark))
    assert access is not None and access["status"] == 499
    live.wait_for_log(_job_cancelled_record, since=mark)
    after = _requests_total(live)
    assert after.get("499", 0) == before.get("499", 0) + 1
    assert after.get("200", 0) == before.get("200", 0)  # not counted as served
    assert after["cancelled"] == before["cancelled"] + 1  # and its job was cancelled
    records = [json.loads(line) for line in live.logs().splitlines() if line.startswith("{")]
    assert not any(r.get("endpoint") in ("health", "ready") for r in records)  # probes: DEBUG only
