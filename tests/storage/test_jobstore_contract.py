"""The job store contract: every test runs on SQLite and on a real PostgreSQL server (``store_kind``).

Time is a hand-moved clock, so TTLs, leases and retry times are exact; restarts close the store and
open it again on the same file or schema.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from fluxserve.storage.jobstore.protocol import (
    MAX_REQUEST_BYTES,
    SCHEMA_VERSION,
    DuplicateRequestId,
    JobState,
    JobStoreRefused,
    NewJob,
    ResultRef,
    StoreLimits,
)
from tests.services import FakeClock

OpenStore = Callable[..., Any]


def new_job(job_id: str, *, owner: str | None = "key:aaaa", request_id: str | None = None,
            webhook_url: str | None = None, model: str = "tiny-flux", seeds: tuple[int, ...] = (7, 8)) -> NewJob:
    return NewJob(id=job_id, owner=owner, model=model, request={"prompt": f"a fox {job_id}", "size": "64x64", "n": 2},
                  seeds=seeds, request_id=request_id, webhook_url=webhook_url)


def png(job_id: str, size: int = 10) -> list[ResultRef]:
    return [ResultRef(f"{job_id}/0.png", "image/png", size)]


# --- creating and reading ---------------------------------------------------------------------------
def test_create_keeps_the_request_seeds_and_owner_and_logs_queued(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    record = store.create(new_job("img_a", request_id="mine", webhook_url="https://hooks.example.com/x"))
    assert record.state is JobState.QUEUED and record.seeds == (7, 8) and record.attempts == 0
    assert record.request == {"prompt": "a fox img_a", "size": "64x64", "n": 2}
    assert record.owner == "key:aaaa" and record.created_at == clock.now
    assert store.load("img_a") == record
    assert [event.type for event in store.events("img_a")] == ["queued"]
    public = record.public()
    assert public["status"] == "queued" and "owner" not in public and public["request_id"] == "mine"


def test_requests_with_image_data_or_too_big_are_refused(open_store: OpenStore) -> None:
    store = open_store()
    with pytest.raises(ValueError, match="without image data"):
        store.create(NewJob(id="img_b", owner=None, model="m", request={"image": b"\x89PNG"}, seeds=[1]))
    with pytest.raises(ValueError, match="over the"):
        store.create(NewJob(id="img_c", owner=None, model="m", request={"prompt": "x" * MAX_REQUEST_BYTES},
                            seeds=[1]))
    assert store.unfinished() == []


def test_another_owner_sees_nothing(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a", owner="key:aaaa", request_id="label"))
    assert store.get("img_a", owner="key:aaaa") is not None
    assert store.get("img_a", owner="key:bbbb") is None
    assert store.get("img_a", owner=None) is None
    assert store.find("label", owner="key:aaaa") is not None
    assert store.find("label", owner="key:bbbb") is None
    assert store.request_cancel("img_a", owner="key:bbbb") is None
    assert store.load("img_a").state is JobState.QUEUED


def test_a_live_request_id_is_unique_per_owner(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a", owner=None, request_id="same"))
    with pytest.raises(DuplicateRequestId):
        store.create(new_job("img_b", owner=None, request_id="same"))  # no keys: owner None still collides
    store.create(new_job("img_c", owner="key:other", request_id="same"))
    assert store.mark_cancelled("img_a")
    store.create(new_job("img_d", owner=None, request_id="same"))  # the label is free once the job ended


# --- the queue ----------------------------------------------------------------------------------------
def test_jobs_are_claimed_in_submission_order_and_by_model(open_store: OpenStore) -> None:
    store = open_store()
    for index in range(4):
        store.create(new_job(f"img_{index}", model="tiny-qwen" if index == 1 else "tiny-flux"))
    assert store.claim_next("w1", models=["tiny-qwen"]).id == "img_1"
    claimed = [store.claim_next("w1").id for _ in range(3)]
    assert claimed == ["img_0", "img_2", "img_3"]
    assert store.claim_next("w1") is None
    running = store.load("img_2")
    assert running.state is JobState.RUNNING and running.worker == "w1" and running.attempts == 1


def test_concurrent_claims_take_each_job_exactly_once(open_store: OpenStore) -> None:
    store = open_store()
    jobs = [f"img_{index:02d}" for index in range(30)]
    for job_id in jobs:
        store.create(new_job(job_id))
    taken: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        start.wait()
        while (record := store.claim_next(f"w{index}")) is not None:
            taken[index].append(record.id)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = [job_id for mine in taken for job_id in mine]
    assert sorted(every) == jobs  # each once: no job lost, none twice
    assert all(mine == sorted(mine) for mine in taken)  # each worker got them in submission order


def test_mark_running_only_takes_a_queued_job(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a"))
    assert store.mark_running("img_a", "w1").state is JobState.RUNNING
    assert store.mark_running("img_a", "w2") is None
    assert store.load("img_a").worker == "w1"


# --- terminal transitions -------------------------------------------------------------------------------
def test_terminal_transitions_happen_exactly_once(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a", webhook_url="https://hooks.example.com/x"))
    assert not store.mark_succeeded("img_a", results=png("img_a"))  # queued → succeeded is no edge
    store.claim_next("w1")
    assert not store.mark_succeeded("img_a", results=png("img_a"), worker="w2")  # not w2's job
    assert store.mark_succeeded("img_a", results=png("img_a"), result_meta={"seeds": [7, 8]},
                                timings={"generation": 1.5}, worker="w1")
    assert not store.mark_cancelled("img_a")
    assert not store.mark_failed("img_a", code="internal_error", message="late")
    record = store.load("img_a")
    assert record.state is JobState.SUCCEEDED and record.error is None and record.timings == {"generation": 1.5}
    assert record.results == tuple(png("img_a")) and record.result_meta == {"seeds": [7, 8]}
    assert [event.type for event in store.events("img_a")] == ["queued", "started", "succeeded"]
    assert len(store.due_deliveries("hooks", limit=10, hold=30)) == 1


def test_a_race_between_cancel_and_completion_has_one_winner(open_store: OpenStore) -> None:
    store = open_store()
    for index in range(10):
        store.create(new_job(f"img_{index}", webhook_url="https://hooks.example.com/x"))
        store.claim_next("w1")

    def race(actions: list[Callable[[], bool]]) -> list[bool]:
        wins: list[bool] = []
        start = threading.Barrier(len(actions))

        def finish(action: Callable[[], bool]) -> None:
            start.wait()
            wins.append(action())

        threads = [threading.Thread(target=finish, args=(action,)) for action in actions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return wins

    for index in range(10):
        job_id = f"img_{index}"
        wins = race([functools.partial(store.mark_succeeded, job_id, results=png(job_id)),
                     functools.partial(store.mark_cancelled, job_id)])
        assert sorted(wins) == [False, True]
        terminal = [event for event in store.events(job_id) if event.type in {"succeeded", "cancelled"}]
        assert len(terminal) == 1 and terminal[0].type == store.load(job_id).state.value
    assert len(store.due_deliveries("hooks", limit=50, hold=30)) == 10  # one webhook per job


def test_failures_carry_their_code_and_expiry_only_leaves_the_queue(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a"))
    store.create(new_job("img_b"))
    store.claim_next("w1")
    assert not store.mark_failed("img_a", code="queue_timeout", message="waited too long", state=JobState.EXPIRED)
    assert store.mark_failed("img_a", code="out_of_memory", message="the GPU ran out of memory", worker="w1")
    assert store.mark_failed("img_b", code="queue_timeout", message="waited too long", state=JobState.EXPIRED)
    failed = store.load("img_a")
    assert failed.state is JobState.FAILED and failed.error.code == "out_of_memory"
    assert failed.public()["error"] == {"message": "the GPU ran out of memory", "code": "out_of_memory"}
    assert store.load("img_b").state is JobState.EXPIRED
    assert store.events("img_a")[-1].data == {"code": "out_of_memory", "message": "the GPU ran out of memory"}


def test_cancelling_a_queued_job_ends_it_and_a_running_one_tells_its_worker(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a"))
    store.create(new_job("img_b"))
    store.claim_next("w1")  # img_a runs
    assert store.request_cancel("img_b", owner="key:aaaa").state is JobState.CANCELLED
    flagged = store.request_cancel("img_a", owner="key:aaaa")
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    assert store.renew_leases("w2") == set()
    assert store.renew_leases("w1") == {"img_a"}
    assert store.mark_cancelled("img_a", worker="w1")
    assert store.renew_leases("w1") == set()


# --- events ----------------------------------------------------------------------------------------------
def test_events_replay_after_a_given_point_with_progress_coalesced(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a"))
    store.claim_next("w1")
    for step in range(1, 5):
        store.append_event("img_a", {"type": "progress", "step": step, "total": 4}, coalesce=True)
    events = store.events("img_a")
    assert [event.type for event in events] == ["queued", "started", "progress"]
    assert events[-1].data == {"step": 4, "total": 4}
    seen = events[1].seq
    store.mark_succeeded("img_a", results=png("img_a"))
    assert [event.type for event in store.events("img_a", after=seen)] == ["progress", "succeeded"]
    assert store.append_event("img_a", {"type": "progress", "step": 5, "total": 4}) is None  # the end absorbs
    with pytest.raises(ValueError):
        store.append_event("img_a", {"type": "succeeded"})  # terminal events come only from transitions
    with pytest.raises(ValueError, match="without image data"):
        store.create(new_job("img_b"))
        store.append_event("img_b", {"type": "progress", "preview": b"pixels"})


# --- restarts ---------------------------------------------------------------------------------------------
def test_a_restart_resumes_queued_jobs_in_order_and_reruns_the_interrupted_one(open_store: OpenStore) -> None:
    clock = FakeClock()
    limits = StoreLimits(max_attempts=3, lease=60)
    store = open_store(limits, clock)
    for index in range(3):
        store.create(new_job(f"img_{index}", seeds=(100 + index,)))
    store.claim_next("w1")  # img_0 was running when the process died
    store.append_event("img_0", {"type": "progress", "step": 1, "total": 4}, coalesce=True)
    store.close()

    clock.advance(61)  # its lease has run out (SQLite knows sooner: see test_jobstore_sqlite)
    store = open_store(limits, clock)
    assert [(job.id, job.state) for job in store.unfinished()] == [
        ("img_0", JobState.RUNNING), ("img_1", JobState.QUEUED), ("img_2", JobState.QUEUED)]
    recovery = store.recover()
    assert recovery.requeued == ["img_0"] and recovery.failed == []
    again = store.claim_next("w2")
    assert again.id == "img_0" and again.seeds == (100,) and again.attempts == 2  # same seeds: the same image
    assert [store.claim_next("w2").id for _ in range(2)] == ["img_1", "img_2"]
    assert [event.type for event in store.events("img_0")] == ["queued", "started", "progress", "requeued",
                                                                "started"]


def test_a_live_lease_is_not_recovered(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(lease=60), clock)
    store.create(new_job("img_a"))
    store.claim_next("w1")
    clock.advance(50)
    store.renew_leases("w1")  # the heartbeat of a live worker
    clock.advance(50)
    assert store.recover().requeued == []
    clock.advance(11)
    assert store.recover().requeued == ["img_a"]


def test_a_job_interrupted_too_often_fails_with_interrupted(open_store: OpenStore) -> None:
    clock = FakeClock()
    limits = StoreLimits(max_attempts=2, lease=10)
    store = open_store(limits, clock)
    store.create(new_job("img_a", webhook_url="https://hooks.example.com/x"))
    for attempt in range(2):
        assert store.claim_next(f"w{attempt}").attempts == attempt + 1
        clock.advance(11)  # the process died
        recovery = store.recover()
    assert recovery.failed == ["img_a"]
    record = store.load("img_a")
    assert record.state is JobState.FAILED and record.error.code == "interrupted" and record.attempts == 2
    (delivery,) = store.due_deliveries("hooks", limit=10, hold=30)
    assert delivery.event_type == "job.failed" and b'"interrupted"' in delivery.payload


def test_a_cancel_asked_of_a_job_whose_process_died_ends_it_cancelled(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(lease=10), clock)
    store.create(new_job("img_a"))
    store.claim_next("w1")
    store.request_cancel("img_a", owner="key:aaaa")
    clock.advance(11)
    store.recover()
    assert store.load("img_a").state is JobState.CANCELLED


# --- budgets -----------------------------------------------------------------------------------------------
def test_results_expire_after_the_ttl_and_records_after_twice_that(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(ttl=100), clock)
    store.create(new_job("img_a"))
    store.claim_next("w1")
    store.mark_succeeded("img_a", results=png("img_a", 40))
    assert store.result_bytes() == 40
    clock.advance(99)
    store.sweep()
    assert not store.load("img_a").result_expired and store.take_garbage() == []
    clock.advance(2)
    store.sweep()
    expired = store.load("img_a")
    assert expired.result_expired and expired.results == () and store.result_bytes() == 0
    assert store.take_garbage() == ["img_a"]
    store.garbage_collected(["img_a"])
    assert store.take_garbage() == []
    clock.advance(100)
    store.sweep()
    assert store.load("img_a") is None and store.events("img_a") == []


def test_the_results_budget_expires_the_oldest_first(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(results_max_bytes=100), clock)
    for index, size in enumerate([40, 40, 40, 150]):
        job_id = f"img_{index}"
        store.create(new_job(job_id))
        store.claim_next("w1")
        clock.advance(1)
        store.mark_succeeded(job_id, results=png(job_id, size))
    expired = {job.id: store.load(job.id).result_expired for job in map(store.load, ["img_0", "img_1", "img_2",
                                                                                      "img_3"])}
    assert expired == {"img_0": True, "img_1": False, "img_2": False, "img_3": True}  # 150 alone is over budget
    assert store.result_bytes() == 80
    assert sorted(store.take_garbage()) == ["img_0", "img_3"]


def test_each_owner_keeps_at_most_its_share_of_results(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(max_stored_per_owner=2), clock)
    for index in range(3):
        for owner in ("key:aaaa", None):
            job_id = f"img_{index}_{'a' if owner else 'n'}"
            store.create(new_job(job_id, owner=owner))
            store.claim_next("w1")
            clock.advance(1)
            store.mark_succeeded(job_id, results=png(job_id))
    kept = sorted(job_id for job_id in ["img_0_a", "img_1_a", "img_2_a", "img_0_n", "img_1_n", "img_2_n"]
                  if not store.load(job_id).result_expired)
    assert kept == ["img_1_a", "img_1_n", "img_2_a", "img_2_n"]


def stored(store: Any, clock: FakeClock, job_id: str, size: int, *, owner: str | None = "key:aaaa",
           webhook_url: str | None = None) -> None:
    """Create a job for ``owner``, run it and finish it with one result of ``size`` bytes, a second later."""
    store.create(new_job(job_id, owner=owner, webhook_url=webhook_url))
    assert store.mark_running(job_id, "w1") is not None
    clock.advance(1)
    assert store.mark_succeeded(job_id, results=png(job_id, size))


def kept(store: Any, *job_ids: str) -> list[str]:
    """Those of ``job_ids`` whose result can still be fetched."""
    return [job_id for job_id in job_ids if (record := store.load(job_id)).state is JobState.SUCCEEDED
            and not record.result_expired and record.results]


def test_one_owners_traffic_cannot_expire_anothers_results_within_its_budget(open_store: OpenStore) -> None:
    """Key A keeps three results within its 150 bytes; key B then stores ten times that. B loses its own
    oldest (its own cap), A loses nothing before its TTL."""
    clock = FakeClock()
    store = open_store(StoreLimits(results_max_bytes=300, results_max_bytes_per_owner=150), clock)
    a_jobs = [f"img_a{index}" for index in range(3)]
    for job_id in a_jobs:
        stored(store, clock, job_id, 40, owner="key:aaaa")
    b_jobs = [f"img_b{index:02d}" for index in range(40)]
    for job_id in b_jobs:
        stored(store, clock, job_id, 40, owner="key:bbbb")
        assert kept(store, *a_jobs) == a_jobs, f"B's {job_id} expired a result of A"
    assert kept(store, *b_jobs) == b_jobs[-3:]  # 120 of B's 150 bytes: its three newest
    assert store.result_bytes() == 240
    assert store.load("img_b00").result_expired and store.load("img_b00").state is JobState.SUCCEEDED
    assert sorted(store.take_garbage(limit=100)) == b_jobs[:-3]


def test_over_the_global_budget_the_owner_furthest_over_its_fair_share_loses_first(open_store: OpenStore) -> None:
    """Without a per-owner cap each owner's budget is its share of the global one: the oldest result overall
    (A's) stays, and B, holding more than its half, gives up its own oldest."""
    clock = FakeClock()
    store = open_store(StoreLimits(results_max_bytes=200), clock)
    stored(store, clock, "img_a0", 40, owner="key:aaaa")
    stored(store, clock, "img_a1", 40, owner="key:aaaa")
    b_jobs = [f"img_b{index}" for index in range(4)]
    for job_id in b_jobs:
        stored(store, clock, job_id, 40, owner="key:bbbb")
    assert kept(store, "img_a0", "img_a1") == ["img_a0", "img_a1"]
    assert kept(store, *b_jobs) == b_jobs[1:] and store.result_bytes() == 200
    stored(store, clock, "img_n0", 40, owner=None)  # clients without a key are an owner too
    assert kept(store, "img_a0", "img_a1", "img_n0") == ["img_a0", "img_a1", "img_n0"]
    assert kept(store, *b_jobs) == b_jobs[2:]


def test_a_result_nobody_has_room_for_is_refused_and_its_job_fails_results_store_full(open_store: OpenStore) -> None:
    """Every owner within its own cap and the global one full: the new result is refused instead of expiring
    anyone's. Its job ends failed with ``results_store_full`` (event and webhook say so); the bytes are
    queued for deletion; what its owner would have given up for it under its own cap is kept."""
    clock = FakeClock()
    store = open_store(StoreLimits(results_max_bytes=150, results_max_bytes_per_owner=100), clock)
    stored(store, clock, "img_a0", 50, owner="key:aaaa")
    stored(store, clock, "img_a1", 50, owner="key:aaaa")
    stored(store, clock, "img_b0", 40, owner="key:bbbb")
    # b1 takes B over its own 100 (b0 would go), and even then the total is 170 of 150 with nobody over.
    stored(store, clock, "img_b1", 70, owner="key:bbbb", webhook_url="https://hooks.example.com/x")
    refused = store.load("img_b1")
    assert refused.state is JobState.FAILED and refused.results == () and refused.result_bytes == 0
    assert refused.error is not None and refused.error.code == "results_store_full"
    assert "FLUX_RESULTS_MAX_BYTES" in refused.error.message
    assert refused.public()["error"]["code"] == "results_store_full" and "result" not in refused.public()
    assert [event.type for event in store.events("img_b1")][-1] == "failed"
    (delivery,) = store.due_deliveries("hooks", limit=10, hold=30)
    assert delivery.event_type == "job.failed" and b"results_store_full" in delivery.payload
    assert kept(store, "img_a0", "img_a1", "img_b0") == ["img_a0", "img_a1", "img_b0"]
    assert store.result_bytes() == 140 and store.take_garbage() == ["img_b1"]
    # A result larger than a cap alone is never kept: it expires at once, the job stays succeeded.
    stored(store, clock, "img_b2", 101, owner="key:bbbb")
    assert store.load("img_b2").state is JobState.SUCCEEDED and store.load("img_b2").result_expired
    assert kept(store, "img_a0", "img_a1", "img_b0") == ["img_a0", "img_a1", "img_b0"]


def test_caps_lowered_across_a_restart_are_enforced_by_the_sweep(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(StoreLimits(), clock)
    for index in range(3):
        stored(store, clock, f"img_a{index}", 40, owner="key:aaaa")
        stored(store, clock, f"img_b{index}", 40, owner="key:bbbb")
    store.close()
    store = open_store(StoreLimits(results_max_bytes=100, results_max_bytes_per_owner=80), clock)
    store.sweep()
    # Each owner first keeps its newest 80 bytes (a1 a2, b1 b2: 160 of 100, nobody over 80): then the
    # oldest overall go, as no new result is there to refuse.
    assert kept(store, *(f"img_{o}{i}" for i in range(3) for o in "ab")) == ["img_a2", "img_b2"]
    assert store.result_bytes() == 80


def test_owners_finishing_at_once_stay_within_the_budgets(open_store: OpenStore) -> None:
    """Four workers (threads, each with the store's own connections) finish B's jobs at once while A's
    results sit within A's budget: each completion sees the others', so no budget is passed and A keeps
    everything."""
    clock = FakeClock()
    store = open_store(StoreLimits(results_max_bytes=400, results_max_bytes_per_owner=160), clock)
    a_jobs = [f"img_a{index}" for index in range(4)]
    for job_id in a_jobs:
        stored(store, clock, job_id, 40, owner="key:aaaa")
    b_jobs = [f"img_b{index:02d}" for index in range(24)]
    for job_id in b_jobs:
        store.create(new_job(job_id, owner="key:bbbb"))
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        start.wait()
        while (record := store.claim_next(f"w{index}")) is not None:
            assert store.mark_succeeded(record.id, results=png(record.id, 40), worker=f"w{index}")

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert kept(store, *a_jobs) == a_jobs
    assert len(kept(store, *b_jobs)) == 4 and store.result_bytes() == 320  # B at its cap, A untouched


# --- the webhook outbox ---------------------------------------------------------------------------------------
def test_the_outbox_holds_retries_and_records_each_attempt(open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    store.create(new_job("img_a", webhook_url="https://hooks.example.com/x"))
    store.claim_next("w1")
    store.mark_succeeded("img_a", results=png("img_a"))
    assert store.next_delivery_at() == clock.now
    (delivery,) = store.due_deliveries("hooks", limit=10, hold=30)
    assert delivery.event_type == "job.succeeded" and delivery.attempts == 0
    assert store.due_deliveries("other", limit=10, hold=30) == []  # held by the first taker
    store.delivery_attempted(delivery.id, status=503, error="HTTP 503", delivered=False, retry_at=clock.now + 5)
    assert store.load("img_a").public()["webhook"] == {"attempts": 1, "last_status": 503, "state": "pending"}
    clock.advance(4)
    assert store.due_deliveries("hooks", limit=10, hold=30) == []
    clock.advance(1)
    (again,) = store.due_deliveries("hooks", limit=10, hold=30)
    assert again.id == delivery.id and again.payload == delivery.payload and again.attempts == 1  # a stable id
    store.delivery_attempted(again.id, status=204, error=None, delivered=True, retry_at=None)
    assert store.load("img_a").public()["webhook"] == {"attempts": 2, "last_status": 204, "state": "delivered"}
    assert store.next_delivery_at() is None


def test_a_taken_delivery_whose_process_died_is_taken_again_and_pending_ones_survive_a_restart(
        open_store: OpenStore) -> None:
    clock = FakeClock()
    store = open_store(clock=clock)
    store.create(new_job("img_a", webhook_url="https://hooks.example.com/x"))
    store.mark_cancelled("img_a")
    (delivery,) = store.due_deliveries("hooks", limit=10, hold=30)
    store.close()
    store = open_store(clock=clock)
    assert store.due_deliveries("hooks", limit=10, hold=30) == []
    clock.advance(31)
    (again,) = store.due_deliveries("hooks", limit=10, hold=30)
    assert again.id == delivery.id and again.event_type == "job.cancelled"
    store.delivery_attempted(again.id, status=None, error="connection refused", delivered=False, retry_at=None)
    assert store.load("img_a").webhook.state == "failed" and store.next_delivery_at() is None


# --- the schema ------------------------------------------------------------------------------------------------
def test_a_store_of_another_schema_version_is_refused_not_reset(open_store: OpenStore) -> None:
    store = open_store()
    store.create(new_job("img_a"))
    with store._tx() as tx:
        assert tx.fetchall("SELECT application, version FROM schema_info") == [("fluxserve-jobs", SCHEMA_VERSION)]
        tx.execute("UPDATE schema_info SET version = ?", (SCHEMA_VERSION + 1,))
    store.close()
    with pytest.raises(JobStoreRefused, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer fluxserve"):
        open_store()
