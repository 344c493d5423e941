"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM/SIGINT the runtime stops accepting jobs at once (new requests get 503 ``shutting_down``,
``/ready`` turns 503), uvicorn stops accepting connections and waits up to FLUX_SHUTDOWN_TIMEOUT for
in-flight requests, then the lifespan drains what is still queued and cancels the rest.
"""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from fluxserve.api.app import create_app
from fluxserve.runtime import Runtime
from fluxserve.settings import Settings

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.runtime.shutting_down:
            log.info("shutdown requested (signal %s): finishing in-flight and queued jobs", sig)
            self.runtime.begin_shutdown()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> int:
    runtime = Runtime(settings)  # resolves devices now: a bad FLUX_DEVICE/FLUX_DTYPE stops start-up here
    app = create_app(settings, runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout) or None,
                            access_log=False, proxy_headers=False)
    server = GracefulServer(config, runtime)
    server.run()
    return 0
