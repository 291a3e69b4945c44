"""The store's key-value table: the broker's small durable state (run id, policy, leases,
feedback, curriculum, kept batches). Runs on the store thread, like every part of the store."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from broker.store.database import Database


def apply(conn: sqlite3.Connection, items: Sequence[tuple[str, bytes | None]]) -> None:
    """Set (or delete, for a None value) keys inside the caller's transaction."""
    for key, value in items:
        if value is None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))


class KeyValue:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: str) -> bytes | None:
        row = self._db.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def write(self, items: Sequence[tuple[str, bytes | None]]) -> None:
        """Set (or delete, for a None value) several keys in one transaction."""
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        apply(conn, items)
        conn.execute("COMMIT")

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._db.conn.execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [(k, bytes(v)) for k, v in rows]
