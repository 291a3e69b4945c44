"""Durable trajectory store: SQLite (WAL) with group commit, driven from one dedicated thread.

Why this shape:
- Acks promise durability, so a batch is acked only after its trajectories are durable and
  their rows committed. One transaction per batch would pay one sync per batch; instead
  batches arriving within `commit_interval_s` are folded into one group commit (commit.py)
  and every caller awaits that shared commit.
- One fsync per group commit, not two: the trajectories' segment records (segments.py) are
  appended and `fdatasync`ed, then their rows commit at `synchronous=NORMAL` (no WAL fsync;
  `Database.relaxed`). What is durable when: at the ack, the records (headers carry the seq
  and checksum); the rows survive a process crash (SIGKILL included) at once, an OS crash or
  power loss once a later FULL commit or a checkpoint has synced the WAL. Rows an OS crash
  lost are rebuilt from the records at the next open (recovery.py). Every other transaction
  (a batch's claim and its record, retirements, kv state such as leases and batches,
  retention's deletes, compaction's moves, quarantines) commits at `synchronous=FULL`, which
  in WAL mode also makes every earlier commit durable.
- SQLite work runs on a single-thread executor that owns the only connection, so the event
  loop never blocks on disk and SQLite never sees two threads. The parts the store delegates
  to (trajectories.py, maintenance.py, kv.py) are plain synchronous code that `_call` runs
  there; none of them touches the event loop.
- A trajectory is stored as the exact bytes it arrived as (a slice of the received frame) and
  handed to the learner as those bytes again: no decode into objects, no re-encode.
- `durability="none"` is the same code on an in-memory database (throwaway runs, no disk)
  run inline on the event loop (nothing to wait for), except that trajectory encodings stay
  in the received frames beside it instead of blobs in it.
- New databases use 16 KiB pages: a ~32 KiB trajectory takes 2 overflow pages, not 9.
- New databases use `auto_vacuum=INCREMENTAL`, so pages freed by retention (broker/retention.py)
  can be handed back to the filesystem in short steps (`compact`), not by a blocking VACUUM.
- A failed operation (disk full, corruption) rolls back, is counted in
  `headrace_broker_store_errors_total{kind}` and leaves nothing acked; a failed group commit
  is retried with the next one, so the broker resumes by itself once space is freed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from broker.metrics import STORE_BYTES, STORE_ERRORS, STORED
from broker.store import integrity, recovery
from broker.store.commit import GroupCommit
from broker.store.database import IN_MEMORY, Database
from broker.store.kv import KeyValue
from broker.store.maintenance import Maintenance
from broker.store.records import (
    Claimed,
    Incoming,
    PutResult,
    StoreError,
    StoreUsage,
    TrajMeta,
    classify,
)
from broker.store.schema import DB_NAME
from broker.store.segments import SegmentLog
from broker.store.trajectories import Trajectories
from shared import protocol as P

T = TypeVar("T")


class Store:
    def __init__(
        self,
        data_dir: str | Path | None,
        commit_interval_s: float = 0.0,
        *,
        synchronous: str = "FULL",
        quota_bytes: int | None = None,
    ) -> None:
        """`data_dir=None`: in-memory database (durability "none"). `quota_bytes`: a hard cap
        on the segment files (beyond it commits fail as on a full disk)."""
        self.path = IN_MEMORY if data_dir is None else str(Path(data_dir) / DB_NAME)
        self.segments = (
            None
            if data_dir is None
            else SegmentLog(Path(data_dir) / "segments", quota_bytes=quota_bytes)
        )
        self.stored = 0
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-store")
        # Every part below runs only on that thread, through `_call`.
        self._db = Database(self.path, synchronous)
        self._kv = KeyValue(self._db)
        self._trajs = Trajectories(self._db, self.segments)
        self._maint = Maintenance(self._db, self.segments, self._trajs)
        self._group = GroupCommit(
            partial(self._call, self._trajs.commit), commit_interval_s, self._count_stored
        )

    @property
    def in_memory(self) -> bool:
        return self._db.in_memory

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._call(self._open_db)
        STORED.set(self.stored)
        await self.usage()
        self._group.start()

    async def close(self) -> None:
        """Commit what is queued, checkpoint the WAL and close. Idempotent."""
        if self._group.closing:
            return
        await self._group.close()
        try:
            await self._call(self._close_db)
        finally:
            self._ex.shutdown(wait=True)

    def _open_db(self) -> None:
        conn = self._db.open()
        if self.segments is not None:
            self._trajs.load()  # the next seq: rows an OS crash lost were at or past it
            recovery.recover(conn, self.segments, self._trajs.next_seq)
            integrity.check_segments(conn, self.segments)
        self.stored = self._trajs.load()
        self._db.opened = True

    def _close_db(self) -> None:
        try:
            self._db.close()
        finally:
            if self.segments is not None:
                self.segments.close()
            self._db.unlock()

    # ------------------------------------------------------------ thread plumbing

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            if self.in_memory:  # no disk to wait for: a thread hop would only add latency
                return self._guarded(fn, *args)
            return await asyncio.get_running_loop().run_in_executor(
                self._ex, partial(self._guarded, fn, *args)
            )
        except StoreError as e:
            STORE_ERRORS.labels(kind=e.kind).inc()
            raise

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs on the store thread: roll back on failure, turn sqlite errors into ours."""
        try:
            return fn(*args)
        except (sqlite3.Error, OSError) as e:
            self._db.rollback()
            raise classify(e, self.path) from e

    def _count_stored(self, n: int) -> None:
        self.stored += n
        STORED.set(self.stored)

    # ------------------------------------------------------------ trajectories

    async def put(self, trajs: Sequence[Incoming | P.Trajectory]) -> PutResult:
        """Store `trajs` (dedupe by traj_id); returns once they are committed.

        Raises a StoreError if the shared commit failed: then none of them is stored.
        """
        items = [t if isinstance(t, Incoming) else Incoming.of(t) for t in trajs]
        return await self._group.put(items)

    async def put_many(self, batches: list[list[Incoming]]) -> list[PutResult]:
        """`put` of several batches in the same commit, for one wait: one result per batch."""
        return await self._group.put_many(batches)

    async def claim(
        self, seqs: Sequence[int], kv: Sequence[tuple[str, bytes | None]] = ()
    ) -> list[Claimed]:
        """Durably count one more sampling of `seqs` (and write `kv` in the same transaction)
        and return their trajectories, in order.

        Committed before the caller hands them out, so a restart never serves them again
        beyond `max_times_sampled`. Raises CorruptRecords (nothing counted) when a body
        fails its check; those records are quarantined.
        """
        return await self._call(self._trajs.claim, list(seqs), list(kv))

    async def read(self, seqs: Sequence[int]) -> list[Claimed]:
        """Their trajectories again, verified, counting nothing (a batch handed again)."""
        return await self._call(self._trajs.read, list(seqs))

    async def retire(self, seqs: Sequence[int], reason: str) -> None:
        """Mark trajectories as evicted unsampled, so a restart does not replay them."""
        await self._call(self._trajs.retire, list(seqs), reason)

    async def scan_open(self, max_times_sampled: int) -> list[TrajMeta]:
        """Stored trajectories that may still be handed out, in insert order."""
        return await self._call(self._trajs.scan_open, max_times_sampled)

    # ------------------------------------------------------------ key-value state

    async def kv_get(self, key: str) -> bytes | None:
        return await self._call(self._kv.get, key)

    async def kv_set(self, key: str, value: bytes) -> None:
        await self.kv_write([(key, value)])

    async def kv_write(self, items: Sequence[tuple[str, bytes | None]]) -> None:
        """Set (or delete, for a None value) several keys in one transaction."""
        await self._call(self._kv.write, list(items))

    async def kv_scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return await self._call(self._kv.scan, prefix)

    # ------------------------------------------------------------ retention and compaction

    async def usage(self) -> StoreUsage:
        u = await self._call(self._maint.usage)
        STORE_BYTES.set(u.file_bytes)
        return u

    async def first_seq_since(self, created: float) -> int | None:
        """The seq before which every trajectory was stored before `created` (wall clock);
        None for an empty store."""
        return await self._call(self._maint.first_seq_since, created)

    async def delete_closed(
        self, max_times_sampled: int, limit: int, before_seq: int | None = None
    ) -> dict[str, int]:
        """Delete up to `limit` of the oldest consumed or evicted trajectories (one short
        transaction); returns how many of each ("consumed", "evicted")."""
        return self._deleted(
            await self._call(self._maint.delete_closed, max_times_sampled, limit, before_seq)
        )

    async def oldest_open(
        self, max_times_sampled: int, limit: int, before_seq: int | None = None
    ) -> dict[str, list[int]]:
        """The oldest trajectories that may still be handed out, by group: the `limit`
        oldest, plus every other open trajectory of their groups (groups leave whole)."""
        return await self._call(self._maint.oldest_open, max_times_sampled, limit, before_seq)

    async def delete(self, seqs: Sequence[int], max_times_sampled: int) -> dict[str, int]:
        """Delete these trajectories (one transaction); returns how many were "consumed",
        "evicted" or "unconsumed" at that moment."""
        return self._deleted(await self._call(self._maint.delete, list(seqs), max_times_sampled))

    def _deleted(self, counts: dict[str, int]) -> dict[str, int]:
        self.stored -= sum(counts.values())
        STORED.set(self.stored)
        return counts

    async def compact(self, step_pages: int = 2048) -> None:
        """Give freed space back to the filesystem: rewrite the live rows of mostly-dead
        segments (one short transaction each), then free database pages `step_pages` per
        step (auto_vacuum=INCREMENTAL databases) and truncate the WAL."""
        for seg in await self._call(self._maint.sparse_segments):
            await self._call(self._maint.rewrite_segment, seg)
        await self._call(self._maint.free_pages, step_pages)
        await self.usage()

    def set_quota_bytes(self, quota: int | None) -> None:
        """Change the hard cap on segment bytes (None: the disk's own limit)."""
        if self.segments is not None:
            self.segments.quota_bytes = quota
