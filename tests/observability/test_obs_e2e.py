"""End to end: a real ``fluxserve serve`` with FLUX_STRUCTURED_LOGS=1, secrets and injected faults.

After a scripted run every line the server wrote is one JSON object, no secret or prompt appears,
each response's timing adds up, and /metrics, the logs and the responses agree on the number of
requests, images and fallbacks.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fluxserve.observability.metrics import ALIASES, STAGES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

HF_TOKEN = "hf_e2eSecretToken0123456789abcdef"
API_KEY = "sk-e2e-observability-key-9876543210"
PROMPT = "an orange submarine in a teacup, e2e-prompt-marker-2718"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BASE = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2}
# The ladder is one rung (retry after emptying the cache), so injected denoise OOMs are consumed two
# per failed request and one per recovered one: the first request runs out of rungs, the second
# recovers (and its decode, the first that runs, gets NaN: re-decoded in float32, same fallback).
# Warm-up never sees injected faults.
FAULTS = "oom@denoise:3,nan@decode:1"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, lbls), v in samples.items()
               if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()))


def _check_timing(timing: dict[str, float]) -> None:
    assert all(timing[s] >= 0 for s in STAGES), timing
    assert sum(timing[s] for s in STAGES if s != "total") <= timing["total"] + 1e-4, timing
    assert all(timing[alias] == timing[stage] for alias, stage in ALIASES.items())


def test_structured_logs_metrics_and_faults_agree(server_factory: Callable[..., Any]) -> None:
    server = server_factory({
        "FLUX_STRUCTURED_LOGS": "1", "HF_TOKEN": HF_TOKEN, "FLUX_API_KEYS": API_KEY,
        "FLUX_FAULT_INJECTION": "1", "FLUX_FAULTS": FAULTS, "FLUX_OOM_POLICY": "clear_cache",
    })
    url = server.base_url
    responses: list[httpx.Response] = []
    for probe in ("/health", "/ready"):  # what a load balancer sends (readiness itself came by NOTIFY_SOCKET)
        assert httpx.get(url + probe, timeout=30).status_code == 200
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        for body in ({**BASE, "n": 1}, {**BASE, "n": 2}, {**BASE, "n": 1}, {**BASE, "n": 2},
                     {**BASE, "size": "63x64"}):
            responses.append(client.post("/v1/images/generations", json=body))
        responses.append(httpx.post(url + "/v1/images/generations", json=BASE, timeout=10))  # no key: 401
        # streamed
        completed: list[dict[str, Any]] = []
        with client.stream("POST", "/v1/images/generations", json={**BASE, "n": 2, "stream": True}) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event["type"] == "image_generation.completed":
                        completed.append(event)
        # async job
        job = client.post("/v1/images/jobs", json=BASE).json()
        for _ in range(600):
            polled = client.get(f"/v1/images/jobs/{job['id']}").json()
            if polled["status"] in ("succeeded", "failed", "cancelled") and ("result" in polled
                                                                            or polled["status"] != "succeeded"):
                break
            time.sleep(0.05)
        assert polled["status"] == "succeeded", polled
        summary = client.get("/v1/metrics/summary").json()
        metrics = _samples(httpx.get(url + "/metrics", timeout=10).text)
    assert server.stop() == 0
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]

    # --- every line is one JSON object with the basics; no secret, no prompt -------------------------
    logs = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict)
        assert {"timestamp", "level", "logger", "message"} <= record.keys(), record
        logs.append(record)
    text = "\n".join(lines)
    assert HF_TOKEN not in text and API_KEY not in text
    assert PROMPT not in text and "e2e-prompt-marker" not in text

    # --- start-up: device with reasons, redacted settings, model load, warmup -----------------------
    def first(message: str) -> dict[str, Any]:
        return next(r for r in logs if r["message"] == message)

    device = first("device selected")
    assert device["device"] == "cpu" and device["dtype"] == "float32" and device["reasons"]
    settings = first("settings")["settings"]
    assert settings["hf_token"] == "***" and settings["api_keys"] == ["***"]
    load = first("model loaded")
    assert load["model"] == "tiny-flux" and load["seconds"] > 0 and "memory_delta_bytes" in load
    warmup = first("warmup")
    assert warmup["seconds"] > 0 and warmup["outcome"] == "ok" and warmup["size"] == "64x64"
    assert any(r["logger"].startswith("uvicorn") for r in logs)
    assert _sum(metrics, "fluxserve_model_load_seconds", model="tiny-flux") == pytest.approx(load["seconds"], abs=1e-3)
    assert _sum(metrics, "fluxserve_warmup_seconds", model="tiny-flux") == pytest.approx(warmup["seconds"], abs=1e-3)

    # --- responses ---------------------------------------------------------------------------------
    statuses = [r.status_code for r in responses]
    assert statuses[0] == 503 and responses[0].json()["error"]["code"] == "out_of_memory"
    assert statuses[1:4] == [200, 200, 200] and statuses[4:] == [400, 401]
    items = [item for r in responses if r.status_code == 200 for item in r.json()["data"]]
    items += completed + polled["result"]["data"]
    assert len(completed) == 2
    for item in items:
        _check_timing(item["timing"])
    fallback_items = [item for item in items if item["params"]["fallback_applied"]]
    assert len(fallback_items) == 2 and all(item in responses[1].json()["data"] for item in fallback_items)
    kind = fallback_items[0]["params"]["fallback_reason"].split(":")[0]
    assert kind == "cpu_oom"

    # --- requests: metrics == access log lines ------------------------------------------------------
    access = [r for r in logs if r["logger"] == "fluxserve.access"]
    logged = Counter((r["endpoint"], str(r["status"])) for r in access)
    logged[("metrics", "200")] -= 1  # the final scrape is logged after its own numbers were taken
    counted = Counter({(dict(lbls)["endpoint"], dict(lbls)["status"]): int(v) for (name, lbls), v in metrics.items()
                       if name == "fluxserve_requests_total"})
    probes = {key: n for key, n in counted.items() if key[0] in ("health", "ready")}
    assert probes and not any(r["endpoint"] in ("health", "ready") for r in access)  # counted, logged at DEBUG
    assert +logged == +Counter({key: n for key, n in counted.items() if key not in probes})
    assert counted[("generations", "200")] == 4 and counted[("generations", "503")] == 1
    assert counted[("generations", "400")] == 1 and counted[("generations", "401")] == 1
    assert counted[("jobs", "202")] == 1
    for record in access:
        assert record["request_id"] and record["duration_s"] >= 0

    # --- images: metrics == logs == responses ------------------------------------------------------
    finished = [r for r in logs if r["message"] == "generation finished"]
    succeeded = [r for r in finished if r["outcome"] == "succeeded"]
    assert len(succeeded) == 5 and len([r for r in finished if r["outcome"] == "failed"]) == 1
    images = _sum(metrics, "fluxserve_images_generated_total", model="tiny-flux")
    assert images == sum(r["images"] for r in succeeded) == len(items) == 8
    assert _sum(metrics, "fluxserve_stage_duration_seconds_count", stage="total") == len(succeeded)
    for record in succeeded:
        _check_timing(record["timings"])
        assert record["model"] == "tiny-flux" and record["params"]["width"] == 64 and record["request_id"]
        assert "prompt" not in record
    assert summary["requests"] == 5 and summary["images"] == 8 and summary["fallbacks"] == 1

    # --- fallbacks: metrics == log lines with a fallback_reason ------------------------------------
    with_reason = [r for r in logs if r.get("fallback_reason")]
    assert {r["message"] for r in with_reason} == {"generation finished"}
    assert len(with_reason) == 2  # the first request (ran out of rungs), the second (recovered)
    by_reason = Counter("failed" if r["outcome"] != "succeeded" else r["fallback_reason"].split(":")[0]
                        for r in with_reason)
    assert by_reason == {"failed": 1, kind: 1}
    counted_fallbacks = Counter({dict(lbls)["reason"]: int(v) for (name, lbls), v in metrics.items()
                                 if name == "fluxserve_oom_fallbacks_total"})
    assert +counted_fallbacks == by_reason
    failed_log = next(r for r in with_reason if r["outcome"] == "failed")
    assert failed_log["request_id"] == responses[0].headers["x-request-id"]
    assert failed_log["error"]["code"] == "out_of_memory" and failed_log["level"] == "WARNING"
