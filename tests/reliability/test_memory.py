"""Finished jobs stay listed for FLUX_JOB_TTL (an hour by default); what they keep must be small, or
memory grows with every request for an hour (at 1024² a job's pixels and base64 are ~7 MB)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

GEN = "/v1/images/generations"
BODY = {"prompt": "memory", "size": "128x128", "num_inference_steps": 1}


@pytest.mark.parametrize("job_store", ["sqlite", "memory"])
async def test_answered_jobs_keep_neither_pixels_nor_images(app_factory: Callable[..., Any], job_store: str) -> None:
    async with app_factory(store_local=False, job_store=job_store) as client:
        plain = await client.post(GEN, json={**BODY, "request_id": "plain-1"})
        assert plain.status_code == 200
        streamed = await client.post(GEN, json={**BODY, "stream": True, "request_id": "stream-1"})
        assert "image_generation.completed" in streamed.text
        queued = await client.post("/v1/images/jobs", json={**BODY, "request_id": "async-1"})
        assert queued.status_code == 202
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        table = runtime.scheduler.table
        job_id = queued.json()["id"]
        async with client.stream("GET", f"/v1/images/jobs/{job_id}/events") as events:
            async for _ in events.aiter_lines():  # until the job has ended
                pass
        for task in list(client.app.state.images._background):  # type: ignore[attr-defined]
            await task  # in memory, the async job's images are encoded and stored right after it ends
        polled = (await client.get(f"/v1/images/jobs/{job_id}")).json()
        assert polled["status"] == "succeeded" and polled["result"]["data"][0]["b64_json"]  # async: still pollable
        if job_store == "memory":  # the job stays in the table with its encoded images, its pixels dropped
            job = table.get(job_id, None)
            assert job.result is not None and job.result.images == []
            assert len(table) == 1 and table.result_bytes > 0
        else:  # the images live in the result store; the process keeps nothing of the job
            assert len(table) == 0 and table.result_bytes == 0
        # The answered synchronous and streamed jobs left the table at once: nothing of them is kept but a
        # small status record (no prompt, no pixels, no images).
        plain_id = plain.json()["data"][0]["job_id"]
        assert table.get(plain_id, None) is None
        record = await client.get(f"/v1/images/jobs/{plain_id}")
        assert record.json()["status"] == "succeeded" and "result" not in record.json()
        assert "memory" not in record.text  # the prompt is not kept
