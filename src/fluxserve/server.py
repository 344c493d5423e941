"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM/SIGINT:

1. the runtime stops accepting jobs at once: new generation requests get 503 ``shutting_down`` and
   ``/ready`` turns 503, while the server keeps listening (a load balancer sees the 503s, not refused
   connections);
2. queued and running jobs go on, for up to FLUX_SHUTDOWN_TIMEOUT seconds; what is still unfinished
   then is cancelled, and its clients get 503 ``shutting_down`` ("the server is shutting down; the job
   was cancelled"). A second signal cancels at once;
3. uvicorn then stops listening and gives open responses up to ``RESPONSE_GRACE`` seconds to be sent;
4. the lifespan closes the runtime: encoder threads finish (every image being saved is complete),
   workers stop, logs are flushed, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from fluxserve.api.app import create_app
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings, SettingsError

log = logging.getLogger(__name__)

RESPONSE_GRACE = 5
"""Seconds uvicorn waits, after the jobs are drained, for responses still being written."""


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.cancelled_jobs = 0
        self._drainer: threading.Thread | None = None
        self._hurry = threading.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's own version re-raises the signal after its shutdown, so the process would die of
        SIGTERM (status -15) instead of exiting 0 after a clean drain; this one only installs handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drainer is None:
            log.info("shutdown requested (signal %s): finishing in-flight and queued jobs for up to %gs", sig,
                     self.runtime.settings.shutdown_timeout)
            self.runtime.begin_shutdown()
            self._drainer = threading.Thread(target=self._drain, name="shutdown-drain", daemon=True)
            self._drainer.start()
        else:
            log.warning("second signal (%s): cancelling the remaining jobs now", sig)
            self._hurry.set()

    def _drain(self) -> None:
        """Wait for queued and running jobs (up to FLUX_SHUTDOWN_TIMEOUT), cancel the rest, then let
        uvicorn stop."""
        scheduler = self.runtime.scheduler
        deadline = time.monotonic() + self.runtime.settings.shutdown_timeout
        try:
            while time.monotonic() < deadline and not self._hurry.is_set():
                stats = scheduler.stats()
                if not stats["queue_depth"] and not stats["jobs_in_flight"]:
                    break
                self._hurry.wait(0.05)
            self.cancelled_jobs = scheduler.drain(0)
            if self.cancelled_jobs:
                log.warning("shutdown timeout: cancelled %d unfinished job(s)", self.cancelled_jobs)
        finally:
            self.should_exit = True


def _check_auth_settings(settings: Settings) -> None:
    """An API-keys file that is missing or empty must stop start-up, not silently turn auth off."""
    try:
        keys = settings.all_api_keys()
    except OSError as exc:
        raise SettingsError(f"FLUX_API_KEYS_FILE={settings.api_keys_file}: cannot read it ({exc.strerror})") from None
    if settings.api_keys_file is not None and not keys:
        raise SettingsError(f"FLUX_API_KEYS_FILE={settings.api_keys_file}: no keys in it (one key per line); "
                            "refusing to start without authentication")
    if not keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without API keys: anyone who can reach this address can use the server "
                    "(set FLUX_API_KEYS or FLUX_API_KEYS_FILE)", settings.host)


def serve(settings: Settings) -> int:
    _check_auth_settings(settings)
    runtime = Runtime(settings)  # resolves devices now: a bad FLUX_DEVICE/FLUX_DTYPE stops start-up here
    app = create_app(settings, runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=RESPONSE_GRACE,
                            access_log=False, proxy_headers=False)
    server = GracefulServer(config, runtime)
    server.run()
    log.info("exited cleanly", extra={"ctx": {"cancelled_jobs": server.cancelled_jobs}})
    for handler in logging.getLogger().handlers:
        handler.flush()
    return 0
