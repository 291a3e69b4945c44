"""The learner's weight endpoint: versioned safetensors blobs served in digest-checked chunks.

`publish(version, state_dict)` serialises the state dict (HF parameter names, safetensors
layout, so the actor hands it straight to vLLM's loader; under LoRA only the adapter, named
as in `adapter_model.safetensors`) into one blob, cuts it into
`chunk_bytes` pieces and records a blake2b-128 digest per chunk and for the whole blob in a
`WeightManifest`, which the learner broadcasts via the broker as `PolicyPublished`.

A ZMQ ROUTER answers `WeightRequest{version, chunk}` with `WeightChunk`. Flow control is
credit-based on the client side (a fetcher keeps at most its window of requests outstanding)
and capped on the server side: at most PEER_CHUNK_CREDIT chunks queue per peer, whatever it
sends. The latest `keep` versions stay
servable, so an actor that started fetching version v can finish after v+1 is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from safetensors.torch import save as st_save

from shared import protocol as P
from shared.metrics import WEIGHTS_SYNC_SECONDS
from shared.security import CurveServer
from shared.transport import Server
from shared.weights import blake2b_128

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# Replies queued per peer at most: 128 x 4 MiB chunks = 512 MiB for a peer that requests
# without reading (it was 10,000 x 4 MiB). fetch_blob keeps 4 requests outstanding; a burst
# of small Error replies (a confused or fuzzing client) still fits.
PEER_CHUNK_CREDIT = 128


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", "bfloat16", ...


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of `state_dict`: contiguous CPU tensors, storage sharing broken."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied embeddings); copy the repeats.
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return st_save(tensors)


@dataclass
class _Published:
    manifest: P.WeightManifest
    blob: bytes


class WeightPublisher:
    """Serves the latest `keep` published versions on `bind` (call `start()` inside a loop)."""

    def __init__(
        self,
        bind: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        keep: int = 2,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        curve: CurveServer | None = None,
    ) -> None:
        """`curve`: `shared.security.server_keys(cfg.security, "learner", admit=("actor",))`
        serves only listed actor keys over CurveZMQ (None: plaintext)."""
        if chunk_bytes <= 0 or chunk_bytes > max_frame_bytes // 2:
            raise ValueError(f"chunk_bytes must be in (0, {max_frame_bytes // 2}]")
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        # Server-side bound: a peer that pipelines requests without reading the replies pins
        # at most PEER_CHUNK_CREDIT chunks here; ZeroMQ drops the rest.
        self.server = Server(
            bind, max_frame_bytes=max_frame_bytes, curve=curve, sndhwm=PEER_CHUNK_CREDIT
        )
        self.endpoint = self.server.endpoint  # the real address (port resolved if bound to :0)
        self._versions: OrderedDict[int, _Published] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.chunks_served = 0

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def latest(self) -> P.WeightManifest | None:
        return next(reversed(self._versions.values())).manifest if self._versions else None

    def publish(
        self,
        version: int,
        state_dict: Mapping[str, torch.Tensor],
        kind: str = "full",
        adapter_config: dict[str, Any] | None = None,
    ) -> P.WeightManifest:
        """Serialise and make `version` servable; returns its manifest.

        `kind` "lora": `state_dict` is a PEFT adapter (learner/lora.py `publishable`) and
        `adapter_config` its adapter_config.json, which the manifest carries to the actors.

        Thread-safe with respect to the serving task: the heavy work happens before a single
        dict update, so this may run in a worker thread (`asyncio.to_thread`) while the event
        loop keeps answering chunk requests for the previous versions.
        """
        t0 = time.perf_counter()
        blob = serialize_state_dict(state_dict)
        view = memoryview(blob)
        digests = [
            blake2b_128(view[i : i + self.chunk_bytes])
            for i in range(0, len(blob), self.chunk_bytes)
        ]
        manifest = P.WeightManifest(
            version=version,
            total_bytes=len(blob),
            chunk_bytes=self.chunk_bytes,
            chunk_digests=digests,
            tensors=[
                P.TensorInfo(name=k, dtype=_dtype_name(v.dtype), shape=list(v.shape))
                for k, v in state_dict.items()
            ],
            digest=blake2b_128(blob),
            kind=kind,
            adapter_config=adapter_config,
        )
        versions = OrderedDict(self._versions)
        versions.pop(version, None)  # re-publishing a version (after resume) replaces it
        versions[version] = _Published(manifest, blob)
        while len(versions) > self.keep:
            versions.popitem(last=False)
        self._versions = versions  # one atomic swap; the server reads whichever it sees
        WEIGHTS_SYNC_SECONDS.labels(phase="publish").observe(time.perf_counter() - t0)
        log.debug(  # every step: the progress bar shows the version
            "published policy v%d (%s): %d bytes, %d chunks", version, kind, len(blob), len(digests)
        )
        return manifest

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        return self._task

    async def _serve(self) -> None:
        while True:
            ident, msg = await self.server.recv()
            if not isinstance(msg, P.WeightRequest):
                await self.server.send(
                    ident, P.Error(reason="unexpected", detail=f"{type(msg).__name__}")
                )
                continue
            pub = self._versions.get(msg.version)
            if pub is None:
                have = ",".join(map(str, self._versions)) or "none"
                await self.server.send(
                    ident,
                    P.Error(reason="unknown_version", detail=f"v{msg.version}; have {have}"),
                )
                continue
            n_chunks = len(pub.manifest.chunk_digests)
            if not 0 <= msg.chunk < n_chunks:
                await self.server.send(
                    ident, P.Error(reason="bad_chunk", detail=f"{msg.chunk} of {n_chunks}")
                )
                continue
            start = msg.chunk * self.chunk_bytes
            # memoryview: the frame is encoded straight from the blob, no per-chunk copy here.
            data = cast(bytes, memoryview(pub.blob)[start : start + self.chunk_bytes])
            await self.server.send(
                ident, P.WeightChunk(version=msg.version, chunk=msg.chunk, data=data)
            )
            self.chunks_served += 1

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.server.close()
