"""Start-up announcements: systemd's readiness protocol (``NOTIFY_SOCKET``), to a path or an abstract address,
and the "ready — open …" log line. Every real-server test waits on ``READY=1``
(``tests.conftest.ReadinessSocket``); these cover the rest."""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fluxserve.server import browser_url, notify_service_manager
from tests.conftest import ServerProcess


def test_a_datagram_goes_to_a_socket_path(tmp_path: Path) -> None:
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notify_service_manager(path, "STOPPING=1")
        sock.settimeout(10)
        assert sock.recv(100) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract socket addresses are Linux-only")
def test_an_at_address_is_the_abstract_namespace() -> None:
    name = f"fluxserve-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notify_service_manager("@" + name, "READY=1\nSTATUS=ready")
        sock.settimeout(10)
        assert sock.recv(100) == b"READY=1\nSTATUS=ready"


def test_no_address_sends_nothing_and_a_dead_one_is_only_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    notify_service_manager(None, "READY=1")
    notify_service_manager(str(tmp_path / "nobody-listens"), "READY=1")
    assert "could not notify the service manager" in caplog.text


def test_the_url_to_open_is_the_bound_address_reached_from_this_machine() -> None:
    assert browser_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert browser_url("0.0.0.0", 9000) == "http://127.0.0.1:9000/"
    assert browser_url("::", 8000) == "http://[::1]:8000/"
    assert browser_url("0.0.0.0", 8000, "https://images.example.com/base/") == "https://images.example.com/base/"


@pytest.mark.e2e
def test_the_log_says_ready_and_where_to_open_once_ready_answers_200(
        server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory()  # returns once READY=1 came, which is sent right after the line below is logged
    line = server.wait_for_log(lambda text: "ready — open" in text)
    assert f"ready — open http://127.0.0.1:{server.port}/" in line
    assert httpx.get(f"{server.base_url}/ready", timeout=30).status_code == 200
    running = server.wait_for_log(lambda text: "Uvicorn running on" in text)  # uvicorn's own line, while loading
    assert server.logs().index(running) < server.logs().index(line)
