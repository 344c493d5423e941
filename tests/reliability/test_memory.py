"""Finished jobs stay listed for FLUX_JOB_TTL (an hour by default); what they keep must be small, or
memory grows with every request for an hour (at 1024² a job's pixels and base64 are ~7 MB)."""

from __future__ import annotations

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
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        table = runtime.scheduler.table
        job = table.get(queued.json()["id"], None)
        await job.done()
        for task in list(client.app.state.images._background):  # type: ignore[attr-defined]
            await task  # the async job's images are encoded and stored right after it ends
        polled = (await client.get(f"/v1/images/jobs/{job.id}")).json()
        assert polled["status"] == "succeeded" and polled["result"]["data"][0]["b64_json"]  # async: still pollable
        assert job.result is not None and job.result.images == []  # pixels dropped once encoded
        # The answered synchronous and streamed jobs left the table at once: nothing of them is kept but a
        # small status record (no prompt, no pixels, no images).
        assert len(table) == 1 and table.result_bytes > 0
        plain_id = plain.json()["data"][0]["job_id"]
        assert table.get(plain_id, None) is None
        record = await client.get(f"/v1/images/jobs/{plain_id}")
        assert record.json()["status"] == "succeeded" and "result" not in record.json()
        assert "memory" not in record.text  # the prompt is not kept
