"""The SQLite job store's own promises: its default place, one process per file, and refusing (never
resetting) a file it cannot trust."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fluxserve.storage.jobstore import JobStoreConfig, JobStoreRefused, NewJob, StoreLimits, open_job_store
from fluxserve.storage.jobstore.protocol import JobState
from fluxserve.storage.jobstore.sqlite import SqliteJobStore
from tests.services import FakeClock


def job(job_id: str) -> NewJob:
    return NewJob(id=job_id, owner=None, model="tiny-flux", request={"prompt": "x" * 200}, seeds=[1])


def test_the_default_store_is_one_file_under_the_state_dir(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    settings = make_settings(state_dir=tmp_path / "state", results_max_bytes_per_key=123_456)
    config = JobStoreConfig.from_settings(settings.storage)
    assert config.url == "sqlite" and config.limits.ttl == settings.job_ttl
    assert config.limits.results_max_bytes_per_owner == 123_456  # FLUX_RESULTS_MAX_BYTES_PER_KEY
    store = open_job_store(config)
    try:
        store.create(job("img_a"))
    finally:
        store.close()
    assert (tmp_path / "state" / "jobs.sqlite3").is_file()
    reopened = open_job_store(JobStoreConfig(url=f"sqlite://{tmp_path / 'state' / 'jobs.sqlite3'}"))
    try:
        assert reopened.load("img_a") is not None
    finally:
        reopened.close()


def test_the_state_dir_defaults_to_the_xdg_state_directory(tmp_path: Path) -> None:
    code = "from fluxserve.settings import Settings; print(Settings(_env_file=None).state_dir)"
    env = {name: value for name, value in os.environ.items() if name not in {"XDG_STATE_HOME", "FLUX_STATE_DIR"}}
    env.update(XDG_STATE_HOME=str(tmp_path), HOME=str(tmp_path / "home"))
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == str(tmp_path / "fluxserve")
    env.pop("XDG_STATE_HOME")
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == str(tmp_path / "home" / ".local" / "state" / "fluxserve")


def test_a_second_process_is_refused_while_the_first_holds_the_store(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, StoreLimits())
    code = ("import sys; from pathlib import Path; from fluxserve.storage.jobstore.sqlite import SqliteJobStore;"
            "from fluxserve.storage.jobstore import StoreLimits, JobStoreRefused\n"
            "try:\n    SqliteJobStore(Path(sys.argv[1]), StoreLimits())\n"
            "except JobStoreRefused as exc:\n    print(exc); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 3, other.stderr
    assert "in use by another process" in other.stdout and "postgresql://" in other.stdout
    store.close()
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stdout + other.stderr


def test_running_jobs_found_at_opening_are_recovered_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", StoreLimits(lease=600), clock=clock)
    store.create(job("img_a"))
    store.claim_next("w1")
    store.close()  # the process died with img_a running; the lock proves no other process runs it
    store = SqliteJobStore(tmp_path / "jobs.sqlite3", StoreLimits(lease=600), clock=clock)
    try:
        assert store.recover().requeued == ["img_a"]  # no waiting for the lease
        assert store.load("img_a").state is JobState.QUEUED
    finally:
        store.close()


def _refused(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(JobStoreRefused, match=match):
        SqliteJobStore(path, StoreLimits())
    assert path.read_bytes() == before  # refused, never reset


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(b"these are someone's notes, not a database\n" * 100)
    _refused(path, "not a usable SQLite database")


def test_a_corrupted_store_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, StoreLimits())
    for index in range(200):
        store.create(job(f"img_{index}"))
    store.close()
    data = bytearray(path.read_bytes())
    for offset in range(2 * 4096, 4 * 4096):  # scramble two b-tree pages, keep the header
        data[offset] = (data[offset] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    _refused(path, "malformed|corrupted")


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.close()
    _refused(path, "already holds other tables \\(invoices\\)")
    stamped = tmp_path / "stamped.sqlite3"
    with sqlite3.connect(stamped) as conn:
        conn.execute("PRAGMA application_id = 1234")
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    _refused(stamped, "another program's SQLite database")
