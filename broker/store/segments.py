"""Append-only segment files for trajectory bodies; SQLite keeps where each one is.

Why not blobs in SQLite: in WAL mode every page is written twice (to the WAL, then by the
checkpoint into the database) and the checkpoint fsyncs again, which caps durable ingest near
half of the disk's bandwidth. Here a group commit appends its trajectories' encodings to the
current segment with one `writev`, `fdatasync`s it, and only then commits the rows that point
at them (segment, offset, length) in SQLite.

Each body is preceded by a small header (`HEADER`: magic, length, the seq it was stored
under, the body's xxh3-64 checksum, and a checksum of the header itself), so a segment is a
self-describing log: the rows of the last group commits can be rebuilt from it
(recovery.py). That is what lets ingest commit its rows with `synchronous=NORMAL` (no WAL
fsync): what is durable when it is acked is the synced segment record, and the row is the
index to it. Rows point at the body, past its header, so reads never see headers.

The order makes a crash harmless: a committed row always points at synced bytes; bytes
without a durable row are either a torn/unsynced tail (never acked: fails its header or body
check and is dropped) or complete records whose row an OS crash lost (rebuilt at open when
the machine has rebooted since, truncated away otherwise: after a process crash every
committed row is still there, so such a record was never acked). A commit that fails
in-process is rolled back (truncated) at once.

Segments are numbered, `seg-00000001.log`, ...; a new one starts when the current one passes
`segment_bytes` and at every open (so a file that was being appended to at a crash is never
appended to again). A segment whose rows are all deleted is unlinked; `Store.compact` moves
the live rows out of mostly-dead segments first.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import xxhash

SEGMENT_BYTES = 256 * 1024 * 1024
_NAME = re.compile(r"^seg-(\d{8})\.log$")
_IOV_MAX = 1024  # writev's vector limit on Linux
MAGIC = b"HRS1"
# magic, body length, seq, body checksum (signed xxh3-64, as in the row), xxh32 of the rest
HEADER = struct.Struct("<4sIqqI")
_HEAD = struct.Struct("<4sIqq")


def header(seq: int, checksum: int, length: int) -> bytes:
    """The record header written before a body."""
    head = _HEAD.pack(MAGIC, length, seq, checksum)
    return head + struct.pack("<I", xxhash.xxh32_intdigest(head))


def parse_header(buf: bytes) -> tuple[int, int, int] | None:
    """(length, seq, checksum) of a well-formed header, None for anything else (a torn or
    unsynced tail, zeros, bodies of the previous headerless format)."""
    if len(buf) < HEADER.size:
        return None
    magic, length, seq, check, hcheck = HEADER.unpack_from(buf)
    if magic != MAGIC or xxhash.xxh32_intdigest(buf[: _HEAD.size]) != hcheck:
        return None
    return length, seq, check


class SegmentLog:
    def __init__(
        self, directory: Path, segment_bytes: int = SEGMENT_BYTES, quota_bytes: int | None = None
    ) -> None:
        """`quota_bytes`: refuse (ENOSPC) appends that would grow the segments past it - a
        hard cap on their disk footprint, also how tests make a disk "full" on demand."""
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.quota_bytes = quota_bytes
        self.current = 0
        self._fd: int | None = None
        self._size = 0  # bytes in the current segment
        self._total = 0  # bytes in all segments
        self._readers: dict[int, int] = {}  # segment -> read-only fd
        self._dirty: set[int] = set()  # fds appended to since the last sync

    def path(self, segment: int) -> Path:
        return self.dir / f"seg-{segment:08d}.log"

    def existing(self) -> list[int]:
        if not self.dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def open(self, referenced: set[int]) -> list[int]:
        """Start a new segment; unlink segments no row references (their appends never
        committed, or all their rows were deleted). Returns the unlinked ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        have = self.existing()
        orphans = [s for s in have if s not in referenced]
        for s in orphans:
            self.path(s).unlink(missing_ok=True)
        self._total = sum(self.path(s).stat().st_size for s in have if s in referenced)
        self._start(max([*have, 0]) + 1)
        return orphans

    def _start(self, segment: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self.current = segment
        self._fd = os.open(self.path(segment), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._total += self._size
        # The directory entry of a new file must be durable before rows point into it.
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def rotate(self) -> None:
        """Continue in a new segment (so the current one can be compacted and unlinked)."""
        self._start(self.current + 1)

    def mark(self) -> tuple[int, int]:
        """Where the next append goes; `rollback(mark)` undoes every append since."""
        return self.current, self._size

    def append(
        self, frames: Sequence[Any], seqs: Sequence[int], checksums: Sequence[int]
    ) -> list[tuple[int, int, int]]:
        """Write `frames` (buffer-protocol objects; not yet durable: call `sync`), each after
        its header (`seqs`, `checksums`: the row's); returns (segment, offset, length) of each
        body. Raises OSError (ENOSPC for the quota); a partial write is truncated away."""
        if self._size >= self.segment_bytes:
            self._start(self.current + 1)
        assert self._fd is not None
        lengths = [memoryview(f).nbytes for f in frames]
        parts: list[Any] = []
        for f, seq, check, k in zip(frames, seqs, checksums, lengths, strict=True):
            parts += (header(seq, check, k), f)
        n = sum(lengths) + HEADER.size * len(frames)
        if self.quota_bytes is not None and self._total + n > self.quota_bytes:
            raise OSError(errno.ENOSPC, "segment quota exceeded", str(self.path(self.current)))
        start = self._size
        try:
            for i in range(0, len(parts), _IOV_MAX):
                part = parts[i : i + _IOV_MAX]
                want = sum(memoryview(f).nbytes for f in part)
                done = os.writev(self._fd, part)
                if done != want:  # short write (disk full mid-way): finish or fail
                    rest = b"".join(bytes(memoryview(f)) for f in part)[done:]
                    while rest:
                        k = os.write(self._fd, rest)
                        rest = rest[k:]
        except OSError as e:
            os.ftruncate(self._fd, start)
            raise OSError(e.errno, e.strerror, str(self.path(self.current))) from None
        self._size += n
        self._total += n
        self._dirty.add(self._fd)
        out, off = [], start
        for k in lengths:
            out.append((self.current, off + HEADER.size, k))
            off += HEADER.size + k
        return out

    def sync(self) -> None:
        for fd in self._dirty:
            os.fdatasync(fd)
        self._dirty.clear()

    def rollback(self, mark: tuple[int, int]) -> None:
        """Drop what was appended since `mark` (the commit that wrote it failed)."""
        segment, size = mark
        if segment != self.current:  # rotated since: the new segment holds nothing committed
            size = 0
        assert self._fd is not None
        os.ftruncate(self._fd, size)
        self._total -= self._size - size
        self._size = size

    def read(self, segment: int, offset: int, length: int) -> bytes:
        fd = self._readers.get(segment)
        if fd is None:
            fd = self._readers[segment] = os.open(self.path(segment), os.O_RDONLY)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read at {offset}+{length}", str(self.path(segment)))
        return data

    def remove(self, segments: Iterable[int]) -> None:
        """Unlink segments no row uses any more (never the one being appended to)."""
        for s in segments:
            if s == self.current:
                continue
            fd = self._readers.pop(s, None)
            if fd is not None:
                os.close(fd)
            p = self.path(s)
            if p.exists():
                self._total -= p.stat().st_size
                p.unlink()

    def size(self, segment: int) -> int:
        return self._size if segment == self.current else self.path(segment).stat().st_size

    @property
    def total_bytes(self) -> int:
        return self._total

    def close(self) -> None:
        for fd in [*self._readers.values(), *([self._fd] if self._fd is not None else [])]:
            os.close(fd)
        self._readers.clear()
        self._fd = None
