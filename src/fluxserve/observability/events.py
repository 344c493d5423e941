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
    from fluxserve.storage.jobstore.protocol import JobRecord

log = logging.getLogger("fluxserve.generation")

_OOM_PREFIX = "out of memory: "
_NOT_PARAMS = frozenset({"prompt", "negative_prompt", "webhook_url", "user"})
"""Request fields a stored job's log line leaves out of ``params``: prompts (only with FLUX_LOG_PROMPTS) and what
may carry a secret or a person (a webhook URL's token, the client's user label)."""


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


def stored_job_cancelled(metrics: Metrics, record: JobRecord, *, log_prompts: bool = False) -> None:
    """Log and count a durable job cancelled while it waited in the job store: no scheduler ever held it, so
    no hook reports it (its ``generation finished`` line and ``fluxserve_cancelled_total``)."""
    metrics.cancelled.inc()
    body = record.request.get("body")
    request: dict[str, Any] = body if isinstance(body, dict) else {}
    ctx: dict[str, Any] = {
        "request_id": record.request_id or record.id, "job_id": record.id, "model": record.model,
        "outcome": "cancelled", "params": {k: v for k, v in request.items() if k not in _NOT_PARAMS}, "images": 0,
        "timings": {"queue_wait": round(max(0.0, record.updated_at - record.created_at), 6)},
        "error": {"code": "cancelled", "status": 409, "message": "the job was cancelled while queued"},
    }
    if log_prompts and "prompt" in request:
        ctx["prompt"] = request["prompt"]
    log.info("generation finished", extra={"ctx": ctx})
