"""Store operations for retention and compaction, kept apart from the ingest path.

`Maintenance` is mixed into `Store`: every method runs its SQLite work on the store thread
through `Store._call`, like the rest of the store.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from broker.metrics import STORE_BYTES, STORED
from broker.store.records import Claimed, StoreUsage
from broker.store.schema import COMPACT_LIVE_FRACTION
from broker.store.segments import SegmentLog
from shared.crashpoints import crash

T = TypeVar("T")


class Maintenance:
    # provided by Store
    path: str
    stored: int
    segments: SegmentLog | None
    _next_seq: int
    _bodies: dict[int, Claimed]

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _conn_or_raise(self) -> sqlite3.Connection:
        raise NotImplementedError

    async def usage(self) -> StoreUsage:
        u = await self._call(self._usage)
        STORE_BYTES.set(u.file_bytes)
        return u

    def _usage(self) -> StoreUsage:
        conn = self._conn_or_raise()
        page_size, pages, free = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_size", "page_count", "freelist_count")
        )
        db_used = (pages - free) * page_size
        if self.segments is None:
            return StoreUsage(db_used, pages * page_size)
        live = conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM trajectories").fetchone()[0]
        db_files = sum(
            os.path.getsize(self.path + x)
            for x in ("", "-wal", "-shm")
            if os.path.exists(self.path + x)
        )
        return StoreUsage(db_used + live, db_files + self.segments.total_bytes)

    async def first_seq_since(self, created: float) -> int | None:
        """The seq before which every trajectory was stored before `created` (wall clock).

        Seqs grow with commit time, so the oldest rows form a prefix; this scans only it.
        None for an empty store.
        """
        return await self._call(self._first_seq_since, created)

    def _first_seq_since(self, created: float) -> int | None:
        conn = self._conn_or_raise()
        row = conn.execute(
            "SELECT seq FROM trajectories WHERE created >= ? ORDER BY seq LIMIT 1", (created,)
        ).fetchone()
        if row is not None:
            return row[0]
        last = conn.execute("SELECT MAX(seq) FROM trajectories").fetchone()[0]
        return None if last is None else last + 1

    async def delete_closed(
        self, max_times_sampled: int, limit: int, before_seq: int | None = None
    ) -> dict[str, int]:
        """Delete up to `limit` of the oldest consumed or evicted trajectories (one short
        transaction); returns how many of each ("consumed", "evicted")."""
        return self._deleted(
            await self._call(self._delete_closed, max_times_sampled, limit, before_seq)
        )

    def _delete_closed(
        self, max_times_sampled: int, limit: int, before_seq: int | None
    ) -> dict[str, int]:
        conn = self._conn_or_raise()
        bound = "" if before_seq is None else f" AND seq < {int(before_seq)}"
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT seq, evicted IS NOT NULL, seg_id FROM trajectories"
            f" WHERE (evicted IS NOT NULL OR times_sampled >= ?){bound} ORDER BY seq LIMIT ?",
            (max_times_sampled, limit),
        ).fetchall()
        conn.executemany("DELETE FROM trajectories WHERE seq = ?", [(r[0],) for r in rows])
        self._save_next_seq(conn)
        conn.execute("COMMIT")
        self._drop_bodies(r[0] for r in rows)
        self._drop_empty_segments(conn, {r[2] for r in rows})
        evicted = sum(1 for r in rows if r[1])
        return {"consumed": len(rows) - evicted, "evicted": evicted}

    async def oldest_open(
        self, max_times_sampled: int, limit: int, before_seq: int | None = None
    ) -> dict[str, list[int]]:
        """The oldest trajectories that may still be handed out, by group: the `limit`
        oldest, plus every other open trajectory of their groups (groups leave whole)."""
        return await self._call(self._oldest_open, max_times_sampled, limit, before_seq)

    def _oldest_open(
        self, max_times_sampled: int, limit: int, before_seq: int | None
    ) -> dict[str, list[int]]:
        conn = self._conn_or_raise()
        bound = "" if before_seq is None else f" AND seq < {int(before_seq)}"
        gids = dict.fromkeys(
            r[0]
            for r in conn.execute(
                "SELECT group_id FROM trajectories"
                f" WHERE evicted IS NULL AND times_sampled < ?{bound} ORDER BY seq LIMIT ?",
                (max_times_sampled, limit),
            )
        )
        out: dict[str, list[int]] = {}
        for gid in gids:
            out[gid] = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM trajectories WHERE group_id = ? AND evicted IS NULL"
                    " AND times_sampled < ? ORDER BY seq",
                    (gid, max_times_sampled),
                )
            ]
        return out

    async def delete(self, seqs: Sequence[int], max_times_sampled: int) -> dict[str, int]:
        """Delete these trajectories (one transaction); returns how many were "consumed",
        "evicted" or "unconsumed" at that moment."""
        return self._deleted(await self._call(self._delete, list(seqs), max_times_sampled))

    def _delete(self, seqs: list[int], max_times_sampled: int) -> dict[str, int]:
        conn = self._conn_or_raise()
        out = {"consumed": 0, "evicted": 0, "unconsumed": 0}
        conn.execute("BEGIN IMMEDIATE")
        segments = set()
        for s in seqs:
            row = conn.execute(
                "DELETE FROM trajectories WHERE seq = ? RETURNING evicted, times_sampled, seg_id",
                (s,),
            ).fetchone()
            if row is None:
                continue  # already gone
            evicted, times_sampled, seg = row
            segments.add(seg)
            if evicted is not None:
                out["evicted"] += 1
            elif times_sampled >= max_times_sampled:
                out["consumed"] += 1
            else:
                out["unconsumed"] += 1
        self._save_next_seq(conn)
        conn.execute("COMMIT")
        self._drop_bodies(seqs)
        self._drop_empty_segments(conn, segments)
        return out

    def _save_next_seq(self, conn: sqlite3.Connection) -> None:
        """Deleting the newest rows must not let their seqs be handed out again: keep the
        high-water mark (in the deleting transaction)."""
        conn.execute(
            "INSERT OR REPLACE INTO kv (key, value) VALUES ('next_seq', ?)",
            (str(self._next_seq).encode(),),
        )

    def _drop_empty_segments(self, conn: sqlite3.Connection, candidates: set[int | None]) -> None:
        """Unlink the segment files of `candidates` that no row points into any more."""
        if self.segments is None:
            return
        empty = [
            g
            for g in candidates
            if g is not None
            and conn.execute("SELECT 1 FROM trajectories WHERE seg_id = ? LIMIT 1", (g,)).fetchone()
            is None
        ]
        self.segments.remove(empty)

    def _drop_bodies(self, seqs: Iterable[int]) -> None:
        if self._bodies:
            for s in seqs:
                self._bodies.pop(s, None)

    def _deleted(self, counts: dict[str, int]) -> dict[str, int]:
        self.stored -= sum(counts.values())
        STORED.set(self.stored)
        return counts

    async def compact(self, step_pages: int = 2048) -> None:
        """Give freed space back to the filesystem: rewrite the live rows of mostly-dead
        segments (one short transaction each), then free database pages `step_pages` per
        step (auto_vacuum=INCREMENTAL databases) and truncate the WAL."""
        if self.segments is not None:
            for seg in await self._call(self._sparse_segments):
                await self._call(self._rewrite_segment, seg)
        await self._call(self._compact, step_pages)
        await self.usage()

    def _sparse_segments(self) -> list[int]:
        assert self.segments is not None
        conn, segs = self._conn_or_raise(), self.segments
        out = []
        for seg, live in conn.execute(
            "SELECT seg_id, SUM(nbytes) FROM trajectories WHERE seg_id IS NOT NULL"
            " GROUP BY seg_id ORDER BY seg_id"
        ):
            if live < COMPACT_LIVE_FRACTION * segs.size(seg):
                out.append(seg)
        return out

    def _rewrite_segment(self, seg: int) -> None:
        """Move `seg`'s live rows to the current segment, then unlink it."""
        assert self.segments is not None
        conn, segs = self._conn_or_raise(), self.segments
        rows = conn.execute(
            "SELECT seq, seg_offset, nbytes FROM trajectories WHERE seg_id = ? ORDER BY seq",
            (seg,),
        ).fetchall()
        if seg == segs.current:
            segs.rotate()
        mark = segs.mark()
        try:
            locs = segs.append([segs.read(seg, off, n) for _, off, n in rows])
            segs.sync()
            crash("store.compact")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE trajectories SET seg_id = ?, seg_offset = ? WHERE seq = ?",
                [(g, o, r[0]) for r, (g, o, _) in zip(rows, locs, strict=True)],
            )
            conn.execute("COMMIT")
        except BaseException:
            segs.rollback(mark)
            raise
        segs.remove([seg])

    def _compact(self, step_pages: int) -> None:
        conn = self._conn_or_raise()
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            while free > 0:
                # every step of this pragma frees one page: fetchall() runs it to the end
                conn.execute(f"PRAGMA incremental_vacuum({int(step_pages)})").fetchall()
                left = conn.execute("PRAGMA freelist_count").fetchone()[0]
                if left >= free:
                    break
                free = left
        if not self.in_memory:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def set_quota_bytes(self, quota: int | None) -> None:
        """Change the hard cap on segment bytes (None: the disk's own limit)."""
        if self.segments is not None:
            self.segments.quota_bytes = quota
