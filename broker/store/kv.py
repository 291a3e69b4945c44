"""The store's key-value table: the broker's small durable state (run id, policy, leases,
feedback, curriculum, kept batches). Mixed into `Store`; runs on the store thread like the
rest of it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class KeyValue:
    # provided by Store
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _conn_or_raise(self) -> sqlite3.Connection:
        raise NotImplementedError

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
        self._kv_apply(conn, items)
        conn.execute("COMMIT")

    @staticmethod
    def _kv_apply(conn: sqlite3.Connection, items: list[tuple[str, bytes | None]]) -> None:
        for key, value in items:
            if value is None:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    async def kv_scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return await self._call(self._kv_scan, prefix)

    def _kv_scan(self, prefix: str) -> list[tuple[str, bytes]]:
        rows = self._conn_or_raise().execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [(k, bytes(v)) for k, v in rows]
