"""Durable async jobs end to end, on real servers (``fluxserve serve`` subprocesses on tiny-flux):

* killed with SIGKILL while holding queued, running and finished jobs with webhooks pending, then restarted on
  the same store (SQLite, and a real PostgreSQL): every job ends exactly once, with the images an uninterrupted
  run makes, and every webhook arrives signed;
* two replicas on one PostgreSQL store and one S3 endpoint (moto's server: no other S3 server installs here):
  each step of a job's life goes to a replica picked at random;
* a stream resumed with ``Last-Event-ID``; webhook URLs checked against the allowed hosts; a store that cannot
  be used stops the server at start with the reason.

Waits are on events (a job's event stream, the receiver's condition), never on sleeps.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import ServerProcess, free_port
from tests.postgres_server import PostgresServer
from tests.services import drop_schema
from tests.webhooks.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
WAIT = 120.0
JOBS = "/v1/images/jobs"
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


def request(seed: int, steps: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": f"a lighthouse, seed {seed}", "size": "64x64", "seed": seed, "num_inference_steps": steps,
            **extra}


def events_until(base_url: str, job_id: str, stop: Callable[[dict[str, Any]], bool], *,
                 headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Read the job's event stream until an event satisfies ``stop`` (or the stream ends); each event with its
    ``id`` (when it has one)."""
    seen: list[dict[str, Any]] = []
    event_id: str | None = None
    with httpx.stream("GET", f"{base_url}{JOBS}/{job_id}/events", headers=headers, timeout=WAIT) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                if event_id is not None:
                    event["_id"] = int(event_id)
                    event_id = None
                seen.append(event)
                if stop(event):
                    break
    return seen


def finished(base_url: str, job_id: str) -> dict[str, Any]:
    """The job once it has ended (waits on its event stream), as GET answers it."""
    events_until(base_url, job_id, lambda event: event["type"] in TERMINAL or event.get("status") in TERMINAL)
    status: dict[str, Any] = httpx.get(f"{base_url}{JOBS}/{job_id}", timeout=WAIT).json()
    return status


def image_bytes(status: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in status["result"]["data"]]


@pytest.fixture
def pg_schema(postgres_server: PostgresServer) -> Iterator[dict[str, str]]:
    schema = "t_" + secrets.token_hex(6)
    try:
        yield {"FLUX_JOB_STORE": postgres_server.dsn(), "FLUX_JOB_STORE_SCHEMA": schema}
    finally:
        drop_schema(postgres_server.dsn(), schema)


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"FLUX_STATE_DIR": str(tmp_path / "state")}
    env: dict[str, str] = request.getfixturevalue("pg_schema")
    return {**env, "FLUX_STATE_DIR": str(tmp_path / "state")}


def webhook_env(receiver: Receiver) -> dict[str, str]:
    return {"FLUX_WEBHOOK_SECRET": SECRET, "FLUX_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "FLUX_WEBHOOK_RETRY_BASE": "0.2", "FLUX_WEBHOOK_RETRY_MAX": "0.5", "FLUX_WEBHOOK_MAX_ATTEMPTS": "100"}


def test_sigkill_then_restart_ends_every_job_exactly_once_with_the_same_images(
        server_factory: Callable[..., ServerProcess], store_env: dict[str, str], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(statuses=[503])  # webhooks stay pending until after the restart
    # A short lease: with PostgreSQL the killed process's running job is taken up again once its lease ends
    # (SQLite, held by one process, re-queues it as soon as the store opens).
    env = {**store_env, **webhook_env(receiver), "FLUX_MAX_BATCH": "1", "FLUX_JOB_POLL_INTERVAL": "0.2",
           "FLUX_MAX_STEPS": "400", "FLUX_JOB_LEASE": "6"}
    first = server_factory(env, name="first")
    hook = {"webhook_url": receiver.url}
    # finished before the crash
    done = httpx.post(f"{first.base_url}{JOBS}", json=request(11, 2, **hook), timeout=WAIT).json()
    assert finished(first.base_url, done["id"])["status"] == "succeeded"
    receiver.wait_for(1)  # its webhook was tried (and refused: pending)
    # running at the crash: long enough that the kill lands mid-denoise
    running = httpx.post(f"{first.base_url}{JOBS}", json=request(12, 120, **hook), timeout=WAIT).json()
    events_until(first.base_url, running["id"], lambda event: event["type"] == "progress")
    # queued behind it (one device, batches of one)
    queued = [httpx.post(f"{first.base_url}{JOBS}", json=request(seed, 2, **hook), timeout=WAIT).json()
              for seed in (13, 14)]
    assert all(job["status"] == "queued" for job in queued)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(WAIT)

    receiver.statuses[:] = [204]
    second = server_factory(env, name="second")
    ids = [done["id"], running["id"], *(job["id"] for job in queued)]
    statuses = {job_id: finished(second.base_url, job_id) for job_id in ids}
    assert all(status["status"] == "succeeded" for status in statuses.values()), statuses
    assert statuses[running["id"]]["attempts"] == 2  # started again from the start after the crash
    assert all(statuses[job["id"]]["attempts"] == 1 for job in queued)
    for job_id in ids:  # each ended exactly once
        replay = events_until(second.base_url, job_id, lambda event: False)
        assert [event["type"] for event in replay].count("succeeded") == 1, replay
    # the images equal an uninterrupted run's (the same request, alone, on the same kind of server: identical work)
    for job_id, seed, steps in ((done["id"], 11, 2), (running["id"], 12, 120), (queued[0]["id"], 13, 2),
                                (queued[1]["id"], 14, 2)):
        again = httpx.post(f"{second.base_url}/v1/images/generations", json=request(seed, steps), timeout=WAIT)
        assert again.status_code == 200, again.text
        assert image_bytes(statuses[job_id]) == [base64.b64decode(again.json()["data"][0]["b64_json"])], job_id
    # every job's webhook arrived, signed, with one stable id per job
    with receiver.changed:
        assert receiver.changed.wait_for(lambda: {
            Webhook(SECRET).verify(r.body, r.headers)["data"]["id"] for r in receiver.received
            if r.headers.get("webhook-id") and _accepted(receiver, r)} >= set(ids), WAIT), receiver.received
    by_job: dict[str, set[str]] = {}
    for received in receiver.received:
        payload = Webhook(SECRET).verify(received.body, received.headers)  # raises when forged
        assert payload["type"] == "job.succeeded"
        by_job.setdefault(payload["data"]["id"], set()).add(received.headers["webhook-id"])
    assert set(by_job) == set(ids) and all(len(hook_ids) == 1 for hook_ids in by_job.values()), by_job
    second.wait_for_log(lambda line: "webhook attempt" in line and done["id"] in line and "delivered=true" in line)
    delivered = httpx.get(f"{second.base_url}{JOBS}/{done['id']}", timeout=WAIT).json()
    assert delivered["webhook"]["state"] == "delivered" and delivered["webhook"]["last_status"] == 204
    assert delivered["webhook"]["attempts"] >= 1


def _accepted(receiver: Receiver, received: Any) -> bool:
    """Whether the receiver answered this delivery 2xx (the answers are ``statuses`` in turn)."""
    index = receiver.received.index(received)
    return receiver.statuses[min(index, len(receiver.statuses) - 1)] < 300


def test_two_replicas_share_jobs_urls_and_cancels(server_factory: Callable[..., ServerProcess],
                                                  pg_schema: dict[str, str], s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    bucket = "images-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    env = {**pg_schema, "FLUX_RESULT_STORE": "s3", "FLUX_S3_BUCKET": bucket, "FLUX_S3_ENDPOINT_URL": s3_endpoint,
           "FLUX_S3_PATH_STYLE": "1", "FLUX_S3_REGION": "us-east-1", "FLUX_S3_ACCESS_KEY_ID": "test",
           "FLUX_S3_SECRET_ACCESS_KEY": "test", "FLUX_JOB_POLL_INTERVAL": "0.2", "FLUX_MAX_STEPS": "400",
           "FLUX_MAX_BATCH": "1"}
    replicas = [server_factory({**env, "FLUX_STATE_DIR": str(tmp_path / f"r{i}")}, name=f"replica{i}")
                for i in range(2)]
    rng = random.Random(7)

    def any_replica() -> str:
        return rng.choice(replicas).base_url

    # a job's whole life through replicas picked at random: submit, stream, poll, fetch its URL
    for seed in (21, 22, 23):
        job = httpx.post(f"{any_replica()}{JOBS}", json=request(seed, 2, response_format="url"), timeout=WAIT).json()
        status = finished(any_replica(), job["id"])
        assert status["status"] == "succeeded", status
        polled = httpx.get(f"{any_replica()}{JOBS}/{job['id']}", timeout=WAIT).json()
        url = polled["result"]["data"][0]["url"]
        assert url.startswith(s3_endpoint) and "Signature" in url  # a presigned object-store URL
        image = httpx.get(url, timeout=WAIT)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # a synchronous url image is an object too: its presigned URL works whichever replica made it
    sync = httpx.post(f"{replicas[1].base_url}/v1/images/generations", json=request(24, 2, response_format="url"),
                      timeout=WAIT)
    assert sync.status_code == 200, sync.text
    sync_url = sync.json()["data"][0]["url"]
    assert sync_url.startswith(s3_endpoint) and httpx.get(sync_url, timeout=WAIT).content.startswith(b"\x89PNG")
    # a saved image (store_local) goes to the bucket too, under outputs/, with its metadata beside it
    saved = httpx.post(f"{replicas[0].base_url}/v1/images/generations",
                       json=request(25, 2, store_local=True, write_metadata=True), timeout=WAIT).json()["data"][0]
    assert saved["saved_path"].startswith("outputs/") and "save_error" not in saved, saved
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    stored = s3.get_object(Bucket=bucket, Key="fluxserve/" + saved["saved_path"])["Body"].read()
    assert stored == base64.b64decode(saved["b64_json"])
    meta = json.loads(s3.get_object(Bucket=bucket, Key="fluxserve/" + saved["metadata_path"])["Body"].read())
    assert meta["seed"] == 25 and meta["job_id"] == saved["job_id"]
    # cancel through one replica a job that another runs
    long = httpx.post(f"{replicas[0].base_url}{JOBS}", json=request(31, 400), timeout=WAIT).json()
    events_until(replicas[1].base_url, long["id"], lambda event: event["type"] == "progress")
    cancelled = httpx.delete(f"{replicas[1].base_url}{JOBS}/{long['id']}", timeout=WAIT)
    assert cancelled.status_code == 200
    assert finished(replicas[0].base_url, long["id"])["status"] == "cancelled"
    # another key's job is invisible on every replica (no keys here: an unknown id is 404 everywhere)
    for replica in replicas:
        missing = httpx.get(f"{replica.base_url}{JOBS}/img_{'0' * 32}", timeout=WAIT)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_a_stream_resumes_after_the_last_event_seen(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory({"FLUX_JOB_POLL_INTERVAL": "0.2"})
    job = httpx.post(f"{server.base_url}{JOBS}", json=request(41, 3), timeout=WAIT).json()
    everything = events_until(server.base_url, job["id"], lambda event: event["type"] in TERMINAL)
    numbered = [event for event in everything if "_id" in event]
    assert [event["type"] for event in numbered][:2] == ["queued", "started"] and numbered[-1]["type"] == "succeeded"
    resumed = events_until(server.base_url, job["id"], lambda event: event["type"] in TERMINAL,
                           headers={"Last-Event-ID": str(numbered[0]["_id"])})
    assert resumed[0]["type"] == "status"
    kept = [event["_id"] for event in events_until(server.base_url, job["id"], lambda event: event["type"] in TERMINAL)
            if "_id" in event]  # what the store keeps now (progress events replace each other)
    assert [event["_id"] for event in resumed[1:]] == [i for i in kept if i > numbered[0]["_id"]]
    assert len(kept) >= 3 and kept == sorted(kept)
    bad = httpx.get(f"{server.base_url}{JOBS}/{job['id']}/events", headers={"Last-Event-ID": "x"}, timeout=WAIT)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_webhook_urls_are_checked_before_a_job_is_queued(server_factory: Callable[..., ServerProcess],
                                                         receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    server = server_factory(webhook_env(receiver))
    for url, code in (("http://169.254.169.254/latest", "invalid_webhook_url"),  # cloud metadata
                      ("http://localhost:9/hook", "invalid_webhook_url"),  # a name is never a private address
                      ("ftp://127.0.0.1/hook", "invalid_webhook_url")):
        refused = httpx.post(f"{server.base_url}{JOBS}", json=request(1, 2, webhook_url=url), timeout=WAIT)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "webhook_url" and refused.json()["error"]["code"] == code
    sync = httpx.post(f"{server.base_url}/v1/images/generations", json=request(1, 2, webhook_url=receiver.url),
                      timeout=WAIT)
    assert sync.status_code == 400 and sync.json()["error"]["code"] == "unsupported_parameter"
    ok = httpx.post(f"{server.base_url}{JOBS}", json=request(1, 2, webhook_url=receiver.url), timeout=WAIT)
    assert ok.status_code == 202
    got = receiver.wait_for(1)
    assert Webhook(SECRET).verify(got[0].body, got[0].headers)["data"]["id"] == ok.json()["id"]
    finished(server.base_url, ok.json()["id"])
    # the attempt is recorded (then logged) once the receiver has answered
    server.wait_for_log(lambda line: "webhook attempt" in line and ok.json()["id"] in line and "delivered=true" in line)
    job = httpx.get(f"{server.base_url}{JOBS}/{ok.json()['id']}", timeout=WAIT).json()
    assert job["webhook"]["last_status"] == 204 and job["webhook"]["state"] == "delivered", job["webhook"]
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=WAIT).text
    assert 'fluxserve_webhook_attempts_total{event="job.succeeded",outcome="delivered"} 1.0' in metrics
    assert 'fluxserve_durable_jobs_total{state="succeeded"} 1.0' in metrics


def test_a_store_that_cannot_be_used_stops_the_start_with_the_reason(tmp_path: Path, cache_dir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.sqlite3").write_bytes(b"this is not a database, but someone's file" * 100)
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    cases = ({"FLUX_STATE_DIR": str(state)}, {"FLUX_JOB_STORE": f"sqlite:///{foreign}"},
             {"FLUX_JOB_STORE": "postgresql://fluxserve:secret@127.0.0.1:9/nothing", "FLUX_JOB_STORE_TIMEOUT": "2"})
    for env in cases:
        full = {"FLUX_MODEL": "tiny-flux", "FLUX_CACHE_DIR": str(cache_dir), "FLUX_DEVICE": "cpu",
                "FLUX_HUB_DOWNLOADS": "off", "FLUX_WARMUP_ENABLE": "0", "FLUX_PORT": str(free_port()),
                "PATH": "/usr/bin:/bin",
                "FLUX_STATE_DIR": str(tmp_path / "other"), **env}
        result = subprocess.run([sys.executable, "-m", "fluxserve", "serve"], env=full, capture_output=True,
                                text=True, timeout=WAIT, cwd=tmp_path)
        assert result.returncode != 0, result.stdout + result.stderr
        output = result.stdout + result.stderr
        assert "job store" in output.lower() or "database" in output.lower(), output[-2000:]
        assert "secret" not in output  # the password is never shown
        assert "Traceback" not in output, output[-3000:]
    assert (state / "jobs.sqlite3").read_bytes().startswith(b"this is not a database")  # left as it was


def test_a_database_lost_mid_run_refuses_new_jobs_loses_none_and_recovers(
        server_factory: Callable[..., ServerProcess]) -> None:
    from tests.postgres_server import temporary_server

    with temporary_server() as database:
        server = server_factory({"FLUX_JOB_STORE": database.dsn(), "FLUX_JOB_STORE_TIMEOUT": "2",
                                 "FLUX_JOB_POLL_INTERVAL": "0.2", "FLUX_MAX_STEPS": "400"})
        running = httpx.post(f"{server.base_url}{JOBS}", json=request(51, 400), timeout=WAIT).json()
        events_until(server.base_url, running["id"], lambda event: event["type"] == "progress")
        database.stop()
        refused = httpx.post(f"{server.base_url}{JOBS}", json=request(52, 2), timeout=WAIT)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "job_store_unavailable" and "postgresql" not in error["message"]
        assert refused.headers["retry-after"]
        ready = httpx.get(f"{server.base_url}/ready", timeout=WAIT)  # synchronous work goes on: still ready
        assert ready.status_code == 200 and ready.json()["warnings"], ready.text
        sync = httpx.post(f"{server.base_url}/v1/images/generations", json=request(53, 2), timeout=WAIT)
        assert sync.status_code == 200
        database.start()
        for _ in range(60):  # each refused try waits FLUX_JOB_STORE_TIMEOUT for the database: no sleeping here
            accepted = httpx.post(f"{server.base_url}{JOBS}", json=request(54, 2), timeout=WAIT)
            if accepted.status_code == 202:
                break
        assert accepted.status_code == 202, accepted.text
        assert finished(server.base_url, accepted.json()["id"])["status"] == "succeeded"
        # the job that ran through the outage was recorded once the database came back
        assert finished(server.base_url, running["id"])["status"] == "succeeded"
        assert "warnings" not in httpx.get(f"{server.base_url}/ready", timeout=WAIT).json()


def test_sigterm_finishes_the_running_job_and_leaves_the_queue_for_the_next_start(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    env = {"FLUX_STATE_DIR": str(tmp_path / "state"), "FLUX_MAX_BATCH": "1", "FLUX_JOB_POLL_INTERVAL": "0.2",
           "FLUX_MAX_STEPS": "400", "FLUX_SHUTDOWN_TIMEOUT": "120"}
    first = server_factory(env, name="first")
    running = httpx.post(f"{first.base_url}{JOBS}", json=request(61, 60), timeout=WAIT).json()
    events_until(first.base_url, running["id"], lambda event: event["type"] == "progress")
    queued = [httpx.post(f"{first.base_url}{JOBS}", json=request(seed, 2), timeout=WAIT).json() for seed in (62, 63)]
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(WAIT) == 0
    second = server_factory(env, name="second")
    statuses = [finished(second.base_url, job["id"]) for job in (running, *queued)]
    assert [status["status"] for status in statuses] == ["succeeded"] * 3
    assert [status["attempts"] for status in statuses] == [1, 1, 1]  # the drain finished it: nothing ran twice
    assert statuses[0]["finished_at"] < statuses[1]["started_at"]  # the queue waited for the next start
