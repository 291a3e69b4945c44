"""Fetch a published policy from the learner's weight endpoint into a safetensors file."""

from __future__ import annotations

import os
import tempfile

from shared import protocol as P
from shared.transport import Client
from shared.weights import fetch_blob


async def fetch_weights(
    endpoint: str,
    manifest: P.WeightManifest,
    peer_id: str,
    *,
    window: int = 4,
    timeout: float = 30.0,
    out_dir: str | None = None,
) -> str:
    """Download and verify the blob of `manifest`; return the path of a safetensors file.

    The engine loads the file in its own process (`collective_rpc` takes a path, not bytes).
    """
    client = Client(endpoint, peer_id=f"{peer_id}-w{os.getpid()}-{manifest.version}")
    try:
        blob = await fetch_blob(client, manifest, window=window, timeout=timeout)
    finally:
        client.close()
    fd, path = tempfile.mkstemp(
        prefix=f"headrace-v{manifest.version}-", suffix=".safetensors", dir=out_dir
    )
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path
