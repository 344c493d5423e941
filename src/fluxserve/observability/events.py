"""Log lines and metrics for generation jobs that end without images (failed or cancelled).

Succeeded jobs are logged by the serving layer once their images are encoded (``generation finished``,
``outcome: succeeded``); this module writes the same message for the other outcomes, from the
scheduler's hook, so that every job ends in exactly one ``generation finished`` line whatever the
endpoint (plain, streamed or async) and whether or not a client is still waiting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fluxserve.observability.metrics import Metrics

if TYPE_CHECKING:
    from fluxserve.scheduler.jobs import Job

log = logging.getLogger("fluxserve.generation")

_OOM_PREFIX = "out of memory: "


def job_ended(metrics: Metrics, job: Job, *, log_prompts: bool = False) -> None:
    """Log and count a job that failed or was cancelled (the hook's ``job_failed``/``job_cancelled``)."""
    outcome = str(getattr(job.status, "value", job.status))
    ctx: dict[str, Any] = {
        "request_id": job.metadata.get("trace_id", job.id), "job_id": job.id, "model": job.spec.key,
        "outcome": outcome, "params": dict(job.params.__dict__),
        "images": 0, "batch_size": job.batch_size, "device": job.device,
        "timings": {"queue_wait": round(job.queue_wait, 6)},
    }
    error = job.error
    if error is not None:
        ctx["error"] = {"code": error.code, "status": error.status, "message": error.message}
    if outcome == "cancelled":
        metrics.cancelled.inc()
    elif error is not None and error.code == "out_of_memory":
        reason = error.message.removeprefix(_OOM_PREFIX)
        ctx["fallback_reason"] = reason
        metrics.record_fallback(reason, failed=True)
    if log_prompts:
        ctx["prompt"] = job.prompt
    level = logging.WARNING if outcome in ("failed", "expired") else logging.INFO
    log.log(level, "generation finished", extra={"ctx": ctx})
