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
- `durability="none"` is the same code on an in-memory database (throwaway runs, no disk),
  except that trajectory bodies stay Python objects beside it instead of blobs in it.
- New databases use 16 KiB pages: a ~32 KiB trajectory takes 2 overflow pages, not 9.
- New databases use `auto_vacuum=INCREMENTAL`, so pages freed by retention (broker/retention.py)
  can be handed back to the filesystem in short steps (`compact`), not by a blocking VACUUM.
- A failed commit (disk full, corruption) rolls back, is logged once per failure streak, counted
  in `headrace_broker_store_errors_total{kind}` and leaves nothing acked; the next commit tries
  again, so the broker resumes by itself once space is freed.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from broker.metrics import (
    COMMIT_BATCHES,
    COMMIT_SECONDS,
    STORE_BYTES,
    STORE_ERRORS,
    STORE_FAILING,
    STORED,
)
from shared import protocol as P

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_NAME = "broker.db"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trajectories (
    seq INTEGER PRIMARY KEY,            -- insert order: FIFO order and the learner's cursor
    traj_id TEXT NOT NULL UNIQUE,       -- dedupe key (outboxes resend until acked)
    group_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    min_version INTEGER NOT NULL,       -- oldest policy version of any loss token
    n_tokens INTEGER NOT NULL,
    times_sampled INTEGER NOT NULL DEFAULT 0,
    evicted TEXT,                       -- reason, once removed from replay unsampled
    created REAL NOT NULL,
    blob BLOB NOT NULL                  -- shared.protocol.encode(Trajectory)
);
CREATE INDEX IF NOT EXISTS trajectories_open ON trajectories(times_sampled)
    WHERE evicted IS NULL;
CREATE INDEX IF NOT EXISTS trajectories_group ON trajectories(group_id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
_INSERT = (
    "INSERT INTO trajectories (seq, traj_id, group_id, task_id, lease_id, actor_id,"
    " min_version, n_tokens, created, blob) VALUES "
)
INSERT_ROWS = 64  # rows per INSERT statement (10 parameters each)


@functools.cache
def _insert_rows(n: int) -> str:
    return _INSERT + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)


PAGE_SIZE = 16384  # new databases: a 32 KiB trajectory is 2-3 overflow pages, not 9
MAX_SQL_PARAMS = 30000  # below SQLite's 32766 host parameters per statement
_META_COLS = "seq, traj_id, group_id, task_id, lease_id, actor_id, min_version, n_tokens"


class StoreError(RuntimeError):
    """A store operation failed; nothing of it was committed."""

    kind = "error"


class StoreFullError(StoreError):
    kind = "full"


class StoreCorruptError(StoreError):
    kind = "corrupt"


class StoreLockedError(StoreError):
    kind = "locked"


def _classify(e: sqlite3.Error, path: str) -> StoreError:
    """Our error for a sqlite3 one; the message names the database file."""
    text = str(e).lower()
    msg = f"{path}: {e}"
    if "full" in text:  # SQLITE_FULL: "database or disk is full"
        return StoreFullError(msg)
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StoreCorruptError(msg)
    return StoreError(msg)


@dataclass(frozen=True, slots=True)
class TrajMeta:
    """What the replay index needs of a stored trajectory (the blob stays in SQLite)."""

    seq: int
    traj_id: str
    group_id: str
    task_id: str
    lease_id: str
    actor_id: str
    min_version: int
    n_tokens: int
    times_sampled: int = 0


@dataclass(frozen=True, slots=True)
class StoreUsage:
    used_bytes: int  # pages in use (not on the freelist) x page size: what retention limits
    file_bytes: int  # database + WAL files on disk (the pages, for an in-memory store)


@dataclass(slots=True)
class PutResult:
    new: list[TrajMeta]
    duplicates: list[str]


_traj_decoder = msgspec.msgpack.Decoder(P.Trajectory)
_encoder = msgspec.msgpack.Encoder()
_I4, _U1 = np.dtype("<i4"), np.dtype("u1")


def _encode(t: P.Trajectory) -> bytearray:
    """`shared.protocol.encode(t)` into a buffer sized up front: a 32 KiB trajectory is then
    one allocation instead of a chain of reallocs (4x faster); SQLite binds it as a BLOB."""
    buf = bytearray(4 * len(t.token_ids) + 4096)  # per-token arrays are 16 bytes a token
    _encoder.encode_into(t, buf)
    return buf


def _min_loss_version(t: P.Trajectory) -> int:
    """`t.min_policy_version()`, with a fast path for the common case: one version for the
    whole episode (no weight swap while it ran)."""
    pv, mask = t.policy_version, t.loss_mask
    first = len(mask) - len(mask.lstrip(b"\x00"))  # index of the first loss token
    if first == len(mask):
        return 0  # no loss token
    v = pv[4 * first : 4 * first + 4]
    if pv == pv[:4] * (len(pv) // 4):
        return int.from_bytes(v, "little", signed=True)
    versions = np.frombuffer(pv, _I4)
    lowest = int(versions.min())
    if lowest == int.from_bytes(v, "little", signed=True):
        return lowest  # nothing is lower than a version the loss tokens have
    return int(versions[np.frombuffer(mask, _U1) != 0].min())


class Store:
    def __init__(
        self,
        data_dir: str | Path | None,
        commit_interval_s: float = 0.02,
        *,
        synchronous: str = "FULL",
        max_page_count: int | None = None,
    ) -> None:
        """`data_dir=None`: in-memory database (durability "none")."""
        self.path = ":memory:" if data_dir is None else str(Path(data_dir) / DB_NAME)
        self.commit_interval_s = commit_interval_s
        self.synchronous = synchronous
        self.max_page_count = max_page_count  # tests use it to simulate a full disk
        self.stored = 0
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-store")
        self._conn: sqlite3.Connection | None = None  # owned by the store thread
        self._lock_fd: int | None = None
        self._pending: list[tuple[Sequence[P.Trajectory], asyncio.Future[PutResult]]] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._last_commit = -1e9  # loop time the last group commit started
        self._opened = False
        self._failures = 0  # commits failed in a row (one log line per streak, then summaries)
        self._failure_logged = -1e9  # monotonic time of the last failure log line
        self._next_seq = 1  # store thread: seq of the next stored trajectory, never reused
        # durability "none": trajectory bodies stay Python objects (no encode, no copy into
        # SQLite pages, no decode on claim); SQLite keeps the same rows minus the blob.
        self._bodies: dict[int, P.Trajectory] = {}

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
        if self.max_page_count:
            conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
        conn.executescript(_SCHEMA)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------ thread plumbing

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
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
        except sqlite3.Error as e:
            if self._conn is not None and self._conn.in_transaction:
                try:
                    self._conn.rollback()
                except sqlite3.Error:
                    log.exception("rollback failed")
            raise _classify(e, self.path) from e

    def _conn_or_raise(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    # ------------------------------------------------------------ trajectories

    async def put(self, trajs: Sequence[P.Trajectory]) -> PutResult:
        """Store `trajs` (dedupe by traj_id); returns once they are committed.

        Raises a StoreError if the shared commit failed: then none of them is stored.
        """
        if self._closing:
            raise StoreError("store is closing")
        fut: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._pending.append((trajs, fut))
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

    async def _flush(
        self, batch: list[tuple[Sequence[P.Trajectory], asyncio.Future[PutResult]]]
    ) -> None:
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

    def _commit(self, batches: list[Sequence[P.Trajectory]]) -> list[PutResult]:
        """One transaction for every batch of the group commit.

        Hot path: one query finds the duplicates, seqs are assigned here (no lastrowid per
        row), each trajectory is encoded into a buffer sized up front, and multi-row INSERTs
        store INSERT_ROWS rows per statement (no per-row statement or cursor from Python).
        """
        conn = self._conn_or_raise()
        now = time.time()
        ids = [t.traj_id for trajs in batches for t in trajs]
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
        rows: list[tuple[Any, ...]] = []
        bodies: list[tuple[int, P.Trajectory]] = []
        results = []
        for trajs in batches:
            new, dups = [], []
            for t in trajs:
                tid = t.traj_id
                if tid in seen:  # stored before, or earlier in this commit
                    dups.append(tid)
                    continue
                seen.add(tid)
                gid, task, lease, actor = t.group_id, t.task_id, t.lease_id, t.actor_id
                mv, nt = _min_loss_version(t), len(t.token_ids) // 4
                blob = b"" if memory else _encode(t)
                rows.append((seq, tid, gid, task, lease, actor, mv, nt, now, blob))
                new.append(TrajMeta(seq, tid, gid, task, lease, actor, mv, nt))
                if memory:
                    bodies.append((seq, t))
                seq += 1
            results.append(PutResult(new, dups))
        # sqlite3 releases the GIL around each statement step and must win it back from the
        # event loop thread afterwards: one step per INSERT_ROWS rows, not one per row.
        for i in range(0, len(rows), INSERT_ROWS):
            chunk = rows[i : i + INSERT_ROWS]
            conn.execute(_insert_rows(len(chunk)), [v for row in chunk for v in row])
        conn.execute("COMMIT")
        self._next_seq = seq
        self._bodies.update(bodies)
        return results

    async def claim(self, seqs: Sequence[int]) -> list[P.Trajectory]:
        """Durably count one more sampling of `seqs` and return their trajectories, in order.

        Committed before the caller hands them out, so a restart never serves them again
        beyond `max_times_sampled`.
        """
        return await self._call(self._claim, list(seqs))

    def _claim(self, seqs: list[int]) -> list[P.Trajectory]:
        conn = self._conn_or_raise()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE trajectories SET times_sampled = times_sampled + 1 WHERE seq = ?",
            [(s,) for s in seqs],
        )
        if self.in_memory:
            missing = [s for s in seqs if s not in self._bodies]
            if missing:
                conn.rollback()
                raise StoreError(f"trajectory seq {missing[0]} is missing")
            conn.execute("COMMIT")
            return [self._bodies[s] for s in seqs]
        blobs = []
        for s in seqs:
            row = conn.execute("SELECT blob FROM trajectories WHERE seq = ?", (s,)).fetchone()
            if row is None:
                conn.rollback()
                raise StoreError(f"trajectory seq {s} is missing")
            blobs.append(row[0])
        conn.execute("COMMIT")
        try:
            return [_traj_decoder.decode(b) for b in blobs]
        except msgspec.DecodeError as e:
            raise StoreCorruptError(f"undecodable trajectory blob: {e}") from None

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
            f"SELECT {_META_COLS}, times_sampled FROM trajectories"
            " WHERE evicted IS NULL AND times_sampled < ? ORDER BY seq",
            (max_times_sampled,),
        )
        return [TrajMeta(*r) for r in rows]

    # ------------------------------------------------------------ retention

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
        if self.in_memory:
            file_bytes = pages * page_size
        else:
            file_bytes = sum(
                os.path.getsize(f) for f in (self.path, self.path + "-wal") if os.path.exists(f)
            )
        return StoreUsage((pages - free) * page_size, file_bytes)

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
            "SELECT seq, evicted IS NOT NULL FROM trajectories"
            f" WHERE (evicted IS NOT NULL OR times_sampled >= ?){bound} ORDER BY seq LIMIT ?",
            (max_times_sampled, limit),
        ).fetchall()
        conn.executemany("DELETE FROM trajectories WHERE seq = ?", [(r[0],) for r in rows])
        self._save_next_seq(conn)
        conn.execute("COMMIT")
        self._drop_bodies(r[0] for r in rows)
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
        for s in seqs:
            row = conn.execute(
                "DELETE FROM trajectories WHERE seq = ? RETURNING evicted, times_sampled", (s,)
            ).fetchone()
            if row is None:
                continue  # already gone
            evicted, times_sampled = row
            if evicted is not None:
                out["evicted"] += 1
            elif times_sampled >= max_times_sampled:
                out["consumed"] += 1
            else:
                out["unconsumed"] += 1
        self._save_next_seq(conn)
        conn.execute("COMMIT")
        self._drop_bodies(seqs)
        return out

    def _save_next_seq(self, conn: sqlite3.Connection) -> None:
        """Deleting the newest rows must not let their seqs be handed out again: keep the
        high-water mark (in the deleting transaction)."""
        conn.execute(
            "INSERT OR REPLACE INTO kv (key, value) VALUES ('next_seq', ?)",
            (str(self._next_seq).encode(),),
        )

    def _drop_bodies(self, seqs: Iterable[int]) -> None:
        if self._bodies:
            for s in seqs:
                self._bodies.pop(s, None)

    def _deleted(self, counts: dict[str, int]) -> dict[str, int]:
        self.stored -= sum(counts.values())
        STORED.set(self.stored)
        return counts

    async def compact(self, step_pages: int = 2048) -> None:
        """Give freed pages back to the filesystem, `step_pages` per short transaction
        (auto_vacuum=INCREMENTAL databases), and truncate the WAL."""
        await self._call(self._compact, step_pages)
        await self.usage()

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

    async def set_max_page_count(self, pages: int) -> int:
        """Cap the database size in pages (tests simulate a full disk with it); returns the
        cap in force (SQLite never sets it below the current size)."""
        return await self._call(self._set_max_page_count, pages)

    def _set_max_page_count(self, pages: int) -> int:
        conn = self._conn_or_raise()
        return conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0]

    # ------------------------------------------------------------ key-value state

    async def kv_get(self, key: str) -> bytes | None:
        return await self._call(self._kv_get, key)

    def _kv_get(self, key: str) -> bytes | None:
        row = self._conn_or_raise().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    async def kv_set(self, key: str, value: bytes) -> None:
        await self.kv_write([(key, value)])

    async def kv_write(self, items: Sequence[tuple[str, bytes | None]]) -> None:
        """Set (or delete, for a None value) several keys in one transaction."""
        await self._call(self._kv_write, list(items))

    def _kv_write(self, items: list[tuple[str, bytes | None]]) -> None:
        conn = self._conn_or_raise()
        conn.execute("BEGIN IMMEDIATE")
        for key, value in items:
            if value is None:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))
        conn.execute("COMMIT")

    async def kv_scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return await self._call(self._kv_scan, prefix)

    def _kv_scan(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._conn_or_raise().execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [(k, bytes(v)) for k, v in rows]
