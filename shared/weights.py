"""The weight-transfer protocol's client side and its digest, shared by the roles.

A policy travels as one safetensors blob cut into chunks; the `WeightManifest` names every
chunk's blake2b-128 digest and the whole blob's. `fetch_blob` keeps at most `window` chunk
requests outstanding (credit-based flow control: a large model streams without flooding the
learner's endpoint) and checks every digest; a mismatch is an error, never a silent load.
"""

from __future__ import annotations

import asyncio
import hashlib

from shared import protocol as P
from shared.transport import Client


class WeightFetchError(RuntimeError):
    pass


def blake2b_128(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


async def fetch_blob(
    client: Client, manifest: P.WeightManifest, window: int = 4, timeout: float = 30.0
) -> bytes:
    """All chunks of `manifest` from the endpoint `client` is connected to, verified.

    Raises WeightFetchError on silence or a bad digest, ProtocolError on an Error reply.
    """
    n = len(manifest.chunk_digests)
    parts: list[bytes | None] = [None] * n
    next_chunk = 0
    in_flight = 0
    client.start()
    client.drain(P.WeightChunk)  # leftovers of an earlier, abandoned fetch
    client.drain(P.Error)
    while next_chunk < n or in_flight:
        while in_flight < window and next_chunk < n:
            await client.send(P.WeightRequest(version=manifest.version, chunk=next_chunk))
            next_chunk += 1
            in_flight += 1
        chunk_task = asyncio.ensure_future(client.recv(P.WeightChunk))
        err_task = asyncio.ensure_future(client.recv(P.Error))
        done, pending = await asyncio.wait(
            {chunk_task, err_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for f in pending:
            f.cancel()
        if not done:
            raise WeightFetchError(f"no weight chunk from {client.endpoint} in {timeout:.0f}s")
        for msg in (f.result() for f in done):
            if isinstance(msg, P.Error):
                raise P.ProtocolError(msg.reason, msg.detail)  # e.g. unknown_version
            assert isinstance(msg, P.WeightChunk)
            in_flight -= 1
            if msg.version != manifest.version or not 0 <= msg.chunk < n:
                continue
            if parts[msg.chunk] is not None:
                continue  # a late duplicate from an earlier fetch
            if blake2b_128(msg.data) != manifest.chunk_digests[msg.chunk]:
                raise WeightFetchError(f"chunk {msg.chunk} of v{manifest.version}: bad digest")
            parts[msg.chunk] = msg.data
    blob = b"".join(p for p in parts if p is not None)
    if len(blob) != manifest.total_bytes or blake2b_128(blob) != manifest.digest:
        raise WeightFetchError(f"v{manifest.version}: whole-blob digest or size mismatch")
    return blob
