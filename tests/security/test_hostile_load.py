"""Hostile load against a real ``fluxserve serve`` on loopback with small budgets, while legitimate
clients use the server alongside.

Floods (each bounded in count; the whole test in well under a minute on tiny-flux), all at once: oversized
headers, half-open connections (three times FLUX_MAX_CONNECTIONS), bodies over FLUX_MAX_BODY_BYTES,
made-up and disabled model names and one key past its rate limit; from a second key, slow bodies on three
times FLUX_MAX_CONNECTIONS connections (one byte at a time, at the attacker's own pace); from a third,
held event streams, 16777216×1 PNGs, ``loras`` nested a thousand deep and multi-megabyte JSON edits; from a
fourth, requests alternating between two library adapters whose names collide (``style.v1`` / ``style_v1``)
and requests over the compute budget (n=4 × 2048² × 1 step); and from a fifth, many times the per-key
budgets of stored results and ``url`` files. Beside them a second, small server in worker-process mode has
its worker stopped (SIGSTOP) under queued jobs.
Asserted:

- legitimate clients (their own key, fresh connections) get ≥ 99 % successful answers, and every
  async job they start ends ``succeeded`` (followed on its event stream); afterwards each of those jobs
  still has its result and the key's ``url`` file still downloads (another key's flood expired neither);
- /health, probed every 50 ms throughout from a process of its own, answers 200 every time, with a median
  under a second (and no probe over ``HEALTH_WORST``: a generous bound a loaded 2-core runner meets, that a
  blocked event loop would not);
- no answer to anyone is a 5xx but the documented 503s (``too_many_connections``, ``shutting_down``,
  ``server_busy``);
- each colliding adapter name is served (200) with the image of its own file, never the other's;
- the server's RSS grows by less than ``RSS_MARGIN`` over its warmed-up size (the floods would add
  hundreds of MiB if headers or bodies were buffered);
- on the worker-mode server, the stopped worker is killed after FLUX_WORKER_HEARTBEAT_TIMEOUT and
  replaced, a job it held fails with ``worker_unresponsive``, and the jobs queued behind it succeed;
- /ready is still 200 afterwards (on both servers), and /metrics has no label for a made-up model.

Nothing here waits on the clock to synchronize: threads finish their bounded work, sockets are read until
the server answers or closes them, the hung worker's replacement is awaited on the server's log line;
only the attackers pace their own bytes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from fluxserve.engine.adapters import build_tiny_lora

from .helpers import HealthProbe

pytestmark = pytest.mark.e2e

LEGIT = "sk-legit-0123456789abcdefghij"
ATTACKER = "sk-attacker-0123456789abcdefgh"
ATTACKER2 = "sk-attacker2-0123456789abcdefg"
SLOW = "sk-slow-bodies-0123456789abcde"
ADAPTERS = "sk-adapters-0123456789abcdefg"
HOARDER = "sk-hoarder-0123456789abcdefgh"
MAX_CONNECTIONS = 48
PER_CLIENT = 12
MAX_BODY = 64 * 1024
MAX_HEADER = 8 * 1024
RSS_MARGIN = 200 * 1024 * 1024
"""How much the server's RSS may grow while under attack (the floods send well over 1 GiB)."""
HEALTH_WORST = 5.0
"""Seconds no /health probe may take (its median must stay under 1 s): generous for a loaded 2-core runner,
where a stalled event loop (a parse or a resize on it) takes far longer."""
RESULT_BUDGETS = {  # a 64×64 result is 11 KB of PNG (15 KB as the base64 JSON the job table keeps), a url image 11 KB
    "FLUX_RESULTS_MAX_BYTES": "800000", "FLUX_RESULTS_MAX_BYTES_PER_KEY": "400000",
    "FLUX_FILES_MAX_BYTES": "200000", "FLUX_FILES_MAX_BYTES_PER_KEY": "100000"}
"""The legitimate key's 20 results (≤ 310 KB) and its url file fit its own budgets; the hoarder's 56 results
(≥ 610 KB) and 16 files (≈ 175 KB) are well over its own, and the two keys' results together pass the global
budget (one shared budget, oldest first, would expire the legitimate key's). Each global budget is twice the
per-key one, as docs/reliability.md advises for two busy keys (a smaller one would refuse the legitimate
key's new results once both keys are near their own)."""
ENV = {"FLUX_API_KEYS": f"{LEGIT},{ATTACKER},{ATTACKER2},{SLOW},{ADAPTERS},{HOARDER}",
       "FLUX_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
       "FLUX_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT), "FLUX_MAX_STREAMS_PER_CLIENT": "6",
       "FLUX_BODY_TIMEOUT": "2", "FLUX_BODY_MIN_RATE": "1000", "FLUX_BODY_MEMORY_BYTES": str(256 * 1024 * 1024),
       "FLUX_MAX_BODY_BYTES": str(MAX_BODY), "FLUX_MAX_HEADER_BYTES": str(MAX_HEADER), "FLUX_HEADER_TIMEOUT": "30",
       "FLUX_RATE_LIMIT_PER_MINUTE": "6", "FLUX_RATE_LIMIT_BURST": "80", "FLUX_STORE_LOCAL": "0",
       "FLUX_MAX_BATCH": "4", "FLUX_LOG_LEVEL": "WARNING", **RESULT_BUDGETS}
HEARTBEAT_TIMEOUT = 3
WORKER_ENV = {"FLUX_WORKER_PROCESSES": "1", "FLUX_WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
              "FLUX_MAX_BATCH": "1", "FLUX_STORE_LOCAL": "0", "FLUX_WARMUP_ENABLE": "0", "FLUX_LOG_LEVEL": "INFO"}
"""The small worker-mode server: one job per call, so jobs queue behind the one its stopped worker holds; no
warm-up (its worker starts twice, on CPU time the flood shares)."""
DOCUMENTED_503 = {"too_many_connections", "shutting_down", "server_busy"}
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
SMALL = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _status(response: bytes) -> tuple[int, str | None] | None:
    """(status, error code) of a raw response, None when the connection closed without one."""
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    if not match:
        return None
    code = None
    body = response.partition(b"\r\n\r\n")[2]
    with contextlib.suppress(ValueError):
        code = json.loads(body)["error"]["code"]
    return int(match.group(1)), code


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.legit: Counter[str] = Counter()
        self.legit_failures: list[str] = []
        self.hostile: Counter[str] = Counter()
        self.server_errors: list[str] = []
        self.legit_jobs: list[str] = []
        self.broken_promises: list[str] = []
        """Hostile requests answered otherwise than their bound says (an adapter's image from another file...)."""

    def broken(self, what: str) -> None:
        with self.lock:
            self.broken_promises.append(what)

    def answer(self, who: str, status: int, code: str | None) -> None:
        with self.lock:
            (self.legit if who == "legit" else self.hostile)[f"{status} {code or ''}".strip()] += 1
            if status >= 500 and not (status == 503 and code in DOCUMENTED_503):
                self.server_errors.append(f"{who}: {status} {code}")


def _raw(port: int, head: bytes, body_chunk: bytes = b"", body_bytes: int = 0) -> bytes:
    """Send a head and up to ``body_bytes`` of body (stopping when the server stops reading)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
            sent = 0
            while sent < body_bytes:
                sock.sendall(body_chunk)
                sent += len(body_chunk)
        return _read_until_closed(sock)


def _flood_big_headers(port: int, tally: Tally) -> None:
    filler = b"X-Filler: " + b"a" * 65536 + b"\r\n"
    for _ in range(16):  # 16 connections, each offering a 16 MiB head
        response = _raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", filler, 16 * 1024 * 1024)
        if (answer := _status(response)) is not None:
            tally.answer("hostile", *answer)


def _flood_oversized_bodies(port: int, tally: Tally) -> None:
    auth = f"Authorization: Bearer {ATTACKER}\r\n".encode()
    for framing in (b"Content-Length: 10000000000\r\n", b"Transfer-Encoding: chunked\r\n") * 8:
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536) if b"chunked" in framing else b" " * 65536
        response = _raw(port, b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + auth + framing + b"\r\n", chunk, 32 * 1024 * 1024)
        if (answer := _status(response)) is not None:
            tally.answer("hostile", *answer)


def _flood_model_names_and_rate(base: str, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {ATTACKER}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for i in range(150):  # made-up names and a disabled 57 GB model, then past the rate limit
            model = "qwen" if i % 10 == 0 else f"made-up-model-{i}"
            try:
                response = client.post(GEN, json={**SMALL, "model": model})
            except httpx.TransportError:
                continue  # its connection was closed to make room: a hostile client may lose those
            code = response.json()["error"]["code"] if response.status_code >= 400 else None
            tally.answer("hostile", response.status_code, code)


def _slow_bodies(port: int, tally: Tally) -> None:
    """Three times the server's connections from one key, each sending a body one byte at a time at the
    attacker's own pace: the key meets its own connection budget, and the body rate ends the rest."""
    head = (b"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + SLOW.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
    socks = []
    for _ in range(3 * MAX_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        with contextlib.suppress(OSError):
            sock.sendall(head)
        socks.append(sock)
    pending = list(socks)
    try:
        while pending:
            readable, _, _ = select.select(pending, [], [], 0.3)
            for sock in pending:
                if sock in readable:
                    if (answer := _status(_read_until_closed(sock))) is not None:
                        tally.answer("hostile", *answer)
                else:
                    with contextlib.suppress(OSError):
                        sock.sendall(b" ")
            pending = [sock for sock in pending if sock not in readable]
    finally:
        for sock in socks:
            sock.close()


def _payloads() -> dict[str, Any]:
    """What the second hostile key sends, made before the floods start (the test's own CPU stays out of them)."""
    strip = io.BytesIO()
    Image.new("RGB", (16_777_216, 1)).save(strip, format="PNG", compress_level=9)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(
        noise, format="PNG", compress_level=1)
    return {"strip": strip.getvalue(), "noise": noise.getvalue(), "big": {
        "prompt": "a storm", "image": "data:image/png;base64," + base64.b64encode(noise.getvalue()).decode(),
        "size": "64x64", "num_inference_steps": 2, "strength": 1.0}}


def _hostile_requests(base: str, tally: Tally, payloads: dict[str, Any]) -> None:
    """Held event streams, 16777216×1 PNGs, loras nested a thousand deep, and multi-megabyte JSON edits, all
    from one key at once."""
    headers = {"Authorization": f"Bearer {ATTACKER2}"}
    deep = "[" * 1000 + "]" * 1000

    def stream() -> None:
        with httpx.stream("POST", base + GEN, json={**SMALL, "size": "128x128", "num_inference_steps": 20,
                                                    "stream": True}, headers=headers, timeout=120) as response:
            code = None if response.status_code == 200 else json.loads(response.read())["error"]["code"]
            for _ in response.iter_lines():
                pass
        tally.answer("hostile", response.status_code, code)

    def post(path: str, **kwargs: Any) -> None:
        response = httpx.post(base + path, headers=headers, timeout=120, **kwargs)
        code = response.json()["error"]["code"] if response.status_code >= 400 else None
        tally.answer("hostile", response.status_code, code)

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(stream) for _ in range(12)]
        futures += [pool.submit(post, EDIT, data={"prompt": "wider", "size": "auto"},
                                files={"image": ("strip.png", payloads["strip"], "image/png")}) for _ in range(2)]
        futures += [pool.submit(post, GEN, json={**SMALL, "loras": deep}) for _ in range(4)]
        futures += [pool.submit(post, EDIT, data={"prompt": "x", "loras": deep},
                                files={"image": ("n.png", payloads["noise"], "image/png")}) for _ in range(2)]
        futures += [pool.submit(post, EDIT, json=payloads["big"]) for _ in range(4)]
        for future in futures:
            future.result(timeout=600)


def _job_outcome(base: str, headers: dict[str, str], job_id: str) -> str:
    """Follow a job's event stream to its terminal event (no polling)."""
    with httpx.stream("GET", f"{base}/v1/images/jobs/{job_id}/events", headers=headers, timeout=120) as events:
        if events.status_code != 200:
            return f"events answered {events.status_code} {json.loads(events.read())['error']['code']}"
        for line in events.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event["type"] in ("succeeded", "failed", "cancelled") or event.get("status") in (
                        "succeeded", "failed", "cancelled"):
                    return str(event.get("status") if event["type"] == "status" else event["type"])
    return "no terminal event"


def _legit(base: str, tally: Tally, index: int) -> None:
    headers = {"Authorization": f"Bearer {LEGIT}"}
    for i in range(30):
        kind = "generation" if i % 3 == 0 else "job" if i % 6 == 1 else "models"
        request: tuple[str, str, dict[str, Any] | None] = {
            "generation": ("POST", GEN, {**SMALL, "seed": index * 100 + i}),
            "job": ("POST", "/v1/images/jobs", {**SMALL, "seed": index * 100 + i}),
            "models": ("GET", "/v1/models", None)}[kind]
        try:  # a fresh connection each time, as a client behind a proxy would
            response = httpx.request(request[0], base + request[1], json=request[2], headers=headers, timeout=120)
            outcome = None
            if kind == "job" and response.status_code == 202:
                with tally.lock:
                    tally.legit_jobs.append(response.json()["id"])
                outcome = _job_outcome(base, headers, response.json()["id"])
        except httpx.TransportError as exc:
            with tally.lock:
                tally.legit_failures.append(f"{request[1]}: {type(exc).__name__}")
            continue
        code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
        tally.answer("legit", response.status_code, code)
        if kind == "generation":
            ok = response.status_code == 200 and bool(response.json()["data"][0]["b64_json"])
        elif kind == "job":
            ok = response.status_code == 202 and outcome == "succeeded"  # every job reaches its end
        else:
            ok = response.status_code == 200
        if not ok:
            with tally.lock:
                tally.legit_failures.append(f"{request[1]}: {response.status_code} {outcome} {response.text[:200]}")


COLLIDING = ("style.v1", "style_v1")
"""Two library names that once mapped to one internal adapter (and one set of weights)."""


def _colliding_library(cache_dir: Path, directory: Path) -> Path:
    for seed, name in enumerate(COLLIDING, start=20):
        build_tiny_lora(cache_dir / "models" / "tiny-flux", directory / f"{name}.safetensors", family="flux",
                        base_model="tiny-flux", seed=seed, std=0.5)
    return directory


def _adapter_image(base: str, name: str) -> tuple[int, str | None, np.ndarray | None]:
    """(status, the adapter the response names, the image) of one request with the adapter ``name``."""
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 7,
            "loras": [{"name": name, "scale": 1.0}]}
    response = httpx.post(base + GEN, json=body, headers={"Authorization": f"Bearer {ADAPTERS}"}, timeout=120)
    if response.status_code != 200:
        return response.status_code, None, None
    item = response.json()["data"][0]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.float32)
    return 200, item["params"]["loras"][0]["name"], image


def _adapters_and_compute(base: str, tally: Tally, references: dict[str, np.ndarray]) -> None:
    """Requests alternating between the colliding adapter names, each of which must get its own file's image
    (nearer its reference, made before the floods, than the other name's: batching may change a few levels),
    and requests over the compute budget, refused before any work."""
    for index in range(6):
        name = COLLIDING[index % 2]
        other = COLLIDING[1 - index % 2]
        status, named, image = _adapter_image(base, name)
        tally.answer("hostile", status, None)
        if image is None or named != name:
            tally.broken(f"adapter {name}: {status}, named {named}")
        elif np.abs(image - references[name]).mean() >= np.abs(image - references[other]).mean():
            tally.broken(f"adapter {name} was served {other}'s weights")
    headers = {"Authorization": f"Bearer {ADAPTERS}"}
    for _ in range(4):
        response = httpx.post(base + GEN, json={"prompt": "x", "n": 4, "size": "2048x2048", "num_inference_steps": 1},
                              headers=headers, timeout=120)
        tally.answer("hostile", response.status_code, response.json().get("error", {}).get("code"))


def _hoard(base: str, tally: Tally) -> dict[str, list[str]]:
    """One key stores several times its budgets of url images and async results (n=4 each): its own oldest go,
    never another key's."""
    headers = {"Authorization": f"Bearer {HOARDER}"}
    urls: list[str] = []
    jobs: list[str] = []
    for index in range(4):
        response = httpx.post(base + GEN, json={**SMALL, "n": 4, "seed": index, "response_format": "url"},
                              headers=headers, timeout=120)
        tally.answer("hostile", response.status_code, None if response.status_code == 200 else
                     response.json()["error"]["code"])
        if response.status_code == 200:
            urls += [item["url"] for item in response.json()["data"]]
    for index in range(14):
        response = httpx.post(base + "/v1/images/jobs", json={**SMALL, "n": 4, "seed": 100 + index},
                              headers=headers, timeout=120)
        tally.answer("hostile", response.status_code, None if response.status_code == 202 else
                     response.json()["error"]["code"])
        if response.status_code == 202:
            jobs.append(response.json()["id"])
            _job_outcome(base, headers, jobs[-1])
    return {"urls": urls, "jobs": jobs}


def _stored_result_status(base: str, headers: dict[str, str], job_id: str) -> str:
    """How a finished job polls once its result had time to be stored: ``kept``, ``410 result_expired``,
    ``failed <code>``... (its images are encoded right after the job ends; each read is a round trip)."""
    for _ in range(200):
        polled = httpx.get(f"{base}/v1/images/jobs/{job_id}", headers=headers, timeout=60)
        if polled.status_code != 200:
            return f"{polled.status_code} {polled.json()['error']['code']}"
        job = polled.json()
        if job["status"] == "failed":
            return f"failed {job['error']['code']}"
        if job.get("result") is not None:
            return "kept"
    return "no result"


def _worker_pid(server: Any, since: int = 0) -> int:
    line = server.wait_for_log(lambda text: "worker process started" in text, since=since, timeout=120)
    return int(re.search(r"pid=(\d+)", line).group(1))  # type: ignore[union-attr]


def _hang_the_worker(server: Any) -> dict[str, Any]:
    """Stop the worker process of the worker-mode server, then queue three jobs on it: the supervisor must
    kill the silent worker after the heartbeat timeout and start another; a job the stopped worker held fails
    ``worker_unresponsive``, the ones queued behind it run on the new worker."""
    pid = _worker_pid(server)
    mark = server.log_mark()
    os.kill(pid, signal.SIGSTOP)
    try:
        jobs = []
        for seed in range(3):
            response = httpx.post(server.base_url + "/v1/images/jobs",
                                  json={**SMALL, "num_inference_steps": 2, "seed": seed}, timeout=60)
            assert response.status_code == 202, response.text
            jobs.append(response.json()["id"])
        for job_id in jobs:  # each to its end, on its event stream
            _job_outcome(server.base_url, {}, job_id)
        outcomes = [_stored_result_status(server.base_url, {}, job_id) for job_id in jobs]
        killed = server.wait_for_log(lambda text: "sent no heartbeat" in text, since=mark, timeout=120)
        replacement = _worker_pid(server, since=mark)
        return {"outcomes": outcomes, "killed": killed, "pid": pid, "replacement": replacement,
                "reaped": not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                "ready": httpx.get(server.base_url + "/ready", timeout=30).status_code}
    finally:  # whatever happened, the stopped process does not outlive the test
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if psutil.Process(pid).ppid() == server.proc.pid:
                os.kill(pid, signal.SIGKILL)


def test_hostile_load_leaves_legitimate_clients_served(server_factory: Callable[..., Any], cache_dir: Path,
                                                       tmp_path: Path) -> None:
    workers = server_factory(WORKER_ENV, name="workers", ready=False)  # starts while the rest is set up
    library = _colliding_library(cache_dir, tmp_path / "loras")
    server = server_factory({**ENV, "FLUX_LORA_DIR": str(library)}, name="hostile", ready=False)
    server.wait_ready()
    workers.wait_ready()
    base, port = server.base_url, server.port
    headers = {"Authorization": f"Bearer {LEGIT}"}
    for _ in range(3):  # warm up: allocations of the first generations are not the floods' doing
        assert httpx.post(base + GEN, json=SMALL, headers=headers, timeout=120).status_code == 200
    references = {}
    for name in COLLIDING:  # each adapter's image alone, before the floods (loading them is warm-up too)
        status, named, image = _adapter_image(base, name)
        assert status == 200 and named == name and image is not None, (status, named)
        references[name] = image
    assert np.abs(references[COLLIDING[0]] - references[COLLIDING[1]]).mean() > 1.0  # the test tells them apart
    legit_file = httpx.post(base + GEN, json={**SMALL, "response_format": "url"}, headers=headers, timeout=120)
    legit_url = legit_file.json()["data"][0]["url"]
    process = psutil.Process(server.proc.pid)
    baseline = process.memory_info().rss
    tally = Tally()
    payloads = _payloads()

    half_open = []
    for _ in range(MAX_CONNECTIONS * 3):  # slowloris: half a request line, then silence, held to the end
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"POST /v1/images/gen")
        half_open.append(sock)
    probe = HealthProbe(base)
    try:
        with ThreadPoolExecutor(13) as pool:
            futures = [pool.submit(_flood_big_headers, port, tally), pool.submit(_flood_oversized_bodies, port, tally),
                       pool.submit(_flood_model_names_and_rate, base, tally), pool.submit(_slow_bodies, port, tally),
                       pool.submit(_hostile_requests, base, tally, payloads),
                       pool.submit(_adapters_and_compute, base, tally, references)]
            hoarded = pool.submit(_hoard, base, tally)
            hung = pool.submit(_hang_the_worker, workers)
            futures += [pool.submit(_legit, base, tally, i) for i in range(4)]
            for future in futures:
                future.result(timeout=600)
            hoarded.result(timeout=600)
            hung.result(timeout=600)
        peak = process.memory_info().rss
    finally:
        probe.stop()
        for sock in half_open:
            sock.close()

    legit_total = sum(tally.legit.values()) + sum(1 for f in tally.legit_failures if "Error" in f)
    failures = len(tally.legit_failures)
    assert legit_total == 120
    assert failures <= legit_total // 100, (tally.legit_failures, tally.legit)  # ≥ 99 % served
    assert not tally.server_errors, tally.server_errors
    assert not tally.broken_promises, tally.broken_promises
    hostile = tally.hostile
    assert hostile["404 model_not_found"] and hostile["403 model_not_allowed"], hostile
    assert hostile["429 rate_limit_exceeded"], hostile  # the attacker's key ran out; the legit key did not
    assert hostile["413 request_too_large"] and hostile["431 headers_too_large"], hostile
    assert hostile["429 connection_limit_exceeded"] and hostile["408 body_timeout"], hostile  # slow bodies
    assert hostile["400 unsupported_aspect_ratio"] == 2 and hostile["400 invalid_value"] >= 6, hostile
    assert hostile["400 compute_budget_exceeded"] == 4, hostile
    assert not probe.failures and probe.latencies, probe.failures
    assert probe.median < 1.0 and probe.worst < HEALTH_WORST, (probe.median, probe.worst)
    assert peak - baseline < RSS_MARGIN, f"RSS grew by {(peak - baseline) / 2**20:.0f} MiB under attack"
    # Another key's flood expired none of the legitimate key's results or files (their TTL is an hour) ...
    legit_results = Counter(_stored_result_status(base, headers, job_id) for job_id in tally.legit_jobs)
    assert legit_results == Counter({"kept": 20}), legit_results
    assert httpx.get(legit_url, headers=headers, timeout=60).status_code == 200
    # ... while the hoarder, many times over its budgets, lost its own oldest (or had its newest refused).
    hoarder = {"Authorization": f"Bearer {HOARDER}"}
    hoarded_urls, hoarded_jobs = hoarded.result()["urls"], hoarded.result()["jobs"]
    assert len(hoarded_urls) == 16 and len(hoarded_jobs) == 14
    assert httpx.get(hoarded_urls[0], headers=hoarder, timeout=60).status_code == 404
    assert httpx.get(hoarded_urls[-1], headers=hoarder, timeout=60).status_code == 200
    hoarded_results = [_stored_result_status(base, hoarder, job_id) for job_id in hoarded_jobs]
    assert hoarded_results[0] == "410 result_expired" and hoarded_results[-1] == "kept", hoarded_results
    # The worker-mode server replaced its stopped worker; the queued jobs went on.
    worker = hung.result()
    outcomes = Counter(worker["outcomes"])
    assert set(outcomes) <= {"kept", "failed worker_unresponsive"} and outcomes["kept"] >= 2, worker
    assert worker["reaped"] and worker["replacement"] != worker["pid"] and worker["ready"] == 200, worker
    assert httpx.get(base + "/ready", timeout=30).status_code == 200
    metrics = httpx.get(base + "/metrics", timeout=30).text
    assert "made-up-model" not in metrics and 'model="qwen"' not in metrics
    print(f"\nhostile load: legit {dict(tally.legit)} failures {tally.legit_failures}; hostile {dict(hostile)}; "
          f"hoarder's results {dict(Counter(hoarded_results))}; hung worker's jobs {dict(outcomes)}; "
          f"RSS {baseline / 2**20:.0f} → {peak / 2**20:.0f} MiB; /health median {probe.median * 1000:.0f} ms, "
          f"worst {probe.worst * 1000:.0f} ms over {len(probe.latencies)} probes")
    assert server.stop() == 0
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def test_sigterm_mid_upload_answers_the_json_503(server_factory: Callable[..., Any]) -> None:
    server = server_factory({"FLUX_LOG_LEVEL": "INFO"}, name="upload")
    body = json.dumps({**SMALL, "prompt": "x" * 500}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")  # the app is reading the body now
        sock.sendall(body[:100])  # ... and part of it has arrived
        server.proc.send_signal(signal.SIGTERM)
        response = _read_until_closed(sock)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), response[:300]
    assert b"application/json" in head.lower()
    error = json.loads(payload)["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"
    assert server.proc.wait(60) == 0
    assert "Traceback" not in server.logs()
