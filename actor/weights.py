"""Fetch a published policy from the learner's weight endpoint into a shared-memory buffer.

Trust: the manifest (every chunk's digest, and the digest over them) is the one the broker
relayed (`PolicyPublished`, or `Welcome` on connect); the learner's endpoint only ever serves
bytes. So whoever answers on the weight endpoint cannot make an actor load anything but the
bytes the broker announced: a mismatch raises `WeightDigestMismatch` and counts in
`headrace_actor_weights_rejected_total{reason="digest"}`. (The digests catch corruption and
stale or confused endpoints; the CurveZMQ channel keeps a forging one out.)

The chunks land straight in a `WeightBuffer`: a file in shared memory (/dev/shm), mapped once
and reused for every version, which the engine's process maps in turn and reads its tensors
from in place (actor/worker_ext.py). No join of parts, no copy to disk.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

from prometheus_client import Counter

from shared import protocol as P
from shared.security import CurveClient
from shared.transport import Client
from shared.weights import WeightFetchError, fetch_into

WEIGHTS_REJECTED = Counter(
    "headrace_actor_weights_rejected_total",
    "Policies refused: fetched bytes not matching the manifest the broker relayed, or an "
    "inconsistent announcement",
    ["reason"],
)

SHM_DIR = "/dev/shm"


class WeightDigestMismatch(WeightFetchError):
    """The weight endpoint served bytes whose digest is not the one the broker announced."""


class WeightBuffer:
    """A file in shared memory, mapped here, that holds one policy blob at a time.

    `path` is what the engine loads: on Linux the file is unlinked as soon as it is created
    and `path` is /proc/<pid>/fd/<fd> (other processes of ours open it there; it vanishes with
    this process, even a killed one). Its size is always the current blob's exactly (a
    safetensors reader wants no trailing bytes). The owner loads one version before it fetches
    the next into the same buffer: the engine never reads a half-written blob.
    """

    def __init__(self, directory: str | None = None, prefix: str = "headrace-weights-") -> None:
        if directory is None:
            directory = SHM_DIR if os.path.isdir(SHM_DIR) else None
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".safetensors", dir=directory)
        self._fd: int | None = fd
        self.path = name
        proc = f"/proc/{os.getpid()}/fd/{fd}"
        if os.path.exists(proc):  # Linux: unlinked at once, so a killed actor leaks nothing
            os.unlink(name)
            self.path = proc
        self._map: mmap.mmap | None = None
        self.size = 0

    def view(self, size: int) -> memoryview:
        """The buffer resized to `size` bytes (contents undefined), writable."""
        if self._fd is None:
            raise ValueError("WeightBuffer is closed")
        if size != self.size or self._map is None:
            self._unmap()
            os.ftruncate(self._fd, size)
            self.size = size
            if size:
                self._map = mmap.mmap(self._fd, size)
        return memoryview(self._map) if self._map is not None else memoryview(b"")

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()  # raises BufferError while a view of it is still alive
            self._map = None

    def close(self) -> None:
        """Unmap and delete the file (idempotent)."""
        try:
            self._unmap()
        except BufferError:
            # A view of the last version is still alive (the actor is exiting): the mapping
            # is freed with that view; the file is closed and deleted all the same.
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if not self.path.startswith("/proc/"):
                Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> WeightBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def fetch_weights(
    endpoint: str,
    manifest: P.WeightManifest,
    peer_id: str,
    *,
    curve: CurveClient | None = None,
    window: int = 4,
    timeout: float = 30.0,
    buffer: WeightBuffer,
) -> str:
    """Download and verify the blob of `manifest` into `buffer`; return its path, the
    safetensors file the engine loads (`Engine.update_weights`).

    `manifest` must come from the broker (see the module docstring). `curve`: the actor's keys
    for the weight endpoint (`shared.security.client_keys(sec, "actor", "learner")`).
    On an error `buffer` holds a partial blob: do not load it.
    """
    client = Client(endpoint, peer_id=f"{peer_id}-w{os.getpid()}-{manifest.version}", curve=curve)
    try:
        dest = buffer.view(manifest.total_bytes)
        try:
            await fetch_into(client, manifest, dest, window=window, timeout=timeout)
        finally:
            dest.release()
    except WeightFetchError as e:
        # fetch_into checks each chunk and the manifest's own digest and says "digest" then;
        # anything else (silence) stays a plain fetch error.
        if "digest" in str(e):
            WEIGHTS_REJECTED.labels(reason="digest").inc()
            raise WeightDigestMismatch(f"{endpoint}: {e}") from e
        raise
    finally:
        client.close()
    return buffer.path
