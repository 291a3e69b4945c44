"""Store operations for retention (broker/retention.py) and compaction, kept apart from the
ingest path: what is stored and how big, deleting the oldest trajectories, and giving the
freed space back to the filesystem. Runs on the store thread, like every part of the store.

Each delete leaves tombstones (schema.py) for the traj_ids it removes, in the same transaction:
an actor's resend of one (its ack lost to a crash) stays a duplicate, and the table is the
exact record of what retention took (the newest TOMBSTONES_KEPT of it)."""

from __future__ import annotations

import os
import sqlite3

from broker.store import integrity
from broker.store.database import Database
from broker.store.records import StoreUsage
from broker.store.schema import COMPACT_LIVE_FRACTION, TOMBSTONES_KEPT
from broker.store.segments import SegmentLog
from broker.store.trajectories import Trajectories
from shared.crashpoints import crash


class Maintenance:
    def __init__(
        self, db: Database, segments: SegmentLog | None, trajectories: Trajectories
    ) -> None:
        self._db = db
        self._segments = segments
        self._trajs = trajectories

    def usage(self) -> StoreUsage:
        conn = self._db.conn
        page_size, pages, free = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_size", "page_count", "freelist_count")
        )
        db_used = (pages - free) * page_size
        if self._segments is None:
            return StoreUsage(db_used, pages * page_size)
        live = conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM trajectories").fetchone()[0]
        path = self._db.path
        db_files = sum(
            os.path.getsize(path + x) for x in ("", "-wal", "-shm") if os.path.exists(path + x)
        )
        return StoreUsage(db_used + live, db_files + self._segments.total_bytes)

    def first_seq_since(self, created: float) -> int | None:
        """The seq before which every trajectory was stored before `created` (wall clock).

        Seqs grow with commit time, so the oldest rows form a prefix; this scans only it.
        None for an empty store.
        """
        conn = self._db.conn
        row = conn.execute(
            "SELECT seq FROM trajectories WHERE created >= ? ORDER BY seq LIMIT 1", (created,)
        ).fetchone()
        if row is not None:
            return row[0]
        last = conn.execute("SELECT MAX(seq) FROM trajectories").fetchone()[0]
        return None if last is None else last + 1

    def delete_closed(
        self, max_times_sampled: int, limit: int, before_seq: int | None
    ) -> dict[str, int]:
        """Delete up to `limit` of the oldest consumed or evicted trajectories (one short
        transaction); returns how many of each ("consumed", "evicted")."""
        conn = self._db.conn
        bound = "" if before_seq is None else f" AND seq < {int(before_seq)}"
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT seq, evicted IS NOT NULL, seg_id, traj_id FROM trajectories"
            f" WHERE (evicted IS NOT NULL OR times_sampled >= ?){bound} ORDER BY seq LIMIT ?",
            (max_times_sampled, limit),
        ).fetchall()
        conn.executemany("DELETE FROM trajectories WHERE seq = ?", [(r[0],) for r in rows])
        self._trajs.save_next_seq()
        self._bury(conn, [r[3] for r in rows])
        conn.execute("COMMIT")
        self._trajs.forget(r[0] for r in rows)
        self._drop_empty_segments(conn, {r[2] for r in rows})
        evicted = sum(1 for r in rows if r[1])
        return {"consumed": len(rows) - evicted, "evicted": evicted}

    def oldest_open(
        self, max_times_sampled: int, limit: int, before_seq: int | None
    ) -> dict[str, list[int]]:
        """The oldest trajectories that may still be handed out, by group: the `limit`
        oldest, plus every other open trajectory of their groups (groups leave whole)."""
        conn = self._db.conn
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

    def delete(self, seqs: list[int], max_times_sampled: int) -> dict[str, int]:
        """Delete these trajectories (one transaction); returns how many were "consumed",
        "evicted" or "unconsumed" at that moment."""
        conn = self._db.conn
        out = {"consumed": 0, "evicted": 0, "unconsumed": 0}
        conn.execute("BEGIN IMMEDIATE")
        segments, ids = set(), []
        for s in seqs:
            row = conn.execute(
                "DELETE FROM trajectories WHERE seq = ?"
                " RETURNING evicted, times_sampled, seg_id, traj_id",
                (s,),
            ).fetchone()
            if row is None:
                continue  # already gone
            evicted, times_sampled, seg, traj_id = row
            segments.add(seg)
            ids.append(traj_id)
            if evicted is not None:
                out["evicted"] += 1
            elif times_sampled >= max_times_sampled:
                out["consumed"] += 1
            else:
                out["unconsumed"] += 1
        self._trajs.save_next_seq()
        self._bury(conn, ids)
        conn.execute("COMMIT")
        self._trajs.forget(seqs)
        self._drop_empty_segments(conn, segments)
        return out

    def _bury(self, conn: sqlite3.Connection, traj_ids: list[str]) -> None:
        """In the deleting transaction: tombstones for `traj_ids` (dedupe still knows them),
        the oldest beyond TOMBSTONES_KEPT dropped."""
        if not traj_ids:
            return
        conn.executemany(
            "INSERT OR IGNORE INTO tombstones (traj_id) VALUES (?)", [(t,) for t in traj_ids]
        )
        conn.execute(
            "DELETE FROM tombstones WHERE n <= (SELECT MAX(n) FROM tombstones) - ?",
            (TOMBSTONES_KEPT,),
        )
        self._trajs.buried = True

    def _drop_empty_segments(self, conn: sqlite3.Connection, candidates: set[int | None]) -> None:
        """Unlink the segment files of `candidates` that no row points into any more."""
        if self._segments is None:
            return
        empty = [
            g
            for g in candidates
            if g is not None
            and conn.execute("SELECT 1 FROM trajectories WHERE seg_id = ? LIMIT 1", (g,)).fetchone()
            is None
        ]
        self._segments.remove(empty)

    def sparse_segments(self) -> list[int]:
        """Segments less than COMPACT_LIVE_FRACTION of which is still live (none in memory)."""
        if self._segments is None:
            return []
        conn, segs = self._db.conn, self._segments
        out = []
        for seg, live in conn.execute(
            "SELECT seg_id, SUM(nbytes) FROM trajectories WHERE seg_id IS NOT NULL"
            " GROUP BY seg_id ORDER BY seg_id"
        ):
            if live < COMPACT_LIVE_FRACTION * segs.size(seg):
                out.append(seg)
        return out

    def rewrite_segment(self, seg: int) -> None:
        """Move `seg`'s live rows to the current segment, then unlink it."""
        assert self._segments is not None
        conn, segs = self._db.conn, self._segments
        rows = conn.execute(
            "SELECT seq, seg_offset, nbytes, checksum FROM trajectories WHERE seg_id = ?"
            " ORDER BY seq",
            (seg,),
        ).fetchall()
        if seg == segs.current:
            segs.rotate()
        mark = segs.mark()
        try:
            bodies = [segs.read(seg, off, n) for _, off, n, _ in rows]
            # Copies keep their seq (below the store's next seq: recovery never revives
            # them) and their row's checksum (NULL for rows of the oldest format: computed)
            checks = [
                c if c is not None else integrity.checksum(b)
                for (*_, c), b in zip(rows, bodies, strict=True)
            ]
            locs = segs.append(bodies, [r[0] for r in rows], checks)
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

    def free_pages(self, step_pages: int) -> None:
        """Hand free database pages back, `step_pages` per step (auto_vacuum=INCREMENTAL
        databases only), then truncate the WAL."""
        conn = self._db.conn
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            while free > 0:
                # every step of this pragma frees one page: fetchall() runs it to the end
                conn.execute(f"PRAGMA incremental_vacuum({int(step_pages)})").fetchall()
                left = conn.execute("PRAGMA freelist_count").fetchone()[0]
                if left >= free:
                    break
                free = left
        if not self._db.in_memory:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
