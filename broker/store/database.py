"""The store's SQLite database: the one connection (used only on the store thread), the data
dir's lock, the pragmas and the schema, brought up to date on open."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.store.records import StoreError, StoreLockedError
from broker.store.schema import MIGRATIONS, PAGE_SIZE, SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)

IN_MEMORY = ":memory:"
# What `relaxed` lowers the connection's level to: in WAL mode a NORMAL commit is not fsynced
# (it survives a process crash, not an OS crash); FULL and EXTRA fsync the WAL on every commit.
_RELAXED = {"FULL": "NORMAL", "EXTRA": "NORMAL"}


class Database:
    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        """`synchronous`: the level of every transaction but those inside `relaxed`."""
        self.path = path
        self.synchronous = synchronous.upper()
        # Set by the store once open has fully succeeded: only then is there a WAL worth
        # folding back on close.
        self.opened = False
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    @property
    def in_memory(self) -> bool:
        return self.path == IN_MEMORY

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    def open(self) -> sqlite3.Connection:
        if not self.in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock()
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
        self._migrate(conn)
        return conn

    def _lock(self) -> None:
        # Two brokers on one data dir would interleave run ids and leases: refuse.
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"{self.path} is in use by another broker") from None
        self._lock_fd = fd

    def _migrate(self, conn: sqlite3.Connection) -> None:
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

    @contextmanager
    def relaxed(self) -> Iterator[None]:
        """Transactions inside run at `synchronous=NORMAL` (no fsync at commit): for those
        whose content is durable elsewhere already (the segment records of a group commit).
        The level can only change between transactions: one open when this block fails is
        rolled back before the connection's level is restored."""
        level = _RELAXED.get(self.synchronous)
        if level is None or self.in_memory:
            yield
            return
        conn = self.conn
        conn.execute(f"PRAGMA synchronous={level}")
        try:
            yield
        finally:
            if conn.in_transaction:
                self.rollback()
            conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def rollback(self) -> None:
        """Undo the open transaction, if any (after a failed operation)."""
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.rollback()
            except sqlite3.Error:
                log.exception("rollback failed")

    def close(self) -> None:
        if self._conn is not None:
            try:
                # Fold the WAL back so the data dir is one file at rest (not after a failed
                # open: a corrupt file has nothing to fold, and one error line is enough).
                if self.opened and not self.in_memory:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:  # e.g. closing after a failed open of a corrupt file
                log.warning("WAL checkpoint on close failed: %s", e)
            self._conn.close()
            self._conn = None

    def unlock(self) -> None:
        """Let another broker open the data dir (last, once everything in it is closed)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
