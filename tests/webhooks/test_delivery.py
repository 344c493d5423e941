"""Webhook delivery against real receivers on loopback, on both job stores: signed per Standard Webhooks
(checked with the library's verifier), retried with a stable id, given up after the bounded attempts,
resumed after a restart, and never held up by a slow receiver."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from standardwebhooks import Webhook

from fluxserve.storage.jobstore.protocol import NewJob, ResultRef
from fluxserve.webhooks.delivery import Attempt, WebhookConfig, WebhookDispatcher
from fluxserve.webhooks.urls import AllowedHosts
from tests.webhooks.receiver import WAIT, Received, Receiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def config(**changes: Any) -> WebhookConfig:
    values: dict[str, Any] = {"secret": SECRET, "allowed": AllowedHosts.parse(["127.0.0.1"]), "max_attempts": 3,
                              "retry_base": 0.05, "retry_max": 0.2, "timeout": 5.0, "concurrency": 2}
    values.update(changes)
    return WebhookConfig(**values)


class Attempts:
    """Collects the dispatcher's attempts and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Attempt]] = []
        self._changed = threading.Condition()

    def __call__(self, delivery: Any, attempt: Attempt) -> None:
        with self._changed:
            self.seen.append((delivery.job_id, attempt))
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, Attempt]]], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.seen), WAIT), self.seen


@pytest.fixture
def dispatchers() -> Iterator[Callable[..., WebhookDispatcher]]:
    started: list[WebhookDispatcher] = []

    def start(store: Any, cfg: WebhookConfig, **options: Any) -> WebhookDispatcher:
        dispatcher = WebhookDispatcher(store, cfg, **options)
        dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        dispatcher.stop()


def finish(store: Any, job_id: str, url: str, *, succeed: bool = True) -> None:
    store.create(NewJob(id=job_id, owner="key:abcd", model="tiny-flux", request={"prompt": "a red kite"},
                        seeds=[42], webhook_url=url))
    if succeed:
        store.claim_next("w1")
        assert store.mark_succeeded(job_id, results=[ResultRef(f"{job_id}/0.png", "image/png", 100)],
                                    result_meta={"seeds": [42]})
    else:
        assert store.mark_cancelled(job_id)


def verified(received: Received) -> dict[str, Any]:
    """The payload, after the Standard Webhooks library checked its signature (it raises otherwise)."""
    payload: dict[str, Any] = Webhook(SECRET).verify(received.body, received.headers)
    return payload


def test_a_finished_job_is_posted_signed_and_the_job_records_the_delivery(
        open_store: Any, receivers: Callable[..., Receiver], dispatchers: Callable[..., WebhookDispatcher]) -> None:
    receiver = receivers(statuses=[204])
    store = open_store()
    dispatcher = dispatchers(store, config())
    finish(store, "img_ok", receiver.url)
    dispatcher.notify()
    (received,) = receiver.wait_for(1)
    payload = verified(received)
    assert payload["type"] == "job.succeeded" and payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert (data["id"], data["status"], data["seeds"], data["images"]) == ("img_ok", "succeeded", [42], 1)
    assert "owner" not in data and received.headers["content-type"] == "application/json"
    assert received.headers["webhook-id"].startswith("msg_")
    with pytest.raises(Exception, match="signature"):  # a forged body does not verify
        Webhook(SECRET).verify(received.body.replace(b"img_ok", b"img_xx"), received.headers)
    with pytest.raises(Exception, match="signature"):  # nor does another secret
        Webhook(base64.b64encode(secrets.token_bytes(32)).decode()).verify(received.body, received.headers)
    record = _wait_webhook_state(store, "img_ok", "delivered")
    assert record.public()["webhook"] == {"attempts": 1, "last_status": 204, "state": "delivered"}


def _wait_webhook_state(store: Any, job_id: str, state: str) -> Any:
    """The job's webhook record once the dispatcher has recorded ``state`` (it records right after the answer)."""
    done = threading.Event()
    record: list[Any] = []

    def watch() -> None:
        while not done.is_set():
            current = store.load(job_id)
            if current.webhook is not None and current.webhook.state == state:
                record.append(current)
                done.set()
                return
            done.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    finished = done.wait(WAIT)
    done.set()
    watcher.join(WAIT)
    assert finished, store.load(job_id)
    return record[0]


def test_failed_attempts_are_retried_with_the_same_id_until_one_succeeds(
        open_store: Any, receivers: Callable[..., Receiver], dispatchers: Callable[..., WebhookDispatcher]) -> None:
    receiver = receivers(statuses=[500, 503, 200])
    store = open_store()
    attempts = Attempts()
    dispatcher = dispatchers(store, config(max_attempts=5), on_attempt=attempts)
    finish(store, "img_retry", receiver.url, succeed=False)
    dispatcher.notify()
    attempts.wait_for(lambda seen: len(seen) == 3)
    received = receiver.wait_for(3)
    assert [a.status for _, a in attempts.seen] == [500, 503, 200]
    assert len({r.headers["webhook-id"] for r in received}) == 1  # one id: the receiver deduplicates by it
    assert all(verified(r)["type"] == "job.cancelled" for r in received)  # each attempt signed afresh
    record = store.load("img_retry")
    assert record.public()["webhook"] == {"attempts": 3, "last_status": 200, "state": "delivered"}


def test_a_receiver_that_keeps_failing_is_given_up_after_the_bounded_attempts(
        open_store: Any, receivers: Callable[..., Receiver], dispatchers: Callable[..., WebhookDispatcher]) -> None:
    receiver = receivers(statuses=[503])
    store = open_store()
    attempts = Attempts()
    dispatcher = dispatchers(store, config(max_attempts=3), on_attempt=attempts)
    finish(store, "img_down", receiver.url)
    dispatcher.notify()
    attempts.wait_for(lambda seen: len(seen) == 3)
    record = store.load("img_down")
    assert record.public()["webhook"] == {"attempts": 3, "last_status": 503, "state": "failed"}
    assert store.next_delivery_at() is None  # nothing left to send: no fourth attempt will come
    assert len(receiver.received) == 3


def test_a_slow_receiver_holds_up_neither_the_jobs_nor_other_deliveries(
        open_store: Any, receivers: Callable[..., Receiver], dispatchers: Callable[..., WebhookDispatcher]) -> None:
    slow = receivers(hang=True)
    fast = receivers(statuses=[200])
    store = open_store()
    attempts = Attempts()
    dispatcher = dispatchers(store, config(max_attempts=2, timeout=0.5, concurrency=2), on_attempt=attempts)
    finish(store, "img_slow", slow.url)
    dispatcher.notify()
    slow.wait_for(1)  # the slow receiver now holds a delivery thread
    for index in range(3):  # jobs still end at once, and their webhooks go out
        finish(store, f"img_fast_{index}", fast.url)
        dispatcher.notify()
    assert len(fast.wait_for(3)) == 3
    assert not slow.release.is_set()  # all that happened while the slow receiver still held its request
    attempts.wait_for(lambda seen: sum(job == "img_slow" for job, _ in seen) == 2)
    slow.release.set()
    record = store.load("img_slow")
    assert record.webhook.state == "failed" and record.webhook.last_status is None and record.webhook.attempts == 2
    assert [a.error for job, a in attempts.seen if job == "img_slow"] == ["the receiver timed out"] * 2


def test_a_dead_receiver_is_retried_then_given_up(open_store: Any, dispatchers: Callable[..., WebhookDispatcher]
                                                  ) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store()
    attempts = Attempts()
    dispatcher = dispatchers(store, config(max_attempts=2), on_attempt=attempts)
    finish(store, "img_dead", f"http://127.0.0.1:{port}/hook")
    dispatcher.notify()
    attempts.wait_for(lambda seen: len(seen) == 2)
    assert [a.error for _, a in attempts.seen] == ["connection to the receiver failed (ConnectionRefusedError)"] * 2
    assert store.load("img_dead").webhook.state == "failed"


def test_pending_deliveries_survive_a_restart(open_store: Any, receivers: Callable[..., Receiver],
                                              dispatchers: Callable[..., WebhookDispatcher]) -> None:
    receiver = receivers(statuses=[204])
    store = open_store()
    finish(store, "img_before", receiver.url)  # the process stops before any delivery thread ran
    store.close()
    store = open_store()
    dispatchers(store, config())  # a new process: it looks at the outbox when it starts
    (received,) = receiver.wait_for(1)
    assert verified(received)["data"]["id"] == "img_before"
    _wait_webhook_state(store, "img_before", "delivered")


def test_a_url_no_longer_allowed_is_not_sent_to(open_store: Any, receivers: Callable[..., Receiver],
                                                dispatchers: Callable[..., WebhookDispatcher]) -> None:
    receiver = receivers(statuses=[204])
    store = open_store()
    attempts = Attempts()
    finish(store, "img_ssrf", receiver.url)  # accepted under an older setting that named 127.0.0.1
    dispatcher = dispatchers(store, config(allowed=AllowedHosts.parse(["hooks.example.com"])), on_attempt=attempts)
    dispatcher.notify()
    attempts.wait_for(lambda seen: len(seen) == 1)
    (_, attempt) = attempts.seen[0]
    assert attempt.final and attempt.status is None and "is not allowed" in (attempt.error or "")
    assert store.load("img_ssrf").webhook.state == "failed" and receiver.received == []


def test_the_backoff_doubles_up_to_its_cap() -> None:
    cfg = config(retry_base=2.0, retry_max=30.0)
    assert [cfg.backoff(n, jitter=0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert cfg.backoff(1, jitter=1) == pytest.approx(2.2)


def test_webhooks_are_off_without_a_secret_or_allowed_hosts(make_settings: Callable[..., Any]) -> None:
    assert WebhookConfig.from_settings(make_settings().webhooks) is None
    assert WebhookConfig.from_settings(make_settings(webhook_secret=SECRET).webhooks) is None
    on = WebhookConfig.from_settings(
        make_settings(webhook_secret=SECRET, webhook_allowed_hosts="Hooks.Example.com.").webhooks)
    assert on is not None and on.allowed.names == frozenset({"hooks.example.com"})
    json.dumps(make_settings(webhook_secret=SECRET).redacted())  # the secret never shows
    assert make_settings(webhook_secret=SECRET).redacted()["webhook_secret"] == "***"
