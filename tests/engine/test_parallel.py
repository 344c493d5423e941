"""FLUX_PARALLEL: parsing, and the start-up refusals on a machine without enough CUDA GPUs (diffusers'
context parallelism does not run on CPU: see fluxserve.engine.parallel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fluxserve.engine.parallel import ParallelConfigError, ParallelPlan, check_parallel, parse_parallel
from fluxserve.runtime import Runtime


def test_parse() -> None:
    assert parse_parallel("off") == ParallelPlan("off") and not parse_parallel("").enabled
    assert parse_parallel("ulysses:2") == ParallelPlan("ulysses", 2)
    assert parse_parallel(" Ring:4 ") == ParallelPlan("ring", 4)
    assert ParallelPlan("ulysses", 2).groups(["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) == [
        ["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    for bad, says in [("tensor:2", "ulysses:<gpus>"), ("ulysses:x", "integer"), ("ulysses:1", "at least 2")]:
        with pytest.raises(ParallelConfigError, match=says):
            parse_parallel(bad)


@pytest.mark.parametrize("value", ["ulysses:2", "ring:2"])
def test_start_up_refuses_a_split_without_enough_cuda_gpus(make_settings: Callable[..., Any], value: str) -> None:
    settings = make_settings(parallel=value, devices=["cpu", "cpu"], worker_processes=True)
    with pytest.raises(ParallelConfigError, match=f"FLUX_PARALLEL={value}") as refused:
        Runtime(settings)
    message = str(refused.value)
    assert "no CUDA device" in message and "Unset FLUX_PARALLEL" in message


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"devices": ["cuda:0", "cuda:1", "cuda:2"]}, "groups of 2"),
    ({"devices": ["cpu", "cpu"]}, "FLUX_DEVICES to list the CUDA GPUs"),
    ({"devices": ["cuda:0", "cuda:0"]}, "twice"),
    ({"worker_processes": False}, "FLUX_WORKER_PROCESSES=1"),
])
def test_the_other_refusals_name_what_to_change(kwargs: dict[str, Any], says: str) -> None:
    options: dict[str, Any] = {"devices": ["cuda:0", "cuda:1"], "worker_processes": True, "attention_backend": None}
    options.update(kwargs)
    with pytest.raises(ParallelConfigError, match=says):
        check_parallel("ulysses:2", options.pop("devices"), 4, **options)


def test_ring_needs_an_attention_kernel_with_lse() -> None:
    with pytest.raises(ParallelConfigError, match="log-sum-exp"):
        check_parallel("ring:2", ["cuda:0", "cuda:1"], 2, worker_processes=True, attention_backend=None)
    plan = check_parallel("ring:2", ["cuda:0", "cuda:1"], 2, worker_processes=True, attention_backend="flash")
    assert plan == ParallelPlan("ring", 2)
    assert check_parallel("off", ["cpu"], 0, worker_processes=False, attention_backend=None) == ParallelPlan("off")
