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
- `durability="none"` is the same code on an in-memory database: throwaway runs, no disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from broker.metrics import COMMIT_BATCHES, COMMIT_SECONDS, STORE_ERRORS, STORED
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
    "INSERT OR IGNORE INTO trajectories (traj_id, group_id, task_id, lease_id, actor_id,"
    " min_version, n_tokens, created, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
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


def _classify(e: sqlite3.Error) -> StoreError:
    text = str(e).lower()
    if "full" in text:  # SQLITE_FULL: "database or disk is full"
        return StoreFullError(str(e))
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StoreCorruptError(str(e))
    return StoreError(str(e))


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


@dataclass(slots=True)
class PutResult:
    new: list[TrajMeta]
    duplicates: list[str]


_traj_decoder = msgspec.msgpack.Decoder(P.Trajectory)


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

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._call(self._open_db)
        STORED.set(self.stored)
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
        conn.execute("PRAGMA journal_mode=WAL")  # in-memory DBs answer "memory": fine
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        if self.max_page_count:
            conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
        conn.executescript(_SCHEMA)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
        self.stored = conn.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0]

    def _close_db(self) -> None:
        if self._conn is not None:
            try:
                if not self.in_memory:  # fold the WAL back so the data dir is one file at rest
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
            raise _classify(e) from e

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
            log.error("group commit of %d batches failed (%s): not acked", len(batch), e)
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
        COMMIT_SECONDS.observe(time.perf_counter() - t0)
        COMMIT_BATCHES.observe(len(batch))
        self.stored += sum(len(r.new) for r in results)
        STORED.set(self.stored)
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    def _commit(self, batches: list[Sequence[P.Trajectory]]) -> list[PutResult]:
        conn = self._conn_or_raise()
        now = time.time()
        results = []
        conn.execute("BEGIN IMMEDIATE")
        for trajs in batches:
            new, dups = [], []
            for t in trajs:
                meta = (t.traj_id, t.group_id, t.task_id, t.lease_id, t.actor_id)
                mv, nt = t.min_policy_version(), t.n_tokens
                cur = conn.execute(_INSERT, (*meta, mv, nt, now, P.encode(t)))
                if cur.rowcount == 1:
                    new.append(TrajMeta(cur.lastrowid or 0, *meta, mv, nt))
                else:
                    dups.append(t.traj_id)
            results.append(PutResult(new, dups))
        conn.execute("COMMIT")
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
