"""In-process app: /metrics moves as requests run, timings add up, logs agree with metrics.

Scrapes go through prometheus_client's own text parser, before and after each scripted step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fluxserve.observability.metrics import ALIASES, STAGES

pytestmark = pytest.mark.timeout(120)

PROMPT = "a lighthouse made of violet glass, observability-marker-3141"
BASE = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2}
EPS = 1e-5  # each timing value is rounded to 1 µs


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from GET /metrics, parsed by prometheus_client."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def check_timing(timing: dict[str, float]) -> None:
    """Every stage is there, none negative, the stages add up to at most the total, aliases agree."""
    for stage in STAGES:
        assert stage in timing, stage
        assert timing[stage] >= 0, (stage, timing)
    parts = sum(timing[s] for s in STAGES if s != "total")
    assert parts <= timing["total"] + 8 * EPS, timing
    for alias, stage in ALIASES.items():
        assert timing[alias] == timing[stage]
    assert timing["generation"] == pytest.approx(timing["text_encode"] + timing["denoise"] + timing["vae_decode"],
                                                 abs=4 * EPS)


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [dict(r.ctx, _level=r.levelname) for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == message and isinstance(getattr(r, "ctx", None), dict)]


async def test_metrics_move_with_requests(app_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with app_factory() as client:
        before = await scrape(client)
        # start-up filled the load and warmup gauges
        assert value(before, "fluxserve_model_load_seconds", model="tiny-flux") > 0
        assert value(before, "fluxserve_warmup_seconds", model="tiny-flux") > 0
        assert value(before, "fluxserve_device_memory_bytes", device="cpu", kind="process_rss") > 0
        assert value(before, "fluxserve_queue_depth") == 0 and value(before, "fluxserve_jobs_in_flight") == 0

        ok = await client.post("/v1/images/generations", json={**BASE, "n": 2})
        assert ok.status_code == 200, ok.text
        bad = await client.post("/v1/images/generations", json={**BASE, "size": "65x64"})
        assert bad.status_code == 400
        after = await scrape(client)

        req = "fluxserve_requests_total"
        assert delta(before, after, req, endpoint="generations", status="200", model="tiny-flux") == 1
        assert delta(before, after, req, endpoint="generations", status="400", model="") == 1
        assert delta(before, after, req, endpoint="metrics", status="200", model="") == 1  # the first scrape
        assert delta(before, after, "fluxserve_request_duration_seconds_count", endpoint="generations") == 2
        assert delta(before, after, "fluxserve_request_duration_seconds_sum", endpoint="generations") > 0
        assert delta(before, after, "fluxserve_request_duration_seconds_bucket", endpoint="generations",
                     le="+Inf") == 2
        for stage in STAGES:
            assert delta(before, after, "fluxserve_stage_duration_seconds_count", stage=stage) == 1, stage
            assert delta(before, after, "fluxserve_stage_duration_seconds_bucket", stage=stage, le="+Inf") == 1
        for alias in ("generation", *ALIASES):  # aliases are response fields, never stages
            assert value(after, "fluxserve_stage_duration_seconds_count", stage=alias) == 0
        assert delta(before, after, "fluxserve_stage_duration_seconds_sum", stage="denoise") > 0
        assert delta(before, after, "fluxserve_images_generated_total", model="tiny-flux", task="generate") == 2
        assert delta(before, after, "fluxserve_batch_size_count") == 1
        assert delta(before, after, "fluxserve_batch_size_sum") == 2
        assert not any(k[0] == "fluxserve_oom_fallbacks_total" for k in after)

        items = ok.json()["data"]
        assert len(items) == 2
        for item in items:
            check_timing(item["timing"])
            assert item["params"]["fallback_applied"] is False
        timing = items[0]["timing"]
        # the histogram's total observation is the first image's total (one observation per request)
        assert delta(before, after, "fluxserve_stage_duration_seconds_sum", stage="total") == \
            pytest.approx(timing["total"], abs=EPS)

        summary = (await client.get("/v1/metrics/summary")).json()
        assert summary["window"] >= 1 and summary["images"] >= 2
        assert summary["images_per_second"] > 0
        assert set(summary["stages"]) == set(STAGES)
        for stats in summary["stages"].values():
            assert stats["p50"] <= stats["p95"] <= stats["max"]
        assert summary["queue"]["queue_depth"] == 0

    finished = [r for r in records(caplog, "generation finished") if r["request_id"] == ok.headers["x-request-id"]]
    assert len(finished) == 1
    log = finished[0]
    assert log["outcome"] == "succeeded" and log["model"] == "tiny-flux" and log["images"] == 2
    assert log["params"]["width"] == 64 and log["params"]["steps"] == 2
    assert log["timings"] == timing
    assert "fallback_reason" not in log and "prompt" not in log
    access = [r for r in records(caplog, "request") if r["request_id"] == ok.headers["x-request-id"]]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["model"] == "tiny-flux"
    assert access[0]["endpoint"] == "generations"
    assert PROMPT not in caplog.text  # FLUX_LOG_PROMPTS is off
    assert any(r["outcome"] == "ok" and r["seconds"] > 0 for r in records(caplog, "warmup"))
    loads = records(caplog, "model loaded")
    assert loads and loads[0]["seconds"] > 0 and "memory_delta_bytes" in loads[0]


async def test_faults_timings_cancel_and_prompt_logging(app_factory: Callable[..., Any],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Load-time attribution, the OOM/NaN ladder seen in responses, metrics and logs, cancellation."""
    caplog.set_level(logging.INFO)
    # A one-rung ladder (retry after emptying the cache): 1 injected OOM recovers, 2 run out of rungs.
    async with app_factory(ready=False, warmup_enable=False, fault_injection=True, log_prompts=True,
                           oom_policy=["clear_cache"]) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        # Sent while the model loads: the wait for the load is model_load, not queue_wait.
        first = await client.post("/v1/images/generations", json=BASE)
        assert first.status_code == 200, first.text
        timing = first.json()["data"][0]["timing"]
        check_timing(timing)
        load_seconds = runtime.model_info("tiny-flux")["cpu"].load_seconds
        assert 0 < timing["model_load"] <= load_seconds + EPS
        assert timing["model_load"] == timing["pipeline_load"]

        before = await scrape(client)
        faults = runtime.engines[0].faults
        faults.arm("oom@denoise:1")
        recovered = await client.post("/v1/images/generations", json={**BASE, "n": 2})
        faults.arm("nan@decode:1")
        nan = await client.post("/v1/images/generations", json=BASE)
        faults.arm("oom@denoise:2")
        failed = await client.post("/v1/images/generations", json=BASE)
        faults.arm("error@encode:1")
        broken = await client.post("/v1/images/generations", json=BASE)
        after = await scrape(client)

        assert recovered.status_code == 200 and nan.status_code == 200
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "out_of_memory"
        assert broken.status_code == 500
        for item in recovered.json()["data"]:
            check_timing(item["timing"])
            assert item["params"]["fallback_applied"] is True
            assert item["params"]["fallback_reason"].startswith("cpu_oom: ")
        nan_params = nan.json()["data"][0]["params"]
        assert nan_params["fallback_applied"] and nan_params["fallback_reason"].startswith("nan_output: ")

        fb = "fluxserve_oom_fallbacks_total"
        assert delta(before, after, fb, reason="cpu_oom") == 1  # one per request, not per image
        assert delta(before, after, fb, reason="nan_output") == 1
        assert delta(before, after, fb, reason="failed") == 1
        assert delta(before, after, "fluxserve_images_generated_total", model="tiny-flux", task="generate") == 3
        req = "fluxserve_requests_total"
        assert delta(before, after, req, endpoint="generations", status="200", model="tiny-flux") == 2
        assert delta(before, after, req, endpoint="generations", status="503", model="tiny-flux") == 1
        assert delta(before, after, req, endpoint="generations", status="500", model="tiny-flux") == 1
        assert delta(before, after, "fluxserve_stage_duration_seconds_count", stage="total") == 2

        # Cancel a job while it waits behind a longer one (different steps: never batched together).
        before = await scrape(client)
        long_job = await client.post("/v1/images/jobs", json={**BASE, "num_inference_steps": 12})
        queued = await client.post("/v1/images/jobs", json=BASE)
        assert long_job.status_code == queued.status_code == 202
        cancelled = await client.delete(f"/v1/images/jobs/{queued.json()['id']}")
        assert cancelled.json()["status"] == "cancelled"
        async with client.stream("GET", f"/v1/images/jobs/{long_job.json()['id']}/events") as events:
            async for _ in events.aiter_lines():  # until the job has ended
                pass
        done = (await client.get(f"/v1/images/jobs/{long_job.json()['id']}")).json()
        assert done["status"] == "succeeded"
        check_timing(done["result"]["data"][0]["timing"])
        after = await scrape(client)
        assert delta(before, after, "fluxserve_cancelled_total") == 1
        assert delta(before, after, "fluxserve_images_generated_total", model="tiny-flux", task="generate") == 1
        assert delta(before, after, req, endpoint="jobs", status="202", model="tiny-flux") == 2

    by_id = {r["request_id"]: r for r in records(caplog, "generation finished")}
    by_id.update({r["job_id"]: r for r in records(caplog, "generation finished")})  # async jobs by their id
    assert by_id[recovered.headers["x-request-id"]]["fallback_reason"].startswith("cpu_oom: ")
    assert by_id[recovered.headers["x-request-id"]]["images"] == 2
    assert by_id[nan.headers["x-request-id"]]["fallback_reason"].startswith("nan_output: ")
    fail_log = by_id[failed.headers["x-request-id"]]
    assert fail_log["outcome"] == "failed" and fail_log["_level"] == "WARNING"
    assert fail_log["error"]["code"] == "out_of_memory" and fail_log["images"] == 0
    assert fail_log["fallback_reason"].startswith("cpu_oom: ")
    assert by_id[broken.headers["x-request-id"]]["outcome"] == "failed"
    assert "fallback_reason" not in by_id[broken.headers["x-request-id"]]
    assert by_id[queued.json()["id"]]["outcome"] == "cancelled"
    assert by_id[long_job.json()["id"]]["outcome"] == "succeeded"
    assert all(r["prompt"] == PROMPT for r in by_id.values())  # FLUX_LOG_PROMPTS=1 logs them
