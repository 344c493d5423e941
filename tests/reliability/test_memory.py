"""Finished jobs stay listed for FLUX_JOB_TTL (an hour by default); what they keep must be small, or
memory grows with every request for an hour (at 1024² a job's pixels and base64 are ~7 MB)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

GEN = "/v1/images/generations"
BODY = {"prompt": "memory", "size": "128x128", "num_inference_steps": 1}


async def test_answered_jobs_keep_neither_pixels_nor_images(app_factory: Callable[..., Any]) -> None:
    async with app_factory(store_local=False) as client:
        plain = await client.post(GEN, json={**BODY, "request_id": "plain-1"})
        assert plain.status_code == 200
        streamed = await client.post(GEN, json={**BODY, "stream": True, "request_id": "stream-1"})
        assert "image_generation.completed" in streamed.text
        queued = await client.post("/v1/images/jobs", json={**BODY, "request_id": "async-1"})
        assert queued.status_code == 202
        for _ in range(400):
            polled = (await client.get("/v1/images/jobs/async-1")).json()
            if polled["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        assert polled["status"] == "succeeded" and polled["result"]["data"][0]["b64_json"]  # async: still pollable

        scheduler = client.app.state.runtime.scheduler  # type: ignore[attr-defined]
        for job_id in ("plain-1", "stream-1", "async-1"):
            job = scheduler.get(job_id)
            assert job is not None and job.status.value == "succeeded"
            assert job.result is not None and job.result.images == [], job_id  # pixels dropped once encoded
        assert scheduler.get("plain-1").payload is None and scheduler.get("stream-1").payload is None
        # the answered synchronous job still reads as finished, not as "running"
        assert (await client.get("/v1/images/jobs/plain-1")).json()["status"] == "succeeded"
