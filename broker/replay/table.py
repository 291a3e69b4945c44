"""The replay table: complete groups, composed from a sampler, removers and a rate limiter.

The table is an in-memory index only (keys, sizes, versions, priorities); trajectory bodies
stay in the store and are read when a sample is claimed. It is rebuilt from the store on start
(priorities and rate-limiter counts start afresh then: rebuilt groups get the sampler's initial
priority and count as inserts).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Literal

from broker.replay.items import GroupItem
from broker.replay.rate_limiters import RateLimiter
from broker.replay.removers import Remover
from broker.replay.samplers import Sampler

__all__ = ["GroupItem", "PriorityReduce", "Removal", "Table"]


Removal = tuple[GroupItem, str]  # (item, reason)

# How a group's priority follows from its trajectories' updates (`[broker.replay]
# priority_reduce`, which the config checks against these names)
PriorityReduce = Literal["max", "mean"]
_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "max": max,
    "mean": lambda v: sum(v) / len(v),
}


class Table:
    def __init__(
        self,
        sampler: Sampler,
        removers: Sequence[Remover],
        rate_limiter: RateLimiter,
        priority_reduce: PriorityReduce = "max",
    ) -> None:
        self.sampler = sampler
        self.removers = list(removers)
        self.rate_limiter = rate_limiter
        self.priority_reduce = priority_reduce
        self._reduce = _REDUCERS[priority_reduce]
        self._items: dict[int, GroupItem] = {}
        self._key_of_seq: dict[int, int] = {}  # sample_id -> group key, for priority updates
        self._by_version: list[tuple[int, int]] = []  # heap of (min_version, key), lazy deletes
        self.size = 0  # trajectories
        self.last_refusal = ""  # why the last `sample` returned None: "size" or "rate_limiter"

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def items(self) -> list[GroupItem]:
        """Every group in the table, oldest first."""
        return list(self._oldest_first())

    def _oldest_first(self) -> Iterator[GroupItem]:
        for key in sorted(self._items):
            yield self._items[key]

    def _stalest_first(self) -> Generator[GroupItem, None, None]:
        """Live groups by ascending `min_version` (then key), lazily: O(log n) per item read."""
        heap, items = self._by_version, self._items
        popped: list[tuple[int, int]] = []
        try:
            while heap:
                version, key = heap[0]
                item = items.get(key)
                if item is None or item.min_version != version:
                    heapq.heappop(heap)  # the group has left the table
                    continue
                popped.append(heapq.heappop(heap))
                yield item
        finally:
            for entry in popped:
                heapq.heappush(heap, entry)

    def _add(self, item: GroupItem) -> None:
        self._items[item.key] = item
        for s in item.seqs:
            self._key_of_seq[s] = item.key
        self.size += item.n_trajs
        self.sampler.insert(item.key, item.priority)
        heapq.heappush(self._by_version, (item.min_version, item.key))
        if len(self._by_version) > 2 * len(self._items) + 1024:  # drop entries of gone groups
            self._by_version = [(it.min_version, k) for k, it in self._items.items()]
            heapq.heapify(self._by_version)

    def remove(self, key: int) -> GroupItem:
        item = self._items.pop(key)
        for s in item.seqs:
            self._key_of_seq.pop(s, None)
        self.size -= item.n_trajs
        self.sampler.remove(key)
        return item

    def insert(self, item: GroupItem) -> list[Removal]:
        """Add a complete group; returns the groups the removers pushed out for it."""
        if item.key in self._items:
            return []
        item.priority = self.sampler.new_priority()
        self._add(item)
        self.rate_limiter.on_insert(item.n_trajs)
        out: list[Removal] = []
        for remover in self.removers:
            for key in remover.on_insert(self._oldest_first(), self.size):
                if key in self._items:
                    out.append((self.remove(key), remover.reason))
        return out

    def evict_stale(self, policy_version: int, max_staleness: int) -> list[Removal]:
        out: list[Removal] = []
        for remover in self.removers:
            stalest = self._stalest_first()
            try:
                keys = remover.before_sample(stalest, policy_version, max_staleness)
            finally:
                stalest.close()
            for key in keys:
                if key in self._items:
                    out.append((self.remove(key), remover.reason))
        return out

    def can_sample(self, batch_size: int) -> bool:
        """Rate limiter agrees and the table holds enough trajectories for the batch."""
        return self.size >= batch_size and self.rate_limiter.can_sample(self.size, batch_size)

    def sample(self, batch_size: int) -> list[GroupItem] | None:
        """Whole groups totalling >= `batch_size` trajectories, or None (never fewer).

        Items that reached their reuse cap leave the table; the caller must `restore` them if
        it cannot hand them out after all (e.g. the store failed to record the sampling).
        """
        self.last_refusal = "size"
        if not self._items or self.size < batch_size:
            return None
        if not self.rate_limiter.can_sample(self.size, batch_size):
            self.last_refusal = "rate_limiter"
            return None
        # Ask for as many groups as the average group size suggests; grow if short (mixed sizes).
        k = max(1, math.ceil(batch_size * len(self._items) / self.size))
        while True:
            keys = self.sampler.sample(k)
            total = sum(self._items[key].n_trajs for key in keys)
            if total >= batch_size or len(keys) < k or k >= len(self._items):
                break
            k += 1
        if total < batch_size:  # e.g. only zero-priority groups left to a prioritized sampler
            return None
        if total > batch_size and not self.rate_limiter.can_sample(self.size, total):
            self.last_refusal = "rate_limiter"  # whole groups overshoot what the ratio allows
            return None
        self.last_refusal = ""
        weights = self.sampler.weights(keys)
        self.sampler.advance()
        self.rate_limiter.on_sample(total)
        items = [self._items[key] for key in keys]
        for item, w in zip(items, weights, strict=True):
            item.is_weight = w
            item.times_sampled += 1
            if any(r.after_sample(item) for r in self.removers):
                self.remove(item.key)
        return items

    def restore(self, items: Sequence[GroupItem]) -> None:
        """Undo a `sample` whose hand-out failed."""
        self.rate_limiter.on_sample(-sum(item.n_trajs for item in items))
        for item in items:
            item.times_sampled = max(0, item.times_sampled - 1)
            if item.key not in self._items:
                self._add(item)

    def weights(self, items: Sequence[GroupItem]) -> list[float]:
        """Per-trajectory importance weights for a sampled batch (flattened like the items)."""
        return [item.is_weight for item in items for _ in item.seqs]

    def update_priorities(self, sample_ids: Sequence[int], priorities: Sequence[float]) -> int:
        """Set group priorities from per-trajectory ones; returns # trajectories applied.

        A group's priority is the max (or mean: `priority_reduce`) of the values given for
        its members in this update. Ids of groups no longer in the table are ignored; so are
        non-finite values. Negative values count as 0. O(log n) per group.
        """
        applied = 0
        per_key: dict[int, list[float]] = {}
        for sid, prio in zip(sample_ids, priorities, strict=False):
            key = self._key_of_seq.get(sid)
            if key is None or not math.isfinite(prio):
                continue  # already consumed or evicted: nothing to reprioritise
            per_key.setdefault(key, []).append(max(0.0, float(prio)))
            applied += 1
        if not per_key:
            return 0
        keys = list(per_key)
        values = [self._reduce(per_key[k]) for k in keys]
        for key, value in zip(keys, values, strict=True):
            self._items[key].priority = value
        self.sampler.update_many(keys, values)
        return applied

    def state(self) -> dict[str, object]:
        return {
            "groups": len(self._items),
            "trajectories": self.size,
            "sampler": self.sampler.state(),
            "rate_limiter": self.rate_limiter.state(self.size),
        }
