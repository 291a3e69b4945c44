"""Rate limiters decide whether sampling (and inserting) may proceed now (Reverb's third noun).

Every count is in trajectories, the unit of `SampleRequest.batch_size`. The table reports each
insert (a complete group entering replay) and each sample (the trajectories handed out; a
failed hand-out is taken back). `table_size` plays the part of Reverb's `inserts - deletes`.

The broker never refuses data it has been sent: `can_insert` is consulted before granting
leases (backpressure on actors), never when a trajectory arrives.
"""

from __future__ import annotations

import math
from typing import Protocol


class RateLimiter(Protocol):
    inserts: int
    samples: int

    def can_sample(self, table_size: int, num_samples: int) -> bool: ...

    def can_insert(self, table_size: int, num_inserts: int = 1) -> bool: ...

    def on_insert(self, n: int) -> None: ...

    def on_sample(self, n: int) -> None:
        """`n` trajectories were handed out (negative: a hand-out was undone)."""
        ...

    def state(self, table_size: int) -> dict[str, object]: ...


class _Counting:
    def __init__(self) -> None:
        self.inserts = 0
        self.samples = 0

    def on_insert(self, n: int) -> None:
        self.inserts += n

    def on_sample(self, n: int) -> None:
        self.samples += n


class MinSize(_Counting):
    """Sample only once the table holds `min_size_to_sample` trajectories.

    Never blocks inserts: the broker's backpressure (fewer leases) bounds what actors produce,
    so trajectories already generated are never refused.
    """

    def __init__(self, min_size_to_sample: int) -> None:
        super().__init__()
        self.min_size = max(1, min_size_to_sample)

    def can_sample(self, table_size: int, num_samples: int) -> bool:
        return table_size >= self.min_size

    def can_insert(self, table_size: int, num_inserts: int = 1) -> bool:
        return True

    def state(self, table_size: int) -> dict[str, object]:
        return {
            "kind": "min_size",
            "min_size_to_sample": self.min_size,
            "inserts": self.inserts,
            "samples": self.samples,
            "can_sample": self.can_sample(table_size, 1),
            "can_insert": True,
        }


class SampleToInsertRatio(_Counting):
    """Keep samples / inserts near `samples_per_insert` (Reverb's SampleToInsertRatio).

    Exactly Reverb's rule (rate_limiter.cc), with `table_size` for `inserts - deletes`:

    - while `table_size < min_size_to_sample` nothing may be sampled;
    - a sample of `n` is allowed when `inserts * spi - samples - n >= min_diff`;
    - an insert of `n` is allowed when `table_size + n <= min_size_to_sample` (filling up), or
      when `(inserts + n) * spi - samples <= max_diff`;

    and, as in Reverb's Python API, a scalar `error_buffer` means
    `min_diff, max_diff = spi * min_size_to_sample -/+ error_buffer` (a `(min_diff, max_diff)`
    pair is used as given). The learner waits (NotReady) when it runs ahead; the broker grants
    fewer leases when the actors do.

    Reverb requires `max_diff - min_diff >= 2 * max(1, spi)`. Here items are groups and samples
    are batches, so the window must also hold one batch plus one group's worth of inserts:
    `max_diff - min_diff >= batch_size + group_size * spi` (`check_window`), or both sides can
    block each other.
    """

    def __init__(
        self,
        samples_per_insert: float,
        min_size_to_sample: int,
        error_buffer: float | tuple[float, float],
    ) -> None:
        super().__init__()
        spi = float(samples_per_insert)
        if not (spi > 0 and math.isfinite(spi)):
            raise ValueError(f"samples_per_insert must be > 0, got {samples_per_insert}")
        if min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample ({min_size_to_sample}) must be >= 1")
        if isinstance(error_buffer, int | float):
            offset = spi * min_size_to_sample
            min_diff, max_diff = offset - error_buffer, offset + error_buffer
        else:
            min_diff, max_diff = (float(x) for x in error_buffer)
        if max_diff - min_diff < 2 * max(1.0, spi):
            raise ValueError(
                "error_buffer too small: max_diff - min_diff must be >= 2 * max(1, "
                f"samples_per_insert), got [{min_diff}, {max_diff}] for spi={spi}"
            )
        if min_diff > spi * min_size_to_sample:
            raise ValueError(
                "error_buffer range lies above samples_per_insert * min_size_to_sample: "
                "sampling would deadlock once min_size_to_sample items are in"
            )
        self.samples_per_insert = spi
        self.min_size = int(min_size_to_sample)
        self.min_diff = float(min_diff)
        self.max_diff = float(max_diff)

    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def can_sample(self, table_size: int, num_samples: int) -> bool:
        if table_size < self.min_size:
            return False
        return self.diff() - num_samples >= self.min_diff

    def can_insert(self, table_size: int, num_inserts: int = 1) -> bool:
        if table_size + num_inserts <= self.min_size:
            return True
        diff = (self.inserts + num_inserts) * self.samples_per_insert - self.samples
        return diff <= self.max_diff

    def check_window(self, batch_size: int, group_size: int) -> str | None:
        """Why sampling `batch_size` and inserting groups of `group_size` could deadlock."""
        need = batch_size + group_size * self.samples_per_insert
        if self.max_diff - self.min_diff < need:
            return (
                f"rate limiter window max_diff - min_diff = {self.max_diff - self.min_diff:g} "
                f"< batch_size + group_size * samples_per_insert = {need:g}: raise error_buffer"
            )
        return None

    def state(self, table_size: int) -> dict[str, object]:
        return {
            "kind": "sample_to_insert",
            "samples_per_insert": self.samples_per_insert,
            "min_size_to_sample": self.min_size,
            "min_diff": self.min_diff,
            "max_diff": self.max_diff,
            "inserts": self.inserts,
            "samples": self.samples,
            "diff": self.diff(),
            "can_sample": self.can_sample(table_size, 1),
            "can_insert": self.can_insert(table_size, 1),
        }
