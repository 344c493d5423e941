"""systemd's readiness protocol (``NOTIFY_SOCKET``): what fluxserve sends, to a path or an abstract address.
Every real-server test waits on ``READY=1`` (``tests.conftest.ReadinessSocket``); these cover the rest."""

from __future__ import annotations

import socket
import sys
import uuid
from pathlib import Path

import pytest

from fluxserve.server import notify_service_manager


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
