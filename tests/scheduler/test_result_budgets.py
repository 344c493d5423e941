"""The job table's result budgets with two API keys: one key's results never expire another's before
their TTL while that key is within its budget (the rule of ``fluxserve.storage.budgets``)."""

from __future__ import annotations

from fluxserve.generation import GenerationParams
from fluxserve.models.registry import resolve_model
from fluxserve.scheduler.jobs import Job, JobStatus
from fluxserve.scheduler.table import JobTable

SPEC = resolve_model("tiny-flux")
SIZE = 1000


def finished(table: JobTable, owner: str, count: int, size: int = SIZE) -> list[Job]:
    """``count`` async jobs of ``owner`` that succeeded and stored a result of ``size`` bytes each."""
    jobs = []
    for _ in range(count):
        job = Job(spec=SPEC, params=GenerationParams(SPEC.key, 64, 64, 1, 0.0, 32), prompt="p", seeds=[0],
                  owner=owner)
        table.add(job, keep_result=True)
        job.transition(JobStatus.RUNNING)
        job.transition(JobStatus.SUCCEEDED)
        table.store_result(job, {"data": []}, size)
        jobs.append(job)
    return jobs


def kept(table: JobTable, jobs: list[Job]) -> list[bool]:
    return [table.result(job) is not None for job in jobs]


def expired(table: JobTable, job: Job) -> bool:
    stone = table.tombstone(job.id, job.owner)
    return stone is not None and stone.result_expired


def test_a_flood_from_one_key_expires_only_its_own_results() -> None:
    table = JobTable(max_jobs=1000, ttl=3600, results_max_bytes=10 * SIZE)  # fair shares
    a_jobs = finished(table, "key-a", 4)
    b_jobs = finished(table, "key-b", 50)
    assert kept(table, a_jobs) == [True] * 4
    assert kept(table, b_jobs) == [False] * 44 + [True] * 6
    assert all(expired(table, job) for job in b_jobs[:44])
    assert table.result_bytes == 10 * SIZE


def test_a_key_over_its_fair_share_gives_up_its_oldest_when_another_key_arrives() -> None:
    table = JobTable(max_jobs=1000, ttl=3600, results_max_bytes=10 * SIZE)
    a_jobs = finished(table, "key-a", 10)  # alone, A may fill the budget
    b_jobs = finished(table, "key-b", 5)   # each arrival of B takes A's oldest, down to the fair share
    assert kept(table, a_jobs) == [False] * 5 + [True] * 5
    assert kept(table, b_jobs) == [True] * 5


def test_a_key_over_its_own_byte_budget_loses_its_own_oldest() -> None:
    table = JobTable(max_jobs=1000, ttl=3600, results_max_bytes=100 * SIZE, results_max_bytes_per_owner=4 * SIZE)
    a_jobs = finished(table, "key-a", 6)
    b_jobs = finished(table, "key-b", 4)
    assert kept(table, a_jobs) == [False, False, True, True, True, True]
    assert kept(table, b_jobs) == [True] * 4


def test_a_full_table_with_every_key_within_its_budget_refuses_the_new_result() -> None:
    table = JobTable(max_jobs=1000, ttl=3600, results_max_bytes=8 * SIZE, results_max_bytes_per_owner=5 * SIZE)
    a_jobs = finished(table, "key-a", 5)
    b_jobs = finished(table, "key-b", 3)
    [refused] = finished(table, "key-b", 1)
    assert kept(table, a_jobs) == [True] * 5 and kept(table, b_jobs) == [True] * 3
    stone = table.tombstone(refused.id, "key-b")
    assert stone is not None and not stone.result_expired
    assert stone.summary["status"] == "failed" and stone.summary["error"]["code"] == "results_store_full"
    assert table.result_bytes == 8 * SIZE


def test_short_of_job_slots_the_key_holding_most_results_gives_one_up() -> None:
    table = JobTable(max_jobs=8, ttl=3600, results_max_bytes=100 * SIZE)
    a_jobs = finished(table, "key-a", 2)
    b_jobs = finished(table, "key-b", 8)
    assert kept(table, a_jobs) == [True, True]
    assert kept(table, b_jobs) == [False, False] + [True] * 6


def test_a_refused_result_costs_its_key_none_of_its_older_results() -> None:
    """B is at its own cap: a new result would cost B its oldest, but with everyone then within budget the table
    is still over its cap, so the new result is refused — and B keeps its older results (decided first)."""
    table = JobTable(max_jobs=1000, ttl=3600, results_max_bytes=8 * SIZE, results_max_bytes_per_owner=5 * SIZE)
    a_jobs = finished(table, "key-a", 4)
    b_jobs = finished(table, "key-b", 4)
    [refused] = finished(table, "key-b", 1, size=2 * SIZE)  # B: 4 + 2 > its 5, and 4 + 5 > the 8 in all
    assert kept(table, a_jobs) == [True] * 4 and kept(table, b_jobs) == [True] * 4
    stone = table.tombstone(refused.id, "key-b")
    assert stone is not None and stone.summary["error"]["code"] == "results_store_full"
    assert table.result_bytes == 8 * SIZE
