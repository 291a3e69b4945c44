"""Retention: old trajectories leave the durable store so the disk does not fill.

Configured by `[broker.retention]` (shared.config.RetentionConfig): `max_age_s`,
`max_trajectories`, `max_bytes` (0 = unlimited) and `interval_s`. Every `interval_s` a sweep

1. deletes the oldest *closed* trajectories - consumed (sampled `max_times_sampled` times) or
   evicted from replay - while a limit is exceeded (for `max_age_s`: every closed one older);
2. only if a limit is still exceeded, deletes the oldest *unconsumed* ones, whole groups at a
   time. Their groups first leave the replay table and group assembly through the `on_evict`
   callback (the server counts them as evicted with reason "retention"), so nothing is handed
   out after it was deleted;
3. gives the freed pages back to the filesystem (`Store.compact`: incremental vacuum in short
   steps, then a WAL checkpoint with TRUNCATE).

Deletes run in bounded batches, each its own short transaction, so group commits of incoming
trajectories interleave with a large sweep instead of waiting behind it. `max_bytes` limits the
store's used pages (database pages not on the freelist), which is what the data costs on disk
once compacted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

from broker.metrics import RETENTION_DELETED
from broker.store import Store, StoreError
from shared.config import RetentionConfig

log = logging.getLogger(__name__)

BATCH_ROWS = 256  # trajectories per delete transaction (~8 MB of 2k-token trajectories)


class Retention:
    def __init__(
        self,
        store: Store,
        cfg: RetentionConfig,
        max_times_sampled: int,
        on_evict: Callable[[set[str]], None] | None = None,
        keep_from: Callable[[], int | None] | None = None,
        *,
        batch_rows: int = BATCH_ROWS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`on_evict(group_ids)` is called, on the event loop, right before unconsumed
        trajectories of those groups are deleted; it must drop them from replay.
        `keep_from()`: the oldest seq still needed by a batch the learner may be handed
        again (broker/batches.py); consumed trajectories from it on are kept."""
        self.store = store
        self.cfg = cfg
        self.max_times_sampled = max(1, max_times_sampled)
        self.on_evict = on_evict
        self.keep_from = keep_from
        self.batch_rows = max(1, batch_rows)
        self.clock = clock  # wall clock: `created` in the store is time.time()
        self.deleted: Counter[str] = Counter()  # over the process's life, by reason

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return c.max_age_s > 0 or c.max_trajectories > 0 or c.max_bytes > 0

    async def run(self) -> None:
        """Sweep every `interval_s` until cancelled (also refreshes the store-size gauge)."""
        interval = self.cfg.interval_s if self.cfg.interval_s > 0 else 30.0
        while True:
            await asyncio.sleep(interval)
            try:
                if self.enabled:
                    await self.sweep()
                else:
                    await self.store.usage()
            except StoreError as e:  # counted by the store; try again next interval
                log.error("retention sweep failed: %s", e)
            except Exception:  # a bug here must not stop the broker
                log.exception("retention sweep crashed")

    async def _excess_rows(self) -> int:
        """How many of the oldest trajectories must go for the count and byte limits."""
        c, stored = self.cfg, self.store.stored
        if stored <= 0:
            return 0
        need = stored - c.max_trajectories if c.max_trajectories > 0 else 0
        if c.max_bytes > 0:
            used = (await self.store.usage()).used_bytes
            if used > c.max_bytes:
                need = max(need, math.ceil((used - c.max_bytes) / max(1.0, used / stored)))
        return max(0, need)

    async def sweep(self) -> Counter[str]:
        """One pass of the policy; returns how many trajectories it deleted, by reason."""
        deleted: Counter[str] = Counter()
        before_seq = None
        if self.cfg.max_age_s > 0:
            before_seq = await self.store.first_seq_since(self.clock() - self.cfg.max_age_s)
        for closed in (True, False):
            deleted.update(await self._delete_kind(closed, before_seq))
        deleted = +deleted  # drop zero counts
        if deleted:
            await self._report(deleted)
        else:
            await self.store.usage()
        return deleted

    async def _delete_kind(self, closed: bool, before_seq: int | None) -> Counter[str]:
        """Delete closed (fully consumed) or open trajectories while a limit is exceeded."""
        deleted: Counter[str] = Counter()
        while True:
            need = await self._excess_rows()
            if need > 0:  # count or bytes: the oldest, whatever their age
                limit, bound = min(self.batch_rows, need), None
            elif before_seq is not None:  # age: everything older than the cutoff
                limit, bound = self.batch_rows, before_seq
            else:
                return deleted
            if closed:
                keep = self.keep_from() if self.keep_from else None
                if keep is not None:
                    bound = keep if bound is None else min(bound, keep)
                got = await self.store.delete_closed(self.max_times_sampled, limit, bound)
            else:
                got = await self._delete_open(limit, bound)
            if not sum(got.values()):
                return deleted  # nothing of this kind left to delete
            deleted.update(got)

    async def _report(self, deleted: Counter[str]) -> None:
        await self.store.compact()
        for reason, n in deleted.items():
            RETENTION_DELETED.labels(reason=reason).inc(n)
        self.deleted.update(deleted)
        usage = await self.store.usage()
        (log.warning if deleted["unconsumed"] else log.info)(
            "retention deleted %d trajectories (%s); %d stored, %.1f MB on disk",
            sum(deleted.values()),
            ", ".join(f"{k} {v}" for k, v in sorted(deleted.items())),
            self.store.stored,
            usage.file_bytes / 1e6,
        )

    async def _delete_open(self, limit: int, before_seq: int | None) -> dict[str, int]:
        groups = await self.store.oldest_open(self.max_times_sampled, limit, before_seq)
        if not groups:
            return {}
        if self.on_evict is not None:
            self.on_evict(set(groups))
        # Let hand-outs that sampled these groups before they left replay submit their claims
        # first: the store thread runs calls in order, so those claims see the rows (and the
        # learner gets them), and no claim can come after the delete.
        await asyncio.sleep(0)
        return await self.store.delete(
            [s for seqs in groups.values() for s in seqs], self.max_times_sampled
        )
