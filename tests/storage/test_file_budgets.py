"""The ``url`` file store's budgets with two API keys: a key within its budget never loses a file to
another key's traffic (the rule of ``fluxserve.storage.budgets``)."""

from __future__ import annotations

import pytest

from fluxserve.storage.budgets import StoreFull
from fluxserve.storage.files import FileRegistry

KIB = 1024


def put(files: FileRegistry, owner: str, count: int, size: int = KIB) -> list[str]:
    return [files.put(b"x" * size, "image/png", "png", owner=owner) for _ in range(count)]


def test_a_flood_from_one_key_evicts_only_its_own_files() -> None:
    files = FileRegistry(ttl=3600, max_bytes=10 * KIB)  # no per-key cap: each key's budget is its fair share
    a_files = put(files, "key-a", 2)
    b_files = put(files, "key-b", 50)
    assert all(files.get(f"{fid}.png", owner="key-a") is not None for fid in a_files)
    assert files.used_bytes("key-a") == 2 * KIB
    assert files.used_bytes("key-b") == 8 * KIB  # the rest of the store, its newest files
    assert [files.get(f"{fid}.png", owner="key-b") is not None for fid in b_files] == [False] * 42 + [True] * 8


def test_the_largest_holder_gives_up_its_oldest_when_the_store_is_full() -> None:
    files = FileRegistry(ttl=3600, max_bytes=10 * KIB)
    b_files = put(files, "key-b", 10)  # alone, B may use the whole store
    a_files = put(files, "key-a", 3)   # A's arrival takes B's oldest, not A's
    assert all(files.get(fid, owner="key-a") is not None for fid in a_files)
    assert [files.get(fid, owner="key-b") is not None for fid in b_files] == [False] * 3 + [True] * 7


def test_a_key_over_its_own_budget_loses_its_own_oldest() -> None:
    files = FileRegistry(ttl=3600, max_bytes=100 * KIB, max_bytes_per_owner=3 * KIB)
    a_files = put(files, "key-a", 2)
    b_files = put(files, "key-b", 5)
    assert all(files.get(fid, owner="key-a") is not None for fid in a_files)
    assert [files.get(fid, owner="key-b") is not None for fid in b_files] == [False, False, True, True, True]


def test_a_full_store_with_every_key_within_its_budget_refuses_the_new_file() -> None:
    files = FileRegistry(ttl=3600, max_bytes=8 * KIB, max_bytes_per_owner=5 * KIB)
    a_files = put(files, "key-a", 5)
    b_files = put(files, "key-b", 3)
    with pytest.raises(StoreFull) as refused:
        put(files, "key-b", 1)  # B is within its 5 KiB, but so is A: nobody's file is taken
    assert refused.value.code == "file_store_full" and "FLUX_FILES_MAX_BYTES" in refused.value.message
    assert all(files.get(fid, owner="key-a") is not None for fid in a_files)
    assert all(files.get(fid, owner="key-b") is not None for fid in b_files)
    assert files.used_bytes("key-b") == 3 * KIB  # the refused file left nothing behind


def test_a_file_larger_than_a_budget_is_refused() -> None:
    files = FileRegistry(ttl=3600, max_bytes=100 * KIB, max_bytes_per_owner=2 * KIB)
    with pytest.raises(StoreFull):
        put(files, "key-a", 1, size=3 * KIB)
    assert files.used_bytes("key-a") == 0


def test_url_files_in_an_object_store_go_by_age_then_by_the_owner_rule() -> None:
    from fluxserve.storage.budgets import files_over_budget
    from fluxserve.storage.results.protocol import StoredObject

    def obj(owner: str, n: int, at: float, size: int = 100) -> StoredObject:
        return StoredObject(f"files/{owner}.f{n}.png", size, at)

    files = [obj("old", 0, 0.0), obj("a", 1, 10.0), obj("a", 2, 11.0), obj("b", 3, 12.0), obj("a", 4, 13.0)]
    # past the TTL: only the old one
    assert files_over_budget(files, now=100.0, ttl=95.0, max_bytes=10_000) == ["files/old.f0.png"]
    # over the global cap with a fair share each: "a" (3 files) is furthest over and loses its oldest
    assert files_over_budget(files[1:], now=20.0, ttl=95.0, max_bytes=300) == ["files/a.f1.png"]
    # "b" within its own cap keeps its file however much "a" sends
    flood = [obj("a", n, 20.0 + n) for n in range(10)]
    doomed = files_over_budget([obj("b", 99, 1.0), *flood], now=40.0, ttl=95.0, max_bytes=500, max_bytes_per_owner=300)
    assert "files/b.f99.png" not in doomed and len(doomed) == 7
    # nobody over its budget but all together over the cap: the oldest of all goes
    assert files_over_budget([obj("a", 1, 1.0), obj("b", 2, 2.0)], now=3.0, ttl=95.0, max_bytes=150,
                             max_bytes_per_owner=100) == ["files/a.f1.png"]
