"""A file (or pipe) of wire frames: how a stored run travels from the broker to a replay.

Layout: the magic line `MAGIC`, then per frame a 4-byte little-endian length and that many
bytes of one encoded message (`shared.protocol`). `python -m broker export` writes one
`Batch` frame per GRPO group (the trajectories' stored encodings spliced in unchanged) and
`python -m learner replay` reads them back; neither role imports the other.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

MAGIC = b"headrace-frames 1\n"
_LEN = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 31  # a length above this is a damaged file, not a frame


class FrameFileError(ValueError):
    """Not a frame file, or one cut short."""


def write_header(f: BinaryIO) -> None:
    f.write(MAGIC)


def write_frame(f: BinaryIO, frame: bytes | memoryview) -> None:
    f.write(_LEN.pack(len(frame)))
    f.write(frame)


def read_frames(f: BinaryIO, name: str = "input") -> Iterator[bytes]:
    """The frames of `f`, in order; FrameFileError on a bad header or a truncated frame."""
    head = f.read(len(MAGIC))
    if head != MAGIC:
        raise FrameFileError(f"{name}: not a headrace frame file (bad header)")
    while True:
        raw = f.read(_LEN.size)
        if not raw:
            return
        if len(raw) < _LEN.size:
            raise FrameFileError(f"{name}: truncated frame length")
        (n,) = _LEN.unpack(raw)
        if n > MAX_FRAME_BYTES:
            raise FrameFileError(f"{name}: frame of {n} bytes: damaged file")
        frame = f.read(n)
        if len(frame) != n:
            raise FrameFileError(f"{name}: truncated frame ({len(frame)} of {n} bytes)")
        yield frame
