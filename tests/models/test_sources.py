"""Whether a model can load here (torch-free): the hub check against a real local HTTP server and a closed port."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxserve.models.registry import BUILTIN_MODELS, resolve_model
from fluxserve.models.sources import HUB_CHECK_SECONDS, ModelSources, hub_answers


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # the name http.server calls
        self.send_response(404 if self.path.startswith("/missing") else 200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sources_in(cache_dir: Path, hub_downloads: Any = "auto", **kwargs: Any) -> ModelSources:
    """Sources over an empty cache: a hub model is loadable only by download."""
    return ModelSources(cache_dir=cache_dir, revision=None, hub_downloads=hub_downloads, hub_token=None, **kwargs)


@pytest.fixture
def closed() -> str:
    """An address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_any_http_answer_means_the_hub_is_reachable(hub: str, closed: str) -> None:
    assert hub_answers(hub) and hub_answers(hub + "/missing")  # a 404 is an answer too
    assert not hub_answers(closed)
    assert not hub_answers("not a url")


def test_auto_asks_the_hub_at_most_once_a_minute(tmp_path: Path, hub: str, closed: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is set in this environment: downloads are off whatever the hub says")
    now, target, asked = [0.0], [hub], []

    def probe(endpoint: str) -> bool:
        asked.append(endpoint)
        return hub_answers(target[0])

    sources = sources_in(tmp_path, "auto", probe=probe, clock=lambda: now[0])
    schnell, dev = BUILTIN_MODELS["schnell"], BUILTIN_MODELS["dev"]
    assert sources.loadable(schnell) and sources.downloads()
    assert not sources.loadable(dev)  # gated: no download without a token
    assert asked == [constants.ENDPOINT]  # one check, then its answer is remembered
    target[0] = closed
    now[0] = HUB_CHECK_SECONDS / 2
    assert sources.loadable(schnell) and len(asked) == 1
    now[0] = HUB_CHECK_SECONDS + 1
    assert not sources.loadable(schnell) and len(asked) == 2
    assert sources.loadable(BUILTIN_MODELS["tiny-flux"])  # built offline: never asks


def test_off_and_on_never_ask(tmp_path: Path) -> None:
    def probe(endpoint: str) -> bool:
        raise AssertionError("the hub was asked")

    schnell = BUILTIN_MODELS["schnell"]
    assert not sources_in(tmp_path, "off", probe=probe).loadable(schnell)
    from huggingface_hub import constants

    on = sources_in(tmp_path, "on", probe=probe)
    assert on.loadable(schnell) is not constants.HF_HUB_OFFLINE


def test_a_local_directory_loads_when_it_holds_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    spec = resolve_model(str(tmp_path))
    sources = sources_in(tmp_path / "cache", "off")
    assert sources.loadable(spec)
    (tmp_path / "model_index.json").unlink()
    assert not sources.loadable(spec)
