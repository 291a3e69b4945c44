"""Stored trajectories: rows in SQLite, bodies in the segment log (or, in memory, in the frames
they arrived in). Stores a group commit, hands bodies out verified, counts their sampling.
Runs on the store thread, like every part of the store."""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Iterable, Sequence

import msgspec

from broker.store import integrity, kv
from broker.store.database import Database
from broker.store.records import Claimed, Incoming, PutResult, StoreError, TrajMeta
from broker.store.rows import new_rows
from broker.store.schema import (
    CHECK_COLUMN,
    INSERT_ROWS,
    MAX_SQL_PARAMS,
    META_COLS,
    SEG_COLUMN,
    insert_rows,
)
from broker.store.segments import SegmentLog
from shared.crashpoints import crash


class Trajectories:
    def __init__(self, db: Database, segments: SegmentLog | None) -> None:
        """`segments` None: in memory (durability "none")."""
        self._db = db
        self._segments = segments
        self.next_seq = 1  # seq of the next stored trajectory, never reused
        # In memory, trajectory encodings stay where they arrived (no copy into SQLite
        # pages); SQLite keeps the same rows minus the body.
        self._bodies: dict[int, Claimed] = {}
        self.buried = False  # any tombstones (retention deleted something): dedupe reads them

    def load(self) -> int:
        """At open: how many trajectories are stored; picks up the seq high-water mark."""
        conn = self._db.conn
        stored = conn.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0]
        # Seqs are the FIFO order and the learner's cursor: never hand one out twice, even
        # after retention deleted the newest rows (see save_next_seq).
        last = conn.execute("SELECT MAX(seq) FROM trajectories").fetchone()[0] or 0
        saved = conn.execute("SELECT value FROM kv WHERE key = 'next_seq'").fetchone()
        self.next_seq = max(last + 1, int(saved[0]) if saved else 1)
        self.buried = conn.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is not None
        return stored

    def commit(self, batches: list[list[Incoming]]) -> list[PutResult]:
        """One transaction for every batch of the group commit.

        Hot path: one query finds the duplicates, seqs are assigned here (no lastrowid per
        row), each trajectory's received encoding is written as is (no copy), and
        multi-row INSERTs store INSERT_ROWS rows per statement (no per-row statement).
        """
        conn = self._db.conn
        now = time.time()
        ids = [t.view.traj_id for trajs in batches for t in trajs]
        segs = self._segments
        # The synced segment records are what makes these trajectories durable (their rows
        # can be rebuilt from them, recovery.py): the rows commit without a WAL fsync.
        with self._db.relaxed():
            conn.execute("BEGIN IMMEDIATE")
            seen = stored_ids(conn, ids, self.buried)
            new = new_rows(batches, seen, self.next_seq, now, segs is None)
            mark = segs.mark() if segs is not None else None
            try:
                if segs is not None and new.frames:
                    # Bodies first and synced, rows after: a committed row never points at
                    # bytes that a crash could lose (see segments.py).
                    seqs, checks = [r[0] for r in new.rows], [r[CHECK_COLUMN] for r in new.rows]
                    locs = segs.append(new.frames, seqs, checks)
                    for row, (seg, off, _) in zip(new.rows, locs, strict=True):
                        row[SEG_COLUMN], row[SEG_COLUMN + 1] = seg, off
                    segs.sync()
                    crash("store.after_sync")
                # sqlite3 releases the GIL around each statement step and must win it back
                # from the event loop thread afterwards: one step per INSERT_ROWS rows.
                for i in range(0, len(new.rows), INSERT_ROWS):
                    chunk = new.rows[i : i + INSERT_ROWS]
                    conn.execute(insert_rows(len(chunk)), [v for row in chunk for v in row])
                conn.execute("COMMIT")
            except BaseException:
                if segs is not None and mark is not None:
                    segs.rollback(mark)
                raise
        self.next_seq = new.next_seq
        self._bodies.update(new.bodies)
        return new.results

    def claim(self, seqs: list[int], kv_items: list[tuple[str, bytes | None]]) -> list[Claimed]:
        """Read `seqs`, then count one more sampling of each and write `kv_items`, in one
        transaction."""
        out = self.read(seqs)
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE trajectories SET times_sampled = times_sampled + 1 WHERE seq = ?",
            [(s,) for s in seqs],
        )
        kv.apply(conn, kv_items)
        conn.execute("COMMIT")
        return out

    def read(self, seqs: list[int]) -> list[Claimed]:
        """Their bodies, in order. Raises CorruptRecords (after quarantining them) when a
        body fails its check."""
        conn = self._db.conn
        if self._segments is None:
            missing = [s for s in seqs if s not in self._bodies]
            if missing:
                raise StoreError(f"trajectory seq {missing[0]} is missing")
            return [self._bodies[s] for s in seqs]
        out, problems = [], {}
        for s in seqs:
            row = conn.execute(
                "SELECT min_version, seg_id, seg_offset, nbytes, checksum FROM trajectories"
                " WHERE seq = ?",
                (s,),
            ).fetchone()
            if row is None or row[1] is None:
                raise StoreError(f"trajectory seq {s} is missing")
            v, g, o, n, expected = row
            try:
                body = self._segments.read(g, o, n)
            except OSError as e:
                if e.errno != errno.EIO:  # EMFILE and the like: the record may be fine
                    raise
                problems[s] = f"unreadable: {e}"
                continue
            # Verify what leaves the broker: damage is the broker's to report and contain,
            # not a frame the learner would reject whole.
            why = integrity.problem(body, expected)
            if why is not None:
                problems[s] = why
                continue
            out.append(Claimed(s, v, msgspec.Raw(body)))
        if problems:
            integrity.quarantine(conn, problems, str(self._segments.dir))
            raise integrity.CorruptRecords(problems)
        return out

    def retire(self, seqs: Sequence[int], reason: str) -> None:
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE trajectories SET evicted = ? WHERE seq = ?", [(reason, s) for s in seqs]
        )
        conn.execute("COMMIT")

    def scan_open(self, max_times_sampled: int) -> list[TrajMeta]:
        rows = self._db.conn.execute(
            f"SELECT {META_COLS}, times_sampled FROM trajectories"
            " WHERE evicted IS NULL AND times_sampled < ? ORDER BY seq",
            (max_times_sampled,),
        )
        return [TrajMeta(*r) for r in rows]

    def save_next_seq(self) -> None:
        """Deleting the newest rows must not let their seqs be handed out again: keep the
        high-water mark (call inside the deleting transaction)."""
        self._db.conn.execute(
            "INSERT OR REPLACE INTO kv (key, value) VALUES ('next_seq', ?)",
            (str(self.next_seq).encode(),),
        )

    def forget(self, seqs: Iterable[int]) -> None:
        """Drop the in-memory bodies of deleted rows."""
        if self._bodies:
            for s in seqs:
                self._bodies.pop(s, None)


def stored_ids(conn: sqlite3.Connection, ids: list[str], buried: bool = True) -> set[str]:
    """Which of `ids` are stored already, or were and retention deleted them (`buried`: look
    in the tombstones too); one query per table per MAX_SQL_PARAMS ids."""
    out: set[str] = set()
    tables = ("trajectories", "tombstones") if buried else ("trajectories",)
    for i in range(0, len(ids), MAX_SQL_PARAMS):
        chunk = ids[i : i + MAX_SQL_PARAMS]
        marks = ",".join("?" * len(chunk))
        for table in tables:
            sql = f"SELECT traj_id FROM {table} WHERE traj_id IN ({marks})"
            out.update(r[0] for r in conn.execute(sql, chunk))
    return out
