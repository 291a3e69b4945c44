"""Removers decide which items leave the table, and why (the `reason` metric label).

Each remover answers at the three moments the table consults them: after an insert
(capacity), before a sample (staleness: the learner's version is known only then) and after an
item was sampled (reuse cap). Unused hooks keep the base class's no-op.

Removers are independent of the sampler: the table removes what they name from its index and
from the sampler (a sum-tree leaf goes to 0 and its slot is freed), whatever the sampler is.
The table hands `on_insert` the items oldest first and `before_sample` stalest first (lowest
`min_version` first), both lazily, so a remover that stops early costs nothing per item.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from broker.replay.items import GroupItem


class Remover(Protocol):
    reason: str

    def on_insert(self, items: Iterable[GroupItem], size: int) -> list[int]: ...

    def before_sample(
        self, items: Iterable[GroupItem], policy_version: int, max_staleness: int
    ) -> list[int]: ...

    def after_sample(self, item: GroupItem) -> bool: ...


class _NoOp:
    reason = "none"

    def on_insert(self, items: Iterable[GroupItem], size: int) -> list[int]:
        return []

    def before_sample(
        self, items: Iterable[GroupItem], policy_version: int, max_staleness: int
    ) -> list[int]:
        return []

    def after_sample(self, item: GroupItem) -> bool:
        return False


class CapacityRemover(_NoOp):
    """Drop the oldest groups once the table holds more than `capacity` trajectories.

    A safety net only: lease backpressure keeps the table below capacity in normal runs.
    """

    reason = "capacity"

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def on_insert(self, items: Iterable[GroupItem], size: int) -> list[int]:
        out: list[int] = []
        if size <= self.capacity:
            return out  # the common case: the (lazy, sorting) iterator is never started
        for item in items:  # oldest first
            out.append(item.key)
            size -= item.n_trajs
            if size <= self.capacity:
                break
        return out


class MaxTimesSampledRemover(_NoOp):
    """Retire a group once it has been handed out `max_times_sampled` times."""

    reason = "max_times_sampled"

    def __init__(self, max_times_sampled: int) -> None:
        self.max_times_sampled = max(1, max_times_sampled)

    def after_sample(self, item: GroupItem) -> bool:
        return item.times_sampled >= self.max_times_sampled


class StalenessRemover(_NoOp):
    """Evict groups whose oldest loss token is more than `max_staleness` versions behind.

    `max_staleness < 0` disables the cap. The cap comes with each request (the learner may ask
    for a tighter one than the broker's default).
    """

    reason = "stale"

    def before_sample(
        self, items: Iterable[GroupItem], policy_version: int, max_staleness: int
    ) -> list[int]:
        if max_staleness < 0:
            return []
        floor = policy_version - max_staleness
        out = []
        for item in items:  # stalest first: stop at the first fresh enough
            if item.min_version >= floor:
                break
            out.append(item.key)
        return out
