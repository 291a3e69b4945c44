"""The replay table: complete groups, composed from a sampler, removers and a rate limiter.

The table is an in-memory index only (keys, sizes, versions); trajectory bodies stay in the
store and are read when a sample is claimed. It is rebuilt from the store on start.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from broker.replay.rate_limiters import RateLimiter
from broker.replay.removers import Remover
from broker.replay.samplers import Sampler


@dataclass(slots=True)
class GroupItem:
    key: int  # store seq of the trajectory that completed the group: FIFO order, cursor
    group_id: str
    task_id: str
    seqs: list[int]  # store seqs of its trajectories, the learner's sample_ids
    min_version: int  # oldest loss-token policy version over the group
    priority: float = 1.0
    times_sampled: int = 0

    @property
    def n_trajs(self) -> int:
        return len(self.seqs)


Removal = tuple[GroupItem, str]  # (item, reason)


class Table:
    def __init__(
        self, sampler: Sampler, removers: Sequence[Remover], rate_limiter: RateLimiter
    ) -> None:
        self.sampler = sampler
        self.removers = list(removers)
        self.rate_limiter = rate_limiter
        self._items: dict[int, GroupItem] = {}
        self._key_of_seq: dict[int, int] = {}  # sample_id -> group key, for priority updates
        self.size = 0  # trajectories

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

    def _add(self, item: GroupItem) -> None:
        self._items[item.key] = item
        for s in item.seqs:
            self._key_of_seq[s] = item.key
        self.size += item.n_trajs
        self.sampler.insert(item.key, item.priority)

    def _remove(self, key: int) -> GroupItem:
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
        self._add(item)
        out: list[Removal] = []
        for remover in self.removers:
            for key in remover.on_insert(self._oldest_first(), self.size):
                if key in self._items:
                    out.append((self._remove(key), remover.reason))
        return out

    def evict_stale(self, policy_version: int, max_staleness: int) -> list[Removal]:
        out: list[Removal] = []
        for remover in self.removers:
            keys = remover.before_sample(list(self._items.values()), policy_version, max_staleness)
            for key in keys:
                if key in self._items:
                    out.append((self._remove(key), remover.reason))
        return out

    def can_sample(self, batch_size: int) -> bool:
        """Rate limiter agrees and a batch of whole groups can be filled right now."""
        return self.size >= batch_size and self.rate_limiter.can_sample(self.size, batch_size)

    def sample(self, batch_size: int) -> list[GroupItem] | None:
        """Whole groups totalling >= `batch_size` trajectories, or None (never fewer).

        Items that reached their reuse cap leave the table; the caller must `restore` them if
        it cannot hand them out after all (e.g. the store failed to record the sampling).
        """
        if not self._items or not self.can_sample(batch_size):
            return None
        # Ask for as many groups as the average group size suggests; grow if short (mixed sizes).
        k = max(1, math.ceil(batch_size * len(self._items) / self.size))
        while True:
            keys = self.sampler.sample(k)
            total = sum(self._items[key].n_trajs for key in keys)
            if total >= batch_size or k >= len(self._items):
                break
            k += 1
        if total < batch_size:
            return None
        items = [self._items[key] for key in keys]
        for item in items:
            item.times_sampled += 1
            if any(r.after_sample(item) for r in self.removers):
                self._remove(item.key)
        return items

    def restore(self, items: Sequence[GroupItem]) -> None:
        """Undo a `sample` whose hand-out failed."""
        for item in items:
            item.times_sampled = max(0, item.times_sampled - 1)
            if item.key not in self._items:
                self._add(item)

    def weights(self, items: Sequence[GroupItem]) -> list[float]:
        """Per-trajectory importance weights for a sampled batch (flattened like the items)."""
        return [self.sampler.weight(item.key) for item in items for _ in item.seqs]

    def update_priorities(self, sample_ids: Sequence[int], priorities: Sequence[float]) -> int:
        """A group's priority is the max over its trajectories' updates; returns # applied."""
        applied = 0
        updated: dict[int, float] = {}
        for sid, prio in zip(sample_ids, priorities, strict=False):
            key = self._key_of_seq.get(sid)
            if key is None or not math.isfinite(prio):
                continue  # already consumed or evicted: nothing to reprioritise
            updated[key] = max(updated.get(key, 0.0), max(0.0, prio))
            applied += 1
        for key, prio in updated.items():
            self._items[key].priority = prio
            self.sampler.update(key, prio)
        return applied

    def state(self) -> dict[str, object]:
        return {
            "groups": len(self._items),
            "trajectories": self.size,
            "rate_limiter": self.rate_limiter.state(self.size),
        }
