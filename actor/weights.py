"""Fetch a published policy from the learner's weight endpoint into a safetensors file.

Trust: the manifest (every chunk's digest and the whole blob's) is the one the broker relayed
(`PolicyPublished`, or `Welcome` on connect); the learner's endpoint only ever serves bytes.
So whoever answers on the weight endpoint cannot make an actor load anything but the bytes the
broker announced: a mismatch raises `WeightDigestMismatch` and counts in
`headrace_actor_weights_rejected_total{reason="digest"}`.
"""

from __future__ import annotations

import os
import tempfile

from prometheus_client import Counter

from shared import protocol as P
from shared.security import CurveClient
from shared.transport import Client
from shared.weights import WeightFetchError, fetch_blob

WEIGHTS_REJECTED = Counter(
    "headrace_actor_weights_rejected_total",
    "Policies refused: fetched bytes not matching the manifest the broker relayed, or an "
    "inconsistent announcement",
    ["reason"],
)


class WeightDigestMismatch(WeightFetchError):
    """The weight endpoint served bytes whose digest is not the one the broker announced."""


async def fetch_weights(
    endpoint: str,
    manifest: P.WeightManifest,
    peer_id: str,
    *,
    curve: CurveClient | None = None,
    window: int = 4,
    timeout: float = 30.0,
    out_dir: str | None = None,
) -> str:
    """Download and verify the blob of `manifest`; return the path of a safetensors file.

    `manifest` must come from the broker (see the module docstring). `curve`: the actor's keys
    for the weight endpoint (`shared.security.client_keys(sec, "actor", "learner")`).
    The engine loads the file in its own process (`collective_rpc` takes a path, not bytes).
    """
    client = Client(endpoint, peer_id=f"{peer_id}-w{os.getpid()}-{manifest.version}", curve=curve)
    try:
        blob = await fetch_blob(client, manifest, window=window, timeout=timeout)
    except WeightFetchError as e:
        # fetch_blob checks each chunk and the whole blob against `manifest` and says
        # "digest" in both messages; anything else (silence) stays a plain fetch error.
        if "digest" in str(e):
            WEIGHTS_REJECTED.labels(reason="digest").inc()
            raise WeightDigestMismatch(f"{endpoint}: {e}") from e
        raise
    finally:
        client.close()
    fd, path = tempfile.mkstemp(
        prefix=f"headrace-v{manifest.version}-", suffix=".safetensors", dir=out_dir
    )
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path
