"""Webhook delivery: signed POSTs from the job store's outbox, retried, on threads of their own.

When a job with a ``webhook_url`` ends, its terminal transition puts one delivery in the job store's
outbox (same transaction). :class:`WebhookDispatcher` takes due deliveries from the outbox and sends
each on a small thread pool:

* signed per the Standard Webhooks specification with the ``standardwebhooks`` library: headers
  ``webhook-id`` (the delivery's id, the same on every attempt: receivers deduplicate by it),
  ``webhook-timestamp`` (the attempt's time) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` of
  ``id.timestamp.body`` with FLUX_WEBHOOK_SECRET);
* a 2xx answer delivers; anything else (another status, a redirect, a timeout, a refused connection)
  is retried after ``retry_base × 2^(attempt-1)`` seconds (at most ``retry_max``, plus up to 10%
  jitter) until ``max_attempts`` attempts were made, then given up. A URL that no longer passes the
  SSRF rules (:mod:`.urls`, checked again before each attempt) is given up at once;
* each attempt is recorded on the job (``webhook: {attempts, last_status, state}``) — so delivery is at
  least once, and survives restarts: pending deliveries stay in the outbox, and one taken by a process
  that died is taken again after its hold time;
* generation never waits for a receiver: the transition only writes the outbox row, and a slow
  receiver holds one of ``concurrency`` delivery threads for at most ``timeout`` per network operation.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from standardwebhooks import Webhook

from fluxserve import __version__
from fluxserve.storage.jobstore.protocol import JobStore, JobStoreError, WebhookDelivery, new_worker_id
from fluxserve.webhooks.urls import AllowedHosts, Resolver, WebhookTarget, WebhookURLError, validate_webhook_url

if TYPE_CHECKING:
    from fluxserve.config import WebhooksConfig

log = logging.getLogger(__name__)

IDLE_POLL = 1.0
"""Seconds the dispatcher waits at most between looks at the outbox (other processes sharing a
PostgreSQL store add deliveries it is not told about)."""
MAX_ANSWER_BYTES = 64 * 1024
"""Of a receiver's answer body, at most this much is read (and discarded)."""


@dataclass(frozen=True)
class WebhookConfig:
    """The FLUX_WEBHOOK_* settings."""

    secret: str
    allowed: AllowedHosts
    max_attempts: int = 8
    retry_base: float = 2.0
    retry_max: float = 600.0
    timeout: float = 10.0
    concurrency: int = 4

    @classmethod
    def from_settings(cls, settings: WebhooksConfig) -> WebhookConfig | None:
        """None when webhooks are off (no secret, or no allowed hosts)."""
        if settings.webhook_secret is None or not settings.webhook_allowed_hosts:
            return None
        return cls(secret=settings.webhook_secret.get_secret_value(),
                   allowed=AllowedHosts.parse(settings.webhook_allowed_hosts),
                   max_attempts=settings.webhook_max_attempts, retry_base=settings.webhook_retry_base,
                   retry_max=settings.webhook_retry_max, timeout=settings.webhook_timeout,
                   concurrency=settings.webhook_concurrency)

    def backoff(self, attempts_made: int, jitter: float | None = None) -> float:
        """Seconds before the next attempt after ``attempts_made`` failed ones."""
        delay = min(self.retry_max, self.retry_base * 2 ** max(0, attempts_made - 1))
        return delay * (1 + 0.1 * (random.random() if jitter is None else jitter))


@dataclass(frozen=True)
class Attempt:
    """How one attempt went: ``final`` means retrying cannot help (the URL is no longer allowed)."""

    status: int | None
    error: str | None
    delivered: bool
    final: bool = False


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, whatever the host name would resolve to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)  # the certificate must name the host


class WebhookSender:
    """Sends one signed attempt of a delivery."""

    def __init__(self, config: WebhookConfig, *, resolver: Resolver = socket.getaddrinfo,
                 tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self._signer = Webhook(config.secret)
        self._resolver = resolver
        self._tls = tls or ssl.create_default_context()

    def headers(self, delivery: WebhookDelivery, at: datetime) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "user-agent": f"fluxserve-webhooks/{__version__}",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._signer.sign(delivery.id, at, delivery.payload),
        }

    def send(self, delivery: WebhookDelivery) -> Attempt:
        try:
            target = validate_webhook_url(delivery.url, self.config.allowed, resolver=self._resolver)
        except WebhookURLError as exc:
            return Attempt(None, f"not sent: {exc}", delivered=False, final=True)
        headers = self.headers(delivery, datetime.now(UTC))
        error = "no address"
        for address in target.addresses:  # the next address only when connecting failed
            connection = self._connection(target, address)
            try:
                connection.connect()
            except OSError as exc:
                error = f"connection to the receiver failed ({type(exc).__name__})"
                connection.close()
                continue
            try:
                connection.request("POST", target.target, body=delivery.payload, headers=headers)
                answer = connection.getresponse()
                answer.read(MAX_ANSWER_BYTES)
                status = answer.status
            except (OSError, http.client.HTTPException) as exc:
                kind = "timed out" if isinstance(exc, TimeoutError) else f"failed ({type(exc).__name__})"
                return Attempt(None, f"the receiver {kind}", delivered=False)
            finally:
                connection.close()
            delivered = 200 <= status < 300
            return Attempt(status, None if delivered else f"HTTP {status}", delivered=delivered)
        return Attempt(None, error, delivered=False)

    def _connection(self, target: WebhookTarget, address: str) -> http.client.HTTPConnection:
        if target.scheme == "https":
            return _PinnedHTTPSConnection(target.host, target.port, address, self.config.timeout, self._tls)
        return _PinnedHTTPConnection(target.host, target.port, address, self.config.timeout)


AttemptHook = Callable[[WebhookDelivery, Attempt], None]
"""Told of every attempt (metrics); must not block."""


@dataclass
class WebhookDispatcher:
    """The delivery worker: one thread watches the outbox, ``concurrency`` threads send."""

    store: JobStore
    config: WebhookConfig
    sender: WebhookSender | None = None
    worker: str = field(default_factory=new_worker_id)
    on_attempt: AttemptHook | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.sender = self.sender or WebhookSender(self.config)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    @property
    def hold(self) -> float:
        """How long a taken delivery stays with this process before another may take it."""
        return 2 * self.config.timeout + 30

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="fluxserve-webhook")
        self._thread = threading.Thread(target=self._run, name="fluxserve-webhooks", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A delivery was just added (call after a terminal transition): look at the outbox now."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking deliveries; attempts in flight finish (each within the delivery timeout)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self) -> None:
        assert self._pool is not None
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: a notify from now on is either seen below or wakes the wait
            wait = IDLE_POLL
            try:
                with self._lock:
                    free = self.config.concurrency - self._in_flight
                if free > 0:
                    for delivery in self.store.due_deliveries(self.worker, limit=free, hold=self.hold):
                        with self._lock:
                            self._in_flight += 1
                        self._pool.submit(self._attempt, delivery)
                due = self.store.next_delivery_at()
                if due is not None:
                    wait = min(IDLE_POLL, max(0.0, due - self.clock()))
            except JobStoreError as exc:  # the database is away: deliveries wait in the outbox
                log.warning("webhook outbox unavailable: %s", exc)
            self._wake.wait(wait)

    def _attempt(self, delivery: WebhookDelivery) -> None:
        try:
            assert self.sender is not None
            attempt = self.sender.send(delivery)
            made = delivery.attempts + 1
            retry_at = None
            if not (attempt.delivered or attempt.final or made >= self.config.max_attempts):
                retry_at = self.clock() + self.config.backoff(made)
            self.store.delivery_attempted(delivery.id, status=attempt.status, error=attempt.error,
                                          delivered=attempt.delivered, retry_at=retry_at)
            if self.on_attempt is not None:
                self.on_attempt(delivery, attempt)
            log.info("webhook attempt", extra={"ctx": {  # last: once logged, the attempt is recorded and counted
                "job_id": delivery.job_id, "webhook_id": delivery.id, "event": delivery.event_type,
                "attempt": made, "status": attempt.status, "delivered": attempt.delivered,
                "given_up": retry_at is None and not attempt.delivered, "error": attempt.error}})
        except JobStoreError as exc:  # recorded nowhere: the delivery is taken again after its hold time
            log.warning("could not record a webhook attempt: %s", exc)
        except Exception:
            log.exception("webhook attempt failed", extra={"ctx": {"webhook_id": delivery.id}})
        finally:
            with self._lock:
                self._in_flight -= 1
            self._wake.set()
