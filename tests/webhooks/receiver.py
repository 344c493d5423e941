"""A webhook receiver for tests: a real HTTP server on loopback that records what it is sent."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

WAIT = 60.0
"""Seconds a test waits at most for a condition (a loaded runner is slow; nothing waits this long when it works)."""


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny HTTP server on loopback that records what it is sent and answers ``statuses`` in turn
    (the last one repeats); with ``hang`` set, it holds each request until the test releases it."""

    statuses: list[int] = field(default_factory=lambda: [204])
    hang: bool = False
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.changed:
                    receiver.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                    index = len(receiver.received) - 1
                    receiver.changed.notify_all()
                if receiver.hang:
                    receiver.release.wait(WAIT)
                    return  # no answer: the sender times out
                self.send_response(receiver.statuses[min(index, len(receiver.statuses) - 1)])
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fluxserve"

    def wait_for(self, count: int) -> list[Received]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.received) >= count, WAIT), self.received
            return list(self.received)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


