"""Fetch a published policy from the learner's weight endpoint, chunk by chunk.

Credit-based flow control: at most `window` chunk requests are outstanding, so a large model
streams without flooding either side. Every chunk and the whole blob are checked against the
digests in the manifest the broker relayed; a mismatch is an error, never a silent load.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile

from shared import protocol as P
from shared.transport import Client


class WeightFetchError(RuntimeError):
    pass


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


async def fetch_weights(
    endpoint: str,
    manifest: P.WeightManifest,
    peer_id: str,
    *,
    window: int = 4,
    timeout: float = 30.0,
    out_dir: str | None = None,
) -> str:
    """Download the blob of `manifest` and return the path of a safetensors file."""
    client = Client(endpoint, peer_id=f"{peer_id}-w{os.getpid()}-{manifest.version}")
    client.start()
    n = len(manifest.chunk_digests)
    chunks: list[bytes | None] = [None] * n
    try:
        next_req = 0
        outstanding = 0
        received = 0
        while received < n:
            while outstanding < window and next_req < n:
                await client.send(P.WeightRequest(version=manifest.version, chunk=next_req))
                next_req += 1
                outstanding += 1
            chunk_task = asyncio.ensure_future(client.recv(P.WeightChunk))
            err_task = asyncio.ensure_future(client.recv(P.Error))
            done, pending = await asyncio.wait(
                {chunk_task, err_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for f in pending:
                f.cancel()
            if not done:
                raise WeightFetchError(f"{endpoint}: no chunk within {timeout:.0f}s")
            msg = next(iter(done)).result()
            if isinstance(msg, P.Error):
                raise WeightFetchError(f"{endpoint}: {msg.reason} {msg.detail}")
            if msg.version != manifest.version or not 0 <= msg.chunk < n:
                continue
            if _digest(msg.data) != manifest.chunk_digests[msg.chunk]:
                raise WeightFetchError(f"chunk {msg.chunk} of v{manifest.version}: bad digest")
            if chunks[msg.chunk] is None:
                chunks[msg.chunk] = msg.data
                received += 1
            outstanding -= 1
    finally:
        client.close()
    blob = b"".join(c for c in chunks if c is not None)
    if len(blob) != manifest.total_bytes or _digest(blob) != manifest.digest:
        raise WeightFetchError(f"v{manifest.version}: blob digest or size mismatch")
    fd, path = tempfile.mkstemp(
        prefix=f"headrace-v{manifest.version}-", suffix=".safetensors", dir=out_dir
    )
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path
