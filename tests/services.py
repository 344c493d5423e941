"""Fixtures for the durable layer: a real PostgreSQL server, an S3-speaking server, and job stores on both
databases (registered as a pytest plugin by tests/conftest.py).

* ``postgres_server`` — one PostgreSQL cluster for the session (tests/postgres_server.py starts it on
  loopback and stops it at the end); each test gets its own schema, dropped afterwards.
* ``s3_endpoint`` — moto's standalone S3 server on loopback: no S3 server (MinIO and the like) installs
  here, so moto stands in for AWS S3, MinIO and R2; the client is the real boto3 over real HTTP.
* ``store_kind`` / ``open_store`` — the same test runs against SQLite and PostgreSQL; ``open_store``
  opens (or, called again, reopens as a restarted process would) the test's store.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.postgres_server import PostgresServer, temporary_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with temporary_server() as server:
        yield server


def drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class FakeClock:
    """Wall-clock seconds the test moves by hand (TTL, leases and retries without waiting)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class StoreSpace:
    """Where the test's store lives: a SQLite file, or a PostgreSQL schema of the session's server."""

    kind: str
    path: Path
    dsn: str | None = None
    schema: str | None = None


@pytest.fixture
def store_space(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreSpace]:
    if store_kind == "sqlite":
        yield StoreSpace("sqlite", tmp_path / "state" / "jobs.sqlite3")
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    schema = "t_" + secrets.token_hex(6)
    space = StoreSpace("postgres", tmp_path, dsn=server.dsn(), schema=schema)
    try:
        yield space
    finally:
        drop_schema(server.dsn(), schema)


@pytest.fixture
def open_store(store_space: StoreSpace) -> Iterator[Callable[..., Any]]:
    """``open_store(limits=..., clock=...)`` → a job store on the test's space; every store opened is
    closed at the end. Close one and open again to play a restart."""
    from fluxserve.storage.jobstore.protocol import StoreLimits

    opened: list[Any] = []

    def open_(limits: StoreLimits | None = None, clock: Callable[[], float] | None = None, **options: Any) -> Any:
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        if store_space.kind == "sqlite":
            from fluxserve.storage.jobstore.sqlite import SqliteJobStore

            store: Any = SqliteJobStore(store_space.path, limits or StoreLimits(), **extra, **options)
        else:
            from fluxserve.storage.jobstore.postgres import PostgresJobStore

            assert store_space.dsn is not None and store_space.schema is not None
            store = PostgresJobStore(store_space.dsn, limits or StoreLimits(), schema=store_space.schema,
                                     pool_size=4, timeout=10, **extra, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback (a real HTTP server in a thread); its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server socket is bound and serving
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
