"""Whether this server can load a model now: built offline (the tiny models), a local diffusers directory, a
snapshot already in the hub cache, or a download from the hub while downloads are allowed
(FLUX_HUB_DOWNLOADS, HF_HUB_OFFLINE) and the hub answers. Gated repos download only with a token (HF_TOKEN).

Torch-free, and given only the settings it reads: ``GET /v1/models`` asks it (off the event loop: the hub check
is a network round trip).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fluxserve.models.spec import ModelSpec

HUB_CHECK_SECONDS = 60.0
"""How long an answer of :func:`hub_answers` is trusted."""


def hub_answers(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint answers HTTP at all (any status counts: it is reachable)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # no route, no name, refused, timed out
        return False


class ModelSources:
    """Answers :meth:`loadable` for one server; the hub check is cached (thread-safe).

    ``cache_dir``, ``revision``, ``hub_downloads`` and ``hub_token`` are FLUX_CACHE_DIR, FLUX_REVISION,
    FLUX_HUB_DOWNLOADS and HF_TOKEN."""

    def __init__(self, *, cache_dir: Path, revision: str | None, hub_downloads: Literal["auto", "on", "off"],
                 hub_token: str | None, probe: Callable[[str], bool] = hub_answers,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_dir = cache_dir
        self.revision = revision
        self.hub_downloads = hub_downloads
        self.hub_token = hub_token
        self._probe = probe
        self._clock = clock
        self._lock = threading.Lock()
        self._checked: tuple[float, bool] | None = None

    def loadable(self, spec: ModelSpec) -> bool:
        """Whether loading ``spec`` here can succeed without anyone changing the machine (blocking: the first
        question about a hub model in a minute may wait for the hub check)."""
        if spec.tiny is not None:
            return True
        if Path(spec.source).is_absolute():
            return (Path(spec.source) / "model_index.json").is_file()
        if self.cached(spec):
            return True
        if spec.gated and not self.hub_token:
            return False
        return self.downloads()

    def cached(self, spec: ModelSpec) -> bool:
        """A snapshot of the repo (its ``model_index.json``, at FLUX_REVISION) is in FLUX_CACHE_DIR."""
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(spec.source, "model_index.json", cache_dir=self.cache_dir / "hub",
                                           revision=self.revision)
        except ValueError:  # not a repo id
            return False
        return isinstance(found, str)

    def downloads(self) -> bool:
        """Whether hub downloads can happen now: allowed (FLUX_HUB_DOWNLOADS, HF_HUB_OFFLINE) and, in ``auto``,
        the hub answered its last check."""
        from huggingface_hub import constants

        mode = self.hub_downloads
        if mode == "off" or constants.HF_HUB_OFFLINE:
            return False
        if mode == "on":
            return True
        with self._lock:  # one check at a time; the others wait for its answer
            now = self._clock()
            if self._checked is None or now - self._checked[0] > HUB_CHECK_SECONDS:
                self._checked = (now, self._probe(constants.ENDPOINT))
            return self._checked[1]
