"""Samplers decide which items (groups, by key) a sample takes.

`FifoSampler` hands out the oldest complete groups first: with `max_times_sampled=1` that is
plain on-policy-as-possible streaming. Uniform and prioritized samplers (a sum tree) implement
the same protocol and slot into `Table` unchanged.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class Sampler(Protocol):
    def insert(self, key: int, priority: float) -> None: ...

    def remove(self, key: int) -> None: ...

    def update(self, key: int, priority: float) -> None: ...

    def sample(self, n: int) -> list[int]:
        """Up to `n` distinct keys, in the order the batch should carry them."""
        ...

    def weight(self, key: int) -> float:
        """Importance weight of `key` for the last sample (1.0 for unbiased samplers)."""
        ...


class FifoSampler:
    """Oldest first by key. Keys are insert sequence numbers, so order survives a restart."""

    def __init__(self) -> None:
        # A sorted list: keys arrive almost always increasing (append), and removals hit the
        # front; both are cheap at replay sizes of thousands of groups.
        self._keys: list[int] = []

    def __len__(self) -> int:
        return len(self._keys)

    def insert(self, key: int, priority: float) -> None:
        if not self._keys or key > self._keys[-1]:
            self._keys.append(key)
        else:
            bisect.insort(self._keys, key)

    def remove(self, key: int) -> None:
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def update(self, key: int, priority: float) -> None:
        pass  # FIFO ignores priorities; the API exists so prioritized samplers slot in

    def sample(self, n: int) -> list[int]:
        return self._keys[: max(n, 0)]

    def weight(self, key: int) -> float:
        return 1.0
