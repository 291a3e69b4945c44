"""At open: rebuild the rows an OS crash lost from the segment records they point at.

Group commits append and `fdatasync` their trajectories' records (segments.py) and then
commit the rows at `synchronous=NORMAL`, with no WAL fsync of their own: a process crash
(SIGKILL included) loses none of them, but an OS crash or power loss can lose the last ones.
Every other transaction commits at FULL, which also makes every earlier commit durable, so
what an OS crash loses is always the newest ingest commits: rows whose seqs are at or past the
durable store's next seq, and whose records lie past the last durable row of their segment.

So at open, when the machine has booted since the store was last opened (the kernel's boot id
changed: only then can a commit have been lost), every segment is read from the end of its
last row: each complete record (header and body checksums, a decodable trajectory) whose
stored seq is at or past the next seq gets its row again - the same columns ingest writes,
read off the same bytes, under new seqs in the order the records were appended. A record
whose traj_id is stored already (an actor resent it, compaction copied it) is skipped. The
first torn or garbage record ends a segment's scan: its commit's `fdatasync` never returned,
so it was never acked. Records below the next seq are skipped, never revived: their rows were
deleted on purpose (retention), or they are compaction's copies.

Without a reboot (a process crash, a restart) every committed row is still in the WAL, so
complete records past a segment's last row belong to a commit that never finished and was
never acked: they are truncated away, as a failed commit's are in-process. One kind of
trajectory can be kept without an ack: one whose record was synced when the OS crashed,
before its rows committed; its actor's resend is then a duplicate.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.metrics import STORE_RECOVERED
from broker.store import integrity, kv
from broker.store.records import Incoming
from broker.store.rows import new_rows
from broker.store.schema import INSERT_ROWS, SEG_COLUMN, insert_rows
from broker.store.segments import HEADER, SegmentLog, parse_header
from broker.store.trajectories import stored_ids
from shared import protocol as P

log = logging.getLogger(__name__)

BOOT_KEY = "store/boot_id"  # the kernel boot id at the last open (kv)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of the machine; "" where the kernel does not say (then every open counts as
    after a reboot: recovery runs, which loses nothing)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class Record:
    segment: int
    offset: int  # of the body
    seq: int  # the seq it was stored under
    body: bytes


def recover(conn: sqlite3.Connection, segments: SegmentLog, next_seq: int) -> int:
    """Run at open, before anything else writes (see the module doc). Returns how many rows
    were rebuilt."""
    saved = conn.execute("SELECT value FROM kv WHERE key = ?", (BOOT_KEY,)).fetchone()
    boot = boot_id()
    rebooted = not boot or saved is None or bytes(saved[0]).decode() != boot
    # FULL, like every commit but ingest's: every commit before it is durable from here on.
    conn.execute("BEGIN IMMEDIATE")
    kv.apply(conn, [(BOOT_KEY, boot.encode())])
    conn.execute("COMMIT")
    ends = row_ends(conn)
    if not rebooted:
        drop_tails(segments, ends)
        return 0
    records = [r for seg in segments.existing() for r in tail(segments, seg, ends.get(seg, 0))]
    n = insert(conn, [r for r in records if r.seq >= next_seq], next_seq)
    if n:
        STORE_RECOVERED.inc(n)
        log.warning(
            "rebuilt %d trajectory rows that an OS crash lost from their synced segment"
            " records (the machine rebooted since the store was last opened)",
            n,
        )
    return n


def row_ends(conn: sqlite3.Connection) -> dict[int, int]:
    """Segment -> the end of the last body a row points at."""
    return dict(
        conn.execute(
            "SELECT seg_id, MAX(seg_offset + nbytes) FROM trajectories"
            " WHERE seg_id IS NOT NULL GROUP BY seg_id"
        ).fetchall()
    )


def tail(segments: SegmentLog, seg: int, start: int) -> Iterator[Record]:
    """The complete, well-formed records of segment `seg` from `start` on, up to the first
    that is not."""
    path = segments.path(seg)
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, start
        while at + HEADER.size <= size:
            head = parse_header(os.pread(fd, HEADER.size, at))
            if head is None:
                break
            length, seq, check = head
            body_at = at + HEADER.size
            if body_at + length > size:
                break
            body = os.pread(fd, length, body_at)
            if integrity.problem(body, check) is not None:
                break
            yield Record(seg, body_at, seq, body)
            at = body_at + length
        if at < size:
            log.info("segment %s: %d bytes of torn tail past offset %d", path, size - at, at)
    finally:
        os.close(fd)


def insert(conn: sqlite3.Connection, records: list[Record], next_seq: int) -> int:
    """Rows for `records` (skipping traj_ids stored already or met before), from `next_seq`
    on, in one FULL transaction. Returns how many."""
    if not records:
        return 0
    incoming = [Incoming(P.decode_view(r.body), r.body) for r in records]
    conn.execute("BEGIN IMMEDIATE")
    seen = stored_ids(conn, [i.view.traj_id for i in incoming])
    rows: list[list[object]] = []
    seq, now = next_seq, time.time()
    for rec, item in zip(records, incoming, strict=True):
        new = new_rows([[item]], seen, seq, now, in_memory=False)
        for row in new.rows:
            row[SEG_COLUMN], row[SEG_COLUMN + 1] = rec.segment, rec.offset
            rows.append(row)
        seq = new.next_seq
    for i in range(0, len(rows), INSERT_ROWS):
        chunk = rows[i : i + INSERT_ROWS]
        conn.execute(insert_rows(len(chunk)), [v for row in chunk for v in row])
    conn.execute("COMMIT")
    return len(rows)


def drop_tails(segments: SegmentLog, ends: dict[int, int]) -> None:
    """Truncate each referenced segment to its last row's end (the bytes past it were never
    acked); unreferenced segments are unlinked by `SegmentLog.open`."""
    for seg in segments.existing():
        end = ends.get(seg)
        path = segments.path(seg)
        if end is None or path.stat().st_size <= end:
            continue
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("segment %s: dropped the unacked tail past offset %d", path, end)
