"""The PostgreSQL job store's own promises, on real PostgreSQL servers: processes share it, an unreachable
database is a clear error at start, a lost one a typed error that ends when the database is back."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from fluxserve.storage.jobstore import JobStoreConfig, JobStoreRefused, JobStoreUnavailable, NewJob, open_job_store
from fluxserve.storage.jobstore.postgres import PostgresJobStore
from fluxserve.storage.jobstore.protocol import JobState, StoreLimits
from tests.postgres_server import PostgresServer, temporary_server
from tests.services import drop_schema


def job(job_id: str) -> NewJob:
    return NewJob(id=job_id, owner=None, model="tiny-flux", request={"prompt": "a lighthouse"}, seeds=[3])


@pytest.fixture
def schema(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"t_{time.monotonic_ns():x}"
    yield name
    drop_schema(postgres_server.dsn(), name)


def test_an_unreachable_database_is_a_clear_error_at_start_without_the_password() -> None:
    with socket.socket() as sock:  # a loopback port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = JobStoreConfig(url=f"postgresql://fluxserve:hunter2@127.0.0.1:{port}/jobs", timeout=2)
    with pytest.raises(JobStoreUnavailable) as refused:
        open_job_store(config)
    message = str(refused.value)
    assert f"cannot reach the PostgreSQL job store postgresql://fluxserve:***@127.0.0.1:{port}/jobs" in message
    assert "hunter2" not in message


def test_two_processes_sharing_the_store_never_claim_the_same_job(postgres_server: PostgresServer,
                                                                   schema: str) -> None:
    first = PostgresJobStore(postgres_server.dsn(), StoreLimits(), schema=schema, pool_size=3)
    second = PostgresJobStore(postgres_server.dsn(), StoreLimits(), schema=schema, pool_size=3)  # its own pool
    try:
        jobs = [f"img_{index:02d}" for index in range(40)]
        for index, job_id in enumerate(jobs):
            (first if index % 2 else second).create(job(job_id))
        taken: list[list[str]] = [[] for _ in range(6)]
        start = threading.Barrier(6)

        def claim(index: int) -> None:
            store = first if index % 2 else second
            start.wait()
            while (record := store.claim_next(f"w{index}")) is not None:
                taken[index].append(record.id)

        threads = [threading.Thread(target=claim, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(job_id for mine in taken for job_id in mine) == jobs
        assert first.load("img_07").state is JobState.RUNNING  # each sees the other's writes
    finally:
        first.close()
        second.close()


def test_another_programs_tables_in_the_schema_are_refused(postgres_server: PostgresServer, schema: str) -> None:
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.jobs (id TEXT PRIMARY KEY, payload TEXT)")
    with pytest.raises(JobStoreRefused, match="already holds other tables \\(jobs\\)"):
        PostgresJobStore(postgres_server.dsn(), StoreLimits(), schema=schema)


def test_replicas_starting_together_create_the_schema_once(postgres_server: PostgresServer, schema: str) -> None:
    stores: list[PostgresJobStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresJobStore(postgres_server.dsn(), StoreLimits(), schema=schema, pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == [] and len(stores) == 4
    finally:
        for store in stores:
            store.close()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own, which the test stops and starts."""
    with temporary_server() as server:
        yield server


def test_a_database_lost_mid_run_raises_unavailable_and_recovers_when_it_returns(own_server: PostgresServer) -> None:
    store = PostgresJobStore(own_server.dsn(), StoreLimits(), timeout=2, pool_size=2)
    try:
        store.create(job("img_a"))
        store.claim_next("w1")

        own_server.stop()  # the database goes away while img_a runs
        with pytest.raises(JobStoreUnavailable, match="PostgreSQL job store"):
            store.create(job("img_b"))
        with pytest.raises(JobStoreUnavailable):
            store.renew_leases("w1")

        own_server.start()  # back (pg_ctl returns once it accepts connections)
        deadline = time.monotonic() + 60
        while True:  # the pool replaces its dead connections in the background
            try:
                store.create(job("img_b"))
                break
            except JobStoreUnavailable:
                if time.monotonic() > deadline:
                    raise
        assert store.renew_leases("w1") == set()
        assert store.mark_succeeded("img_a", results=[], worker="w1")  # the running work was not lost
        assert [record.id for record in store.unfinished()] == ["img_b"]
    finally:
        store.close()
