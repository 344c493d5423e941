"""Unit tests: log formatters, secret scrubbing, logging set-up, fallback labels, the rolling summary."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fluxserve.observability import logs
from fluxserve.observability.logs import HumanFormatter, JsonFormatter, configure_logging, register_secrets, scrub
from fluxserve.observability.metrics import STAGES, Metrics, fallback_label, percentile


@pytest.fixture(autouse=True)
def _no_secrets() -> Iterator[None]:
    logs.clear_secrets()
    yield
    logs.clear_secrets()


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), name: str = "fluxserve.test",
            level: int = logging.INFO, ctx: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom with hf_SECRET_abcdef in it")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    if ctx is not None:
        record.ctx = ctx
    return record


def test_json_formatter_fields_and_context() -> None:
    line = JsonFormatter().format(_record(ctx={"request_id": "req_1", "timings": {"denoise": 0.5},
                                                "message": "not allowed to hide the message"}))
    data = json.loads(line)
    assert data["message"] == "hello world"
    assert data["level"] == "INFO" and data["logger"] == "fluxserve.test"
    assert data["timestamp"].endswith("Z") and "T" in data["timestamp"]
    assert data["request_id"] == "req_1" and data["timings"] == {"denoise": 0.5}
    assert data["ctx_message"] == "not allowed to hide the message"
    assert "\n" not in line


def test_json_formatter_exception_is_one_line() -> None:
    line = JsonFormatter().format(_record(exc=True))
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_secrets_scrubbed_everywhere() -> None:
    register_secrets(["hf_SECRET_abcdef", 'sk-"quoted\\key', None, "ab"])  # too short values are ignored
    rec = _record("token %s", ("hf_SECRET_abcdef",), ctx={"headers": {"auth": 'Bearer sk-"quoted\\key'},
                                                         "list": ["hf_SECRET_abcdef"]}, exc=True)
    for formatter in (JsonFormatter(), HumanFormatter()):
        text = formatter.format(rec)
        assert "hf_SECRET_abcdef" not in text
        assert "quoted" not in text
        assert "***" in text
    assert scrub("ab cd") == "ab cd"


def test_human_formatter_appends_context() -> None:
    text = HumanFormatter().format(_record(ctx={"request_id": "req_1", "outcome": "succeeded"}))
    assert "INFO" in text and "fluxserve.test: hello world" in text
    assert 'request_id="req_1"' in text and 'outcome="succeeded"' in text


def test_uvicorn_access_record_structured() -> None:
    rec = _record('%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5000", "GET", "/health", "1.1", 200), name="uvicorn.access")
    data = json.loads(JsonFormatter().format(rec))
    assert data["message"] == '127.0.0.1:5000 - "GET /health HTTP/1.1" 200'
    assert data["method"] == "GET" and data["path"] == "/health" and data["status"] == 200
    assert data["client"] == "127.0.0.1:5000"


def test_configure_logging_routes_everything_through_one_formatter(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_uvicorn = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
                     for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "py.warnings")}
    try:
        configure_logging("INFO", structured=True)
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 1)
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:1", "POST", "/v1/x", "1.1", 404)
        logging.getLogger("fluxserve.x").warning("ctx", extra={"ctx": {"model": "tiny-flux"}})
        logging.getLogger("diffusers.pipelines").error("a diffusers error")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library warning", FutureWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        for name, (handlers, propagate) in saved_uvicorn.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    by_logger = {p["logger"]: p for p in parsed}
    assert by_logger["uvicorn.error"]["message"] == "Started server process [1]"
    assert by_logger["uvicorn.access"]["status"] == 404
    assert by_logger["fluxserve.x"]["model"] == "tiny-flux"
    assert by_logger["diffusers.pipelines"]["level"] == "ERROR"
    assert "a library warning" in by_logger["py.warnings"]["message"]
    assert len(parsed) == 5


def test_fallback_label() -> None:
    assert fallback_label("cpu_oom: cache cleanup") == "cpu_oom"
    assert fallback_label("cuda_oom: out of memory after: model CPU offload") == "cuda_oom"
    assert fallback_label("nan_output: re-decoded VAE in float32") == "nan_output"
    assert fallback_label("cuda_oom: x", failed=True) == "failed"
    assert fallback_label("something else") == "other"
    assert fallback_label(None) == "other"


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([3.0], 95) == 3.0


def test_summary_and_histograms_from_observations() -> None:
    metrics = Metrics(window=3)
    for i in range(5):
        timing = {stage: 0.01 * (i + 1) for stage in STAGES} | {"encode": 9.0}
        timing["total"] = 0.1 * (i + 1)
        metrics.observe_generation("tiny-flux", 2, timing, fallback_reason="cpu_oom: cache cleanup" if i == 4 else None)
    summary = metrics.summary()
    assert summary["window"] == 3 and summary["window_size"] == 3
    assert summary["images"] == 6 and summary["fallbacks"] == 1
    assert set(summary["stages"]) == set(STAGES)  # aliases are not stages
    total = summary["stages"]["total"]
    assert total["p50"] == pytest.approx(0.4) and total["p95"] == pytest.approx(0.5)
    assert total["max"] == pytest.approx(0.5)
    assert total["mean"] == pytest.approx(0.4)
    assert summary["images_per_second"] and summary["images_per_second"] > 0

    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    counts = {s.labels["stage"]: s.value for s in families["fluxserve_stage_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {stage: 5.0 for stage in STAGES}
    images = [s.value for s in families["fluxserve_images_generated"].samples if s.name.endswith("_total")]
    assert images == [10.0]
    fallbacks = {s.labels["reason"]: s.value for s in families["fluxserve_oom_fallbacks"].samples
                 if s.name.endswith("_total")}
    assert fallbacks == {"cpu_oom": 1.0}


def test_empty_summary() -> None:
    summary = Metrics().summary()
    assert summary["window"] == 0 and summary["images_per_second"] is None and summary["stages"] == {}


@pytest.mark.parametrize(("status", "code", "fallback"), [
    ("cancelled", "cancelled", None), ("failed", "out_of_memory", "failed"), ("failed", "queue_timeout", None),
])
def test_job_ended_logs_and_counts(caplog: pytest.LogCaptureFixture, status: str, code: str,
                                   fallback: str | None) -> None:
    from fluxserve.generation import GenerationParams
    from fluxserve.models.registry import BUILTIN_MODELS
    from fluxserve.observability.events import job_ended
    from fluxserve.scheduler.jobs import Job, JobError, JobStatus

    spec = BUILTIN_MODELS["tiny-flux"]
    job = Job(spec=spec, params=GenerationParams(spec.key, 64, 64, 2, 0.0, 64), prompt="secret prompt", seeds=[1, 2])
    message = "out of memory: cpu_oom: still out of memory" if code == "out_of_memory" else "nope"
    job.transition(JobStatus(status), error=JobError(message, code=code, status=503))
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="fluxserve.generation")
    job_ended(metrics, job)
    (record,) = [r for r in caplog.records if r.name == "fluxserve.generation"]
    ctx = record.ctx  # type: ignore[attr-defined]
    assert record.getMessage() == "generation finished"
    assert ctx["outcome"] == status and ctx["images"] == 0 and ctx["error"]["code"] == code
    assert ctx["request_id"] == job.id and ctx["model"] == "tiny-flux" and "prompt" not in ctx
    assert record.levelno == (logging.WARNING if status == "failed" else logging.INFO)
    samples = {(s.name, tuple(s.labels.items())): s.value for f in metrics.registry.collect() for s in f.samples}
    assert samples.get(("fluxserve_cancelled_total", ()), 0) == (1 if status == "cancelled" else 0)
    if fallback:
        assert ctx["fallback_reason"] == "cpu_oom: still out of memory"
        assert samples[("fluxserve_oom_fallbacks_total", (("reason", "failed"),))] == 1
    else:
        assert "fallback_reason" not in ctx
        assert not any(k[0] == "fluxserve_oom_fallbacks_total" for k in samples)
