"""Durable trajectory store: SQLite (WAL) with group commit, driven from one dedicated thread.

Why this shape:
- Acks promise durability, so a batch is acked only after its transaction has committed. One
  transaction per batch would pay one fsync per batch; instead batches arriving within
  `commit_interval_s` are folded into one transaction (group commit) and every caller awaits
  that shared commit.
- `synchronous=FULL`: in WAL mode NORMAL survives a process crash but may lose the last
  commits on power loss / kernel panic, and an acked trajectory is gone from the actor's outbox,
  so it would be lost for good. Group commit already amortises the one WAL fsync per commit over
  every batch in the window, which makes FULL cheap enough to keep the ack promise honest.
- SQLite work runs on a single-thread executor that owns the only connection, so the event
  loop never blocks on disk and SQLite never sees two threads.
- A trajectory is stored as the exact bytes it arrived as (a slice of the received frame) and
  handed to the learner as those bytes again: no decode into objects, no re-encode.
- `durability="none"` is the same code on an in-memory database (throwaway runs, no disk)
  run inline on the event loop (nothing to wait for), except that trajectory encodings stay
  in the received frames beside it instead of blobs in it.
- New databases use 16 KiB pages: a ~32 KiB trajectory takes 2 overflow pages, not 9.
- New databases use `auto_vacuum=INCREMENTAL`, so pages freed by retention (broker/retention.py)
  can be handed back to the filesystem in short steps (`compact`), not by a blocking VACUUM.
- A failed commit (disk full, corruption) rolls back, is logged once per failure streak, counted
  in `headrace_broker_store_errors_total{kind}` and leaves nothing acked; the next commit tries
  again, so the broker resumes by itself once space is freed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from broker.metrics import COMMIT_BATCHES, COMMIT_SECONDS, STORE_ERRORS, STORE_FAILING, STORED
from broker.store import integrity
from broker.store.kv import KeyValue
from broker.store.maintenance import Maintenance
from broker.store.records import (
    Claimed,
    Incoming,
    PutResult,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    TrajMeta,
    classify,
    min_loss_version,
)
from broker.store.schema import (
    DB_NAME,
    INSERT_ROWS,
    MAX_SQL_PARAMS,
    META_COLS,
    MIGRATIONS,
    PAGE_SIZE,
    SCHEMA,
    SCHEMA_VERSION,
    SEG_COLUMN,
    insert_rows,
)
from broker.store.segments import SegmentLog
from shared import protocol as P
from shared.crashpoints import crash

log = logging.getLogger(__name__)
T = TypeVar("T")


class Store(KeyValue, Maintenance):
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
        self.path = ":memory:" if data_dir is None else str(Path(data_dir) / DB_NAME)
        self.commit_interval_s = commit_interval_s
        self.synchronous = synchronous
        self.segments = (
            None
            if data_dir is None
            else SegmentLog(Path(data_dir) / "segments", quota_bytes=quota_bytes)
        )
        self.stored = 0
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-store")
        self._conn: sqlite3.Connection | None = None  # owned by the store thread
        self._lock_fd: int | None = None
        self._pending: list[tuple[list[Incoming], asyncio.Future[PutResult]]] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._last_commit = -1e9  # loop time the last group commit started
        self._opened = False
        self._failures = 0  # commits failed in a row (one log line per streak, then summaries)
        self._failure_logged = -1e9  # monotonic time of the last failure log line
        self._next_seq = 1  # store thread: seq of the next stored trajectory, never reused
        # durability "none": trajectory encodings stay where they arrived (no copy into
        # SQLite pages); SQLite keeps the same rows minus the blob.
        self._bodies: dict[int, Claimed] = {}

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._call(self._open_db)
        STORED.set(self.stored)
        await self.usage()
        self._committer = asyncio.get_running_loop().create_task(self._commit_loop())

    async def close(self) -> None:
        """Commit what is queued, checkpoint the WAL and close. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._committer is not None:
            await self._committer
        try:
            await self._call(self._close_db)
        finally:
            self._ex.shutdown(wait=True)

    def _open_db(self) -> None:
        if not self.in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Two brokers on one data dir would interleave run ids and leases: refuse.
            fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreLockedError(f"{self.path} is in use by another broker") from None
            self._lock_fd = fd
        conn = sqlite3.connect(self.path, isolation_level=None)  # explicit BEGIN/COMMIT
        self._conn = conn
        # Both only take effect on a new, empty database, page_size first (SQLite ignores it
        # once auto_vacuum has been set). Older files keep theirs; `compact` then only
        # checkpoints the WAL.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")  # in-memory DBs answer "memory": fine
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        # 64 MiB of page cache (default 2 MiB): a group commit's pages stay in memory until
        # the commit, instead of spilling into the WAL mid-transaction.
        conn.execute("PRAGMA cache_size=-65536")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION, *MIGRATIONS):
            raise StoreError(
                f"{self.path}: store format {version}, this broker reads {SCHEMA_VERSION};"
                " start it on a new --data-dir"
            )
        conn.executescript(SCHEMA)
        for v in range(version, SCHEMA_VERSION) if version else ():
            conn.execute(MIGRATIONS[v])
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self.segments is not None:
            used = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT seg_id FROM trajectories WHERE seg_id IS NOT NULL"
                )
            }
            missing = used - set(self.segments.existing())
            if missing:
                raise StoreCorruptError(
                    f"{self.segments.path(min(missing))}: segment file missing"
                    f" ({len(missing)} of {len(used)} referenced segments)"
                )
            dropped = self.segments.open(used)
            if dropped:
                log.info("removed %d unreferenced segment files", len(dropped))
            # A segment shorter than its rows say (truncated by a crash of the filesystem or
            # by hand): quarantine the rows it cannot hold instead of failing on each read.
            integrity.quarantine(conn, integrity.truncated_rows(conn, self.segments), "open")
        self.stored = conn.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0]
        # Seqs are the FIFO order and the learner's cursor: never hand one out twice, even
        # after retention deleted the newest rows (see _save_next_seq).
        last = conn.execute("SELECT MAX(seq) FROM trajectories").fetchone()[0] or 0
        saved = conn.execute("SELECT value FROM kv WHERE key = 'next_seq'").fetchone()
        self._next_seq = max(last + 1, int(saved[0]) if saved else 1)
        self._opened = True

    def _close_db(self) -> None:
        if self._conn is not None:
            try:
                # Fold the WAL back so the data dir is one file at rest (not after a failed
                # open: a corrupt file has nothing to fold, and one error line is enough).
                if self._opened and not self.in_memory:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:  # e.g. closing after a failed open of a corrupt file
                log.warning("WAL checkpoint on close failed: %s", e)
            self._conn.close()
            self._conn = None
        if self.segments is not None:
            self.segments.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
            if self._conn is not None and self._conn.in_transaction:
                try:
                    self._conn.rollback()
                except sqlite3.Error:
                    log.exception("rollback failed")
            raise classify(e, self.path) from e

    def _conn_or_raise(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    # ------------------------------------------------------------ trajectories

    async def put(self, trajs: Sequence[Incoming | P.Trajectory]) -> PutResult:
        """Store `trajs` (dedupe by traj_id); returns once they are committed.

        Raises a StoreError if the shared commit failed: then none of them is stored.
        """
        if self._closing:
            raise StoreError("store is closing")
        items = [t if isinstance(t, Incoming) else Incoming.of(t) for t in trajs]
        fut: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        self._wake.set()
        return await fut

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                continue
            # At most one commit starts per commit_interval_s: after a quiet spell the first
            # batch commits at once (low ack latency); under load the batches that arrive
            # within the window share one transaction and one fsync.
            delay = self._last_commit + self.commit_interval_s - loop.time()
            if delay > 0 and not self._closing:
                await asyncio.sleep(delay)
            batch, self._pending = self._pending, []
            self._wake.clear()
            self._last_commit = loop.time()
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[list[Incoming], asyncio.Future[PutResult]]]) -> None:
        t0 = time.perf_counter()
        try:
            results = await self._call(self._commit, [trajs for trajs, _ in batch])
        except StoreError as e:
            self._commit_failed(e, sum(len(trajs) for trajs, _ in batch))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except Exception as e:  # a bug must not leave callers waiting forever
            log.exception("group commit crashed")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreError(f"commit crashed: {e!r}"))
            return
        if self._failures:
            log.warning("store commits succeed again after %d failed commits", self._failures)
            self._failures = 0
            STORE_FAILING.set(0)
        COMMIT_SECONDS.observe(time.perf_counter() - t0)
        COMMIT_BATCHES.observe(len(batch))
        self.stored += sum(len(r.new) for r in results)
        STORED.set(self.stored)
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    FAILURE_LOG_EVERY_S = 30.0

    def _commit_failed(self, e: StoreError, n_trajs: int) -> None:
        """One clear line when commits start failing, then one summary every 30 s at most."""
        self._failures += 1
        STORE_FAILING.set(1)
        now = time.monotonic()
        if self._failures == 1 or now - self._failure_logged >= self.FAILURE_LOG_EVERY_S:
            self._failure_logged = now
            hint = {
                "full": "free disk space (or tighten [broker.retention]); commits resume then",
                "corrupt": "stop the broker and restore or move aside the database file",
            }.get(e.kind, "commits are retried")
            log.error(
                "store %s: commit of %d trajectories failed (%d failed in a row): %s;"
                " not acked, actors keep them and resend; %s",
                e.kind,
                n_trajs,
                self._failures,
                e,
                hint,
            )

    def _commit(self, batches: list[list[Incoming]]) -> list[PutResult]:
        """One transaction for every batch of the group commit.

        Hot path: one query finds the duplicates, seqs are assigned here (no lastrowid per
        row), each trajectory's received encoding is bound as the blob (no copy), and
        multi-row INSERTs store INSERT_ROWS rows per statement (no per-row statement).
        """
        conn = self._conn_or_raise()
        now = time.time()
        ids = [t.view.traj_id for trajs in batches for t in trajs]
        conn.execute("BEGIN IMMEDIATE")
        seen: set[str] = set()
        for i in range(0, len(ids), MAX_SQL_PARAMS):
            chunk = ids[i : i + MAX_SQL_PARAMS]
            marks = ",".join("?" * len(chunk))
            seen.update(
                r[0]
                for r in conn.execute(
                    f"SELECT traj_id FROM trajectories WHERE traj_id IN ({marks})", chunk
                )
            )
        memory = self.in_memory
        seq = self._next_seq
        rows: list[list[Any]] = []
        frames: list[Any] = []
        bodies: list[tuple[int, Claimed]] = []
        results = []
        for trajs in batches:
            new, dups = [], []
            for item in trajs:
                t = item.view
                tid = t.traj_id
                if tid in seen:  # stored before, or earlier in this commit
                    dups.append(tid)
                    continue
                seen.add(tid)
                gid, task, lease, actor = t.group_id, t.task_id, t.lease_id, t.actor_id
                mv, nt = min_loss_version(t), len(t.token_ids) // 4
                r, ok, p, sec = (
                    t.outcome_reward,
                    t.success,
                    t.sample_prob,
                    t.timings.get("episode_s", 0.0),
                )
                frame = item.frame
                size = len(frame)
                rows.append(
                    [
                        seq,
                        tid,
                        gid,
                        task,
                        lease,
                        actor,
                        mv,
                        nt,
                        r,
                        ok,
                        p,
                        sec,
                        now,
                        None,
                        None,
                        size,
                        None if memory else integrity.checksum(frame),
                    ]
                )
                new.append(TrajMeta(seq, tid, gid, task, lease, actor, mv, nt, r, ok, p, sec))
                if memory:
                    raw = frame if isinstance(frame, msgspec.Raw) else msgspec.Raw(frame)
                    bodies.append((seq, Claimed(seq, mv, raw)))
                else:
                    frames.append(frame)
                seq += 1
            results.append(PutResult(new, dups))
        segs = self.segments
        mark = segs.mark() if segs is not None else None
        try:
            if segs is not None and frames:
                # Bodies first and synced, rows after: a committed row never points at bytes
                # that a crash could lose (see broker/segments.py).
                for row, (seg, off, _) in zip(rows, segs.append(frames), strict=True):
                    row[SEG_COLUMN], row[SEG_COLUMN + 1] = seg, off
                segs.sync()
                crash("store.after_sync")
            # sqlite3 releases the GIL around each statement step and must win it back from
            # the event loop thread afterwards: one step per INSERT_ROWS rows, not per row.
            for i in range(0, len(rows), INSERT_ROWS):
                chunk = rows[i : i + INSERT_ROWS]
                conn.execute(insert_rows(len(chunk)), [v for row in chunk for v in row])
            conn.execute("COMMIT")
        except BaseException:
            if segs is not None and mark is not None:
                segs.rollback(mark)
            raise
        self._next_seq = seq
        self._bodies.update(bodies)
        return results

    async def claim(
        self, seqs: Sequence[int], kv: Sequence[tuple[str, bytes | None]] = ()
    ) -> list[Claimed]:
        """Durably count one more sampling of `seqs` (and write `kv` in the same transaction)
        and return their trajectories, in order.

        Committed before the caller hands them out, so a restart never serves them again
        beyond `max_times_sampled`. Raises CorruptRecords (nothing counted) when a body
        fails its check; those records are quarantined.
        """
        return await self._call(self._claim, list(seqs), list(kv))

    async def read(self, seqs: Sequence[int]) -> list[Claimed]:
        """Their trajectories again, verified, counting nothing (a batch handed again)."""
        return await self._call(self._read, list(seqs))

    def _claim(self, seqs: list[int], kv: list[tuple[str, bytes | None]]) -> list[Claimed]:
        out = self._read(seqs)
        conn = self._conn_or_raise()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE trajectories SET times_sampled = times_sampled + 1 WHERE seq = ?",
            [(s,) for s in seqs],
        )
        self._kv_apply(conn, kv)  # KeyValue's
        conn.execute("COMMIT")
        return out

    def _read(self, seqs: list[int]) -> list[Claimed]:
        conn = self._conn_or_raise()
        if self.in_memory:
            missing = [s for s in seqs if s not in self._bodies]
            if missing:
                raise StoreError(f"trajectory seq {missing[0]} is missing")
            return [self._bodies[s] for s in seqs]
        assert self.segments is not None
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
                body = self.segments.read(g, o, n)
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
            integrity.quarantine(conn, problems, str(self.segments.dir))
            raise integrity.CorruptRecords(problems)
        return out

    async def retire(self, seqs: Sequence[int], reason: str) -> None:
        """Mark trajectories as evicted unsampled, so a restart does not replay them."""
        await self._call(self._retire, [(reason, s) for s in seqs])

    def _retire(self, rows: list[tuple[str, int]]) -> None:
        conn = self._conn_or_raise()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE trajectories SET evicted = ? WHERE seq = ?", rows)
        conn.execute("COMMIT")

    async def scan_open(self, max_times_sampled: int) -> list[TrajMeta]:
        """Stored trajectories that may still be handed out, in insert order."""
        return await self._call(self._scan_open, max_times_sampled)

    def _scan_open(self, max_times_sampled: int) -> list[TrajMeta]:
        rows = self._conn_or_raise().execute(
            f"SELECT {META_COLS}, times_sampled FROM trajectories"
            " WHERE evicted IS NULL AND times_sampled < ? ORDER BY seq",
            (max_times_sampled,),
        )
        return [TrajMeta(*r) for r in rows]
