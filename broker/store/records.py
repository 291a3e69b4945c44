"""What the store takes and gives: errors, index rows, received and claimed trajectories."""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass

import msgspec

from shared import protocol as P


class StoreError(RuntimeError):
    """A store operation failed; nothing of it was committed."""

    kind = "error"


class StoreFullError(StoreError):
    kind = "full"


class StoreCorruptError(StoreError):
    kind = "corrupt"


class StoreLockedError(StoreError):
    kind = "locked"


def classify(e: sqlite3.Error | OSError, path: str) -> StoreError:
    """Our error for a sqlite3 or file one; the message names the file."""
    if isinstance(e, OSError):
        where = e.filename or path
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StoreFullError(f"{where}: {e.strerror}")
        return StoreError(f"{where}: {e.strerror or e}")
    text = str(e).lower()
    msg = f"{path}: {e}"
    if "full" in text:  # SQLITE_FULL: "database or disk is full"
        return StoreFullError(msg)
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return StoreCorruptError(msg)
    return StoreError(msg)


@dataclass(frozen=True, slots=True)
class TrajMeta:
    """What the replay index and the curriculum need of a stored trajectory (the body stays
    in its segment file)."""

    seq: int
    traj_id: str
    group_id: str
    task_id: str
    lease_id: str
    actor_id: str
    min_version: int
    n_tokens: int
    reward: float
    success: bool
    sample_prob: float  # of the grant the episode ran under (curriculum importance weight)
    seconds: float  # episode wall time
    times_sampled: int = 0


@dataclass(frozen=True, slots=True)
class StoreUsage:
    used_bytes: int  # pages in use (not on the freelist) x page size: what retention limits
    file_bytes: int  # database + WAL files on disk (the pages, for an in-memory store)


@dataclass(slots=True)
class PutResult:
    new: list[TrajMeta]
    duplicates: list[str]


@dataclass(slots=True)
class Incoming:
    """A received trajectory: a validated zero-copy view (for the index columns) and its
    complete encoding as it arrived (stored as is: no re-encode, no copy of its arrays)."""

    view: P.TrajectoryView | P.Trajectory
    frame: msgspec.Raw | bytes

    @classmethod
    def of(cls, t: P.Trajectory) -> Incoming:
        return cls(t, P.encode(t))


@dataclass(frozen=True, slots=True)
class Claimed:
    """A trajectory handed out: its stored encoding, spliced unchanged into a `BatchFrames`."""

    seq: int
    min_version: int
    frame: msgspec.Raw

    def decode(self) -> P.Trajectory:
        return msgspec.msgpack.decode(self.frame, type=P.Trajectory)
