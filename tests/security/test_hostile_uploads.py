"""Uploads cost what their bounds say, checked before the work starts.

- A 49 KB PNG that declares 16777216×1 pixels is refused from its header (the aspect ratio no output size
  can keep), where it used to decode 48 MB and then narrow the width 16 pixels at a time for 13–24 s of CPU
  on a thread that encodes every client's images; the auto size is closed form.
- JSON edits carry images of megabytes as data URLs (a rule for 100 000-character strings refused any over
  ≈ 73 KB); their bodies are parsed once, off the event loop, while /health answers; and large bodies hold
  at most FLUX_BODY_MEMORY_BYTES together, half of it per client.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from .helpers import HealthProbe, assert_openai_error, connect, read_all, serve_in_thread, status_and_error

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
SMALL = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1}


def _png(image: Image.Image, compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _stepwise_auto_size(width: int, height: int, m: int, min_size: int, max_size: int,
                        max_pixels: int) -> tuple[int, int]:
    """The definition the closed form must meet: scale, round, then shorten the longer side one multiple at a
    time until the limits hold (what the server used to run, for inputs small enough to loop over)."""
    scale = min(1.0, max_size / max(width, height), (max_pixels / (width * height)) ** 0.5)
    scale = max(scale, min_size / min(width, height)) if min(width, height) * scale < min_size else scale
    w = max(m, int(width * scale / m + 0.5) * m)
    h = max(m, int(height * scale / m + 0.5) * m)
    while w * h > max_pixels or w > max_size or h > max_size:
        w, h = (w - m, h) if w >= h else (w, h - m)
    lo = -(-min_size // m) * m
    return max(w, lo), max(h, lo)


@pytest.mark.timeout(30)
def test_auto_size_is_closed_form_and_meets_its_definition() -> None:
    from fluxserve.api.editing import auto_size

    # 2^40 × 1 would take the stepwise form some 10^11 steps; the closed form answers at once.
    assert auto_size(2**40, 1, multiple=16, min_size=64, max_size=2048, max_pixels=2048 * 2048) == (2048, 64)
    rng = np.random.default_rng(7)
    for _ in range(20_000):
        m = int(rng.choice([8, 16, 32, 64]))
        min_size, max_size = int(rng.choice([64, 128, 256])), int(rng.choice([256, 512, 1024, 2048]))
        max_pixels = int(rng.choice([128 * 128, 256 * 256, 512 * 768, 1024 * 1024, 2048 * 2048]))
        if max_pixels < min_size * min_size:
            continue
        width = int(rng.integers(1, 5000))
        ratio = max_size // min_size  # within the aspect ratio the server accepts
        height = int(rng.integers(max(1, math.ceil(width / ratio)), min(5000, width * ratio) + 1))
        expected = _stepwise_auto_size(width, height, m, min_size, max_size, max_pixels)
        assert auto_size(width, height, multiple=m, min_size=min_size, max_size=max_size,
                         max_pixels=max_pixels) == expected, (width, height, m, min_size, max_size, max_pixels)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_16777216x1_png_is_refused_from_its_header_while_others_are_served(
        server_factory: Callable[..., Any]) -> None:
    server = server_factory({"FLUX_LOG_LEVEL": "WARNING"}, name="strip")
    strip = _png(Image.new("RGB", (16_777_216, 1), (90, 90, 90)), compress_level=9)
    assert len(strip) < 100_000  # about 49 KB on the wire; 48 MB once decoded
    base = server.base_url
    with ThreadPoolExecutor(3) as pool:
        uploads = [pool.submit(httpx.post, base + EDIT, data={"prompt": "wider", "size": "auto"},
                               files={"image": ("strip.png", strip, "image/png")}, timeout=200) for _ in range(2)]
        legit = pool.submit(httpx.post, base + GEN, json=SMALL, timeout=200)
        for upload in uploads:
            error = assert_openai_error(upload.result(), 400, param="image", code="unsupported_aspect_ratio")
            assert "16777216x1" in error["message"] and "FLUX_MAX_SIZE / FLUX_MIN_SIZE" in error["message"]
        assert legit.result().status_code == 200
    assert httpx.get(base + "/ready", timeout=30).status_code == 200


def _noise_png(width: int, height: int, seed: int) -> bytes:
    return _png(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_large_json_edits_are_served_while_health_answers(server_factory: Callable[..., Any]) -> None:
    server = server_factory({"FLUX_MAX_SIZE": "128", "FLUX_MAX_PIXELS": str(128 * 128), "FLUX_LOG_LEVEL": "WARNING"},
                            name="bigjson")
    base = server.base_url
    image = _noise_png(1600, 1200, seed=1)  # about 5.8 MB: its data URL is some 7.7 MB of JSON string
    body = {"prompt": "a storm", "image": "data:image/png;base64," + base64.b64encode(image).decode(),
            "num_inference_steps": 2, "strength": 1.0}

    def edit() -> httpx.Response:
        return httpx.post(base + EDIT, json=body, timeout=200)

    warm = edit()
    assert warm.status_code == 200, warm.text[:300]  # before: 400, "must be at most 100000 characters"
    process = psutil.Process(server.proc.pid)
    baseline = process.memory_info().rss
    probe = HealthProbe(base)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [future.result() for future in [pool.submit(edit) for _ in range(8)]]
    finally:
        probe.stop()
    grown = process.memory_info().rss - baseline
    for answer in answers:
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["size"] == "128x96"
    # The loop never blocks on a body (median well under a second); a loaded 2-core runner may delay one probe.
    assert not probe.failures and probe.latencies and probe.median < 1.0 and probe.worst < 5.0, (
        probe.failures, probe.median, probe.worst)
    assert grown < 512 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    too_many = httpx.post(base + EDIT, json={**body, "style": [0] * 20_000}, timeout=60)
    assert_openai_error(too_many, 400, param="style", code="json_too_complex")
    print(f"\n8 JSON edits of {len(json.dumps(body)) / 2**20:.1f} MiB: /health worst {probe.worst * 1000:.0f} ms "
          f"over {len(probe.latencies)} probes; RSS +{grown / 2**20:.0f} MiB")


def _held_body(port: int, key: str, length: int) -> Any:
    """A connection whose large JSON body the server has started to read (it answered "100 Continue")."""
    sock = connect(port)
    sock.sendall(b"POST /v1/images/cancel HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: %d\r\n"
                 b"Expect: 100-continue\r\n\r\n" % length)
    return sock


def _first_line(sock: Any) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
        data += chunk
    return data


def _padded(length: int) -> bytes:
    body = b'{"request_id": "none-such"}'
    return body + b" " * (length - len(body))  # whitespace: megabytes that parse to one small object


def test_large_bodies_share_the_body_memory_budget(make_settings: Callable[..., Any]) -> None:
    keys = ["sk-first-0123456789abcdef", "sk-second-0123456789abcde", "sk-third-0123456789abcdef"]
    length = 8_000_000  # each reserves 16 MB (its bytes and its parse) of the 64 MB budget
    settings = make_settings(api_keys=keys, max_body_bytes=length, max_edit_body_bytes=length,
                             body_memory_bytes=64_000_000, header_timeout=30)
    with serve_in_thread(settings) as (port, _):
        held = []
        try:
            # 1. One key holds two large bodies: half the budget. Its third is refused before it is read.
            for key in (keys[0], keys[0]):
                held.append(_held_body(port, key, length))
                assert _first_line(held[-1]).startswith(b"HTTP/1.1 100 ")
            with _held_body(port, keys[0], length) as sock:
                status, error = status_and_error(read_all(sock))
            assert (status, error["code"]) == (429, "body_memory_limit_exceeded"), error
            # 2. A second key holds the other half; the server's budget is spent: a large body is 503,
            #    a small one is still served.
            for key in (keys[1], keys[1]):
                held.append(_held_body(port, key, length))
                assert _first_line(held[-1]).startswith(b"HTTP/1.1 100 ")
            with _held_body(port, keys[2], length) as sock:
                response = read_all(sock)
                status, error = status_and_error(response)
            assert (status, error["code"]) == (503, "server_busy") and b"retry-after: 1" in response.lower()
            small = httpx.post(f"http://127.0.0.1:{port}/v1/images/cancel", json={"request_id": "none-such"},
                               headers={"Authorization": f"Bearer {keys[2]}"}, timeout=30)
            assert small.json()["error"]["code"] == "job_not_found"
            # 3. Bodies that complete give their memory back: the third key's large body is then read.
            for sock in held[:2]:
                sock.sendall(_padded(length))
                assert b'"job_not_found"' in _first_line(sock) + sock.recv(4096)
            large = httpx.post(f"http://127.0.0.1:{port}/v1/images/cancel", content=_padded(length),
                               headers={"Authorization": f"Bearer {keys[2]}", "Content-Type": "application/json"},
                               timeout=60)
            assert large.json()["error"]["code"] == "job_not_found"
        finally:
            for sock in held:
                sock.close()
