"""A job that ends without images writes one ``generation finished`` line and its counters, also a durable job
cancelled while it still waited in the job store (no scheduler ever held it, so no hook reports it)."""

from __future__ import annotations

import logging

import pytest

from fluxserve.observability.events import stored_job_cancelled
from fluxserve.observability.metrics import Metrics
from fluxserve.storage.jobstore.protocol import JobRecord, JobState


def _record() -> JobRecord:
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 7,
            "webhook_url": "https://hooks.example/t0ken", "user": "someone"}
    return JobRecord(id="img_1", seq=1, owner=None, model="tiny-flux", state=JobState.CANCELLED,
                     request={"kind": "generation", "body": body, "inputs": 0}, seeds=(7,), request_id="client-9",
                     webhook_url=None, attempts=0, created_at=100.0, updated_at=102.5, started_at=None,
                     finished_at=102.5, worker=None, lease_until=None, cancel_requested=True, timings={},
                     error=None, results=(), result_meta=None, result_bytes=0, result_expired=False)


@pytest.mark.parametrize("log_prompts", [False, True])
def test_a_job_cancelled_in_the_store_is_logged_and_counted_once(caplog: pytest.LogCaptureFixture,
                                                                 log_prompts: bool) -> None:
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="fluxserve.generation")
    stored_job_cancelled(metrics, _record(), log_prompts=log_prompts)
    lines = [r for r in caplog.records if r.getMessage() == "generation finished"]
    assert len(lines) == 1
    ctx = lines[0].ctx  # type: ignore[attr-defined]
    assert ctx["outcome"] == "cancelled" and ctx["job_id"] == "img_1" and ctx["request_id"] == "client-9"
    assert ctx["images"] == 0 and ctx["timings"]["queue_wait"] == 2.5
    assert ctx["params"] == {"size": "64x64", "num_inference_steps": 2, "seed": 7}  # no prompt, URL or user
    assert ("prompt" in ctx) is log_prompts and ctx.get("prompt", "a red fox") == "a red fox"
    assert metrics.cancelled._value.get() == 1
