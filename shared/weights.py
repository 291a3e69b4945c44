"""The weight-transfer protocol's client side and its digests, shared by the roles.

A policy travels as one safetensors blob cut into chunks; the `WeightManifest` names every
chunk's digest (`digest_alg`, today xxh3-128: it runs at memory speed, blake2b did not) and a
`digest` over those chunk digests, which identifies the version's bytes without a second pass
over them. `fetch_into` keeps at most `window` chunk requests outstanding (credit-based flow
control: a large model streams without flooding the learner's endpoint), checks every chunk
against the manifest and writes it straight into the caller's buffer (a chunk's data is a view
into the received frame: one copy per chunk, into that buffer); a mismatch is an error, never
a silent load.

What the digests guard against: corruption and a confused or stale endpoint. An endpoint that
forges bytes on purpose is kept out by the CurveZMQ channel (shared/security.py), which
authenticates the learner and protects every chunk in transit; the manifest, relayed by the
broker, stays the source of truth for what an actor loads.
"""

from __future__ import annotations

import asyncio

import xxhash

from shared import protocol as P
from shared.transport import Client

DIGEST_ALG = "xxh3-128"
# Seconds before unanswered chunk requests are sent again (a chunk is 4 MiB: well under this).
RESEND_S = 3.0


class WeightFetchError(RuntimeError):
    pass


def chunk_digest(data: bytes | bytearray | memoryview) -> str:
    """The digest of one chunk under DIGEST_ALG (hex)."""
    return xxhash.xxh3_128_hexdigest(data)


def digest_of_chunks(chunk_digests: list[str]) -> str:
    """The manifest's `digest`: the chunk digests, in order, hashed (no pass over the blob)."""
    return xxhash.xxh3_128_hexdigest("".join(chunk_digests).encode())


def check_manifest(manifest: P.WeightManifest) -> None:
    """Refuse a manifest this code cannot verify, or one inconsistent in itself."""
    if manifest.digest_alg != DIGEST_ALG:
        raise WeightFetchError(
            f"v{manifest.version}: digest algorithm {manifest.digest_alg!r} unsupported"
            f" (this actor checks {DIGEST_ALG})"
        )
    n = len(manifest.chunk_digests)
    cb = manifest.chunk_bytes
    if cb <= 0 or manifest.total_bytes < 0 or n != -(-manifest.total_bytes // cb):
        raise WeightFetchError(f"v{manifest.version}: chunk count does not match the size")
    if digest_of_chunks(manifest.chunk_digests) != manifest.digest:
        raise WeightFetchError(f"v{manifest.version}: whole-blob digest mismatch")


async def fetch_into(
    client: Client,
    manifest: P.WeightManifest,
    dest: memoryview,
    window: int = 4,
    timeout: float = 30.0,
    resend_s: float = RESEND_S,
) -> None:
    """Write every chunk of `manifest`, verified, into `dest` (at least `total_bytes` long).

    Requests unanswered for `resend_s` are sent again (then after twice as long, and so on):
    a learner restarted on the same endpoint never answers what its previous process
    received, and ZeroMQ does not say so.
    Raises WeightFetchError after `timeout` seconds without any reply, on a bad chunk ("chunk
    i of vN: bad digest") or on an unusable manifest, ProtocolError on an Error reply. On an
    error `dest` holds a partial blob: the caller must not load it.
    """
    check_manifest(manifest)
    if len(dest) < manifest.total_bytes:
        raise ValueError(f"buffer of {len(dest)} bytes < {manifest.total_bytes}")
    n, cb = len(manifest.chunk_digests), manifest.chunk_bytes
    done = [False] * n
    left = n
    next_chunk = 0
    pending: list[int] = []  # requested, not yet received, oldest first
    client.start()
    client.drain(P.WeightChunk)  # leftovers of an earlier, abandoned fetch
    client.drain(P.Error)
    silent, wait = 0.0, min(resend_s, timeout)
    while left:
        while len(pending) < window and next_chunk < n:
            await client.send(P.WeightRequest(version=manifest.version, chunk=next_chunk))
            pending.append(next_chunk)
            next_chunk += 1
        msg = await _next_reply(client, wait)
        if msg is None:
            silent += wait
            if silent >= timeout:
                raise WeightFetchError(f"no weight chunk from {client.endpoint} in {timeout:.0f}s")
            # doubling: a learner that is only slow gets a few duplicates, not one per period
            wait = min(2 * wait, timeout - silent)
            for i in pending:
                await client.send(P.WeightRequest(version=manifest.version, chunk=i))
            continue
        silent, wait = 0.0, min(resend_s, timeout)
        i = msg.chunk
        if msg.version != manifest.version or not 0 <= i < n or done[i]:
            continue  # a late duplicate, or a reply to an earlier fetch
        size = min(cb, manifest.total_bytes - i * cb)
        if len(msg.data) != size or chunk_digest(msg.data) != manifest.chunk_digests[i]:
            raise WeightFetchError(f"chunk {i} of v{manifest.version}: bad digest")
        dest[i * cb : i * cb + size] = msg.data
        done[i] = True
        left -= 1
        if i in pending:
            pending.remove(i)


async def _next_reply(client: Client, timeout: float) -> P.WeightChunk | None:
    """The next chunk, None after `timeout` seconds of silence; an Error reply raises."""
    chunk_task = asyncio.ensure_future(client.recv(P.WeightChunk))
    err_task = asyncio.ensure_future(client.recv(P.Error))
    done, pending = await asyncio.wait(
        {chunk_task, err_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    for f in pending:
        f.cancel()
    if not done:
        return None
    if err_task in done:
        err = err_task.result()
        raise P.ProtocolError(err.reason, err.detail)  # e.g. unknown_version
    return chunk_task.result()


async def fetch_blob(
    client: Client, manifest: P.WeightManifest, window: int = 4, timeout: float = 30.0
) -> bytes:
    """All chunks of `manifest`, verified, as one `bytes` (tests and tools; the actor fetches
    into a reusable buffer with `fetch_into`)."""
    buf = bytearray(manifest.total_bytes)
    await fetch_into(client, manifest, memoryview(buf), window=window, timeout=timeout)
    return bytes(buf)
