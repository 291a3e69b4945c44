"""The broker's durable trajectory store: SQLite (WAL) for rows and state, segment files for
trajectory bodies, group commit on one store thread. See store.py and segments.py."""

from broker.store.integrity import CORRUPT, CorruptRecords
from broker.store.records import (
    Claimed,
    Incoming,
    PutResult,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreUsage,
    TrajMeta,
)
from broker.store.schema import DB_NAME
from broker.store.segments import SegmentLog
from broker.store.store import Store

__all__ = [
    "CORRUPT",
    "DB_NAME",
    "CorruptRecords",
    "Claimed",
    "Incoming",
    "PutResult",
    "SegmentLog",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreUsage",
    "TrajMeta",
]
