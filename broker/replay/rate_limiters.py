"""Rate limiters decide whether sampling may proceed now (Reverb's third noun).

Sizes are counted in trajectories, the unit of `SampleRequest.batch_size`.
"""

from __future__ import annotations

from typing import Protocol


class RateLimiter(Protocol):
    def can_sample(self, table_size: int, batch_size: int) -> bool: ...

    def can_insert(self, table_size: int) -> bool: ...

    def state(self, table_size: int) -> dict[str, object]: ...


class MinSize:
    """Sample only once the table holds `min_size_to_sample` trajectories.

    Never blocks inserts: the broker's backpressure (fewer leases) bounds what actors produce,
    so trajectories already generated are never refused.
    """

    def __init__(self, min_size_to_sample: int) -> None:
        self.min_size = max(1, min_size_to_sample)

    def can_sample(self, table_size: int, batch_size: int) -> bool:
        return table_size >= self.min_size

    def can_insert(self, table_size: int) -> bool:
        return True

    def state(self, table_size: int) -> dict[str, object]:
        return {
            "kind": "min_size",
            "min_size_to_sample": self.min_size,
            "can_sample": self.can_sample(table_size, 1),
        }
