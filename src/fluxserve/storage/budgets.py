"""Byte budgets shared by many API keys: a global cap, and a cap per key (owner), so one key's traffic
cannot expire another key's stored results or ``url`` files before their TTL.

The rule (the file store and the job table's results both follow it):

1. An entry larger than either cap is refused (it could never be kept).
2. When an owner is over its own budget (``max_bytes_per_owner``), its own oldest entries go.
3. When everything together is over ``max_bytes``, the owner furthest over its budget gives up its
   oldest entry. An owner's budget is ``max_bytes_per_owner`` when set, else its fair share:
   ``max_bytes`` divided among the owners that hold entries (the largest holder is then always over it).
4. When nobody is over its budget (possible only with ``max_bytes_per_owner`` set, and the global cap
   smaller than the per-owner budgets together), the new entry is refused rather than taking another
   owner's entries: :class:`StoreFull`, which clients see as 507 in the OpenAI error shape.

An owner within its own budget therefore loses entries only to its TTL, never to another key's traffic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxserve.storage.results.protocol import StoredObject


class StoreFull(Exception):
    """A new entry cannot be kept without expiring entries of an owner that is within its budget."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class OwnerBudget:
    """Bytes held per owner (None: requests without API keys) against a global and a per-owner cap.

    Not thread-safe: the store that owns it holds its own lock around every call."""

    def __init__(self, max_bytes: int, max_bytes_per_owner: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_owner = max_bytes_per_owner
        """0: no per-owner cap; each owner's budget is then its fair share of ``max_bytes``."""
        self.used: dict[str | None, int] = {}
        self.total = 0

    def fits_alone(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes could be kept at all."""
        return size <= self.max_bytes and (not self.max_bytes_per_owner or size <= self.max_bytes_per_owner)

    def add(self, owner: str | None, size: int) -> None:
        self.used[owner] = self.used.get(owner, 0) + size
        self.total += size

    def remove(self, owner: str | None, size: int) -> None:
        left = self.used.get(owner, 0) - size
        if left > 0:
            self.used[owner] = left
        else:
            self.used.pop(owner, None)
        self.total -= size

    def owner_over(self, owner: str | None) -> bool:
        """Whether ``owner`` holds more than its own cap (rule 2)."""
        return bool(self.max_bytes_per_owner) and self.used.get(owner, 0) > self.max_bytes_per_owner

    def budget_of(self, owner: str | None) -> float:
        """An owner's budget under the global cap: the per-owner cap, or a fair share of the global one."""
        if self.max_bytes_per_owner:
            return self.max_bytes_per_owner
        return self.max_bytes / max(1, len(self.used))

    def global_victim(self) -> tuple[bool, str | None]:
        """While over ``max_bytes``: (True, the owner furthest over its budget) whose oldest entry goes next
        (rule 3), or (False, None) when nobody is over its budget (rule 4: refuse the new entry)."""
        over = {owner: used - self.budget_of(owner) for owner, used in self.used.items()
                if used > self.budget_of(owner)}
        if not over:
            return False, None
        return True, max(over, key=lambda owner: over[owner])


def plan_expiry(entries: Sequence[tuple[str, str | None, int]], max_bytes: int, max_bytes_per_owner: int = 0, *,
                max_count_per_owner: int = 0, count_capped: Callable[[str | None], bool] = lambda _owner: True,
                new: str | None = None) -> tuple[list[str], bool]:
    """Which of ``entries`` ((key, owner, bytes), oldest first) must go by the rule above: (their keys in the
    entries' order, whether ``new`` is refused).

    Rule 2 for every owner: while it holds more than ``max_count_per_owner`` entries (an owner for which
    ``count_capped`` is true) or more than its byte cap, its own oldest go. Rule 3 while everything is over
    ``max_bytes``. Rule 4: with ``new`` (the entry just stored) it is refused, and its owner keeps what it was
    to give up for it under its own caps; without one (caps lowered since the entries were stored), the
    oldest of all go."""
    budget = OwnerBudget(max_bytes, max_bytes_per_owner)
    held: dict[str | None, deque[tuple[str, int]]] = {}
    for key, owner, size in entries:
        held.setdefault(owner, deque()).append((key, size))
        budget.add(owner, size)
    doomed: set[str] = set()
    made_room: set[str] = set()
    """What ``new``'s owner gave up for it under its own caps."""
    new_owner = next((owner for key, owner, _ in entries if key == new), None)

    def expire_oldest(owner: str | None) -> str:
        key, size = held[owner].popleft()
        budget.remove(owner, size)
        doomed.add(key)
        return key

    for owner in list(held):
        while (0 < max_count_per_owner < len(held[owner]) and count_capped(owner)) or budget.owner_over(owner):
            gone = expire_oldest(owner)
            if new is not None and owner == new_owner:
                made_room.add(gone)
    refused = False
    while budget.total > max_bytes:
        found, victim = budget.global_victim()
        if found and held[victim][0][0] != new:
            expire_oldest(victim)
        elif new is not None:
            refused = True
            doomed -= made_room
            break
        else:
            key, owner, size = next(entry for entry in entries if entry[0] not in doomed)
            held[owner].remove((key, size))
            budget.remove(owner, size)
            doomed.add(key)
    return [key for key, _, _ in entries if key in doomed], refused


def files_over_budget(objects: Sequence[StoredObject], *, now: float, ttl: float, max_bytes: int,
                      max_bytes_per_owner: int = 0) -> list[str]:
    """Keys of the ``url`` files (``files/<owner tag>.<id>.<ext>`` in an object store, ``objects`` oldest first)
    that must go: those older than ``ttl``; then, by the rule above, an owner's oldest while it is over its own
    cap, and while all together are over ``max_bytes`` the oldest of the owner furthest over its budget (or the
    oldest of all when nobody is)."""
    def owner_of(key: str) -> str:
        return key.partition("/")[2].partition(".")[0]

    doomed = [obj.key for obj in objects if now - obj.modified > ttl]
    gone = set(doomed)
    alive = [(obj.key, owner_of(obj.key), obj.size) for obj in objects if obj.key not in gone]
    over, _ = plan_expiry(alive, max_bytes, max_bytes_per_owner)
    return doomed + over
