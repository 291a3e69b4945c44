"""The learner's weight endpoint: versioned safetensors blobs served in digest-checked chunks.

`publish(version, state_dict)` serialises the state dict (HF parameter names, safetensors
layout, so the actor hands it straight to vLLM's loader; under LoRA only the adapter, named
as in `adapter_model.safetensors`) in one pass into a reusable buffer: every tensor is copied
(and cast to the publisher's `dtype`, when set) straight to its place behind the header. The
blob is cut into `chunk_bytes` pieces with an xxh3-128 digest each (shared/weights.py) in a
`WeightManifest`, which the learner broadcasts via the broker as `PolicyPublished`.

A ZMQ ROUTER answers `WeightRequest{version, chunk}` with `WeightChunk`. Flow control is
credit-based on the client side (a fetcher keeps at most its window of requests outstanding)
and capped in bytes on the server side, whatever a peer sends. Every reply is encoded into a
frame of its own and handed to ZeroMQ as a message it owns (a copy: a queued reply holds no
blob buffer, so no peer can hold back a publish, and no Python object, so none waits on
pyzmq's garbage-collector thread to be freed), and ZeroMQ queues at most
`peer_replies(chunk_bytes)` of them per peer (its SNDHWM) and drops the rest. That count is
derived from a byte budget, PEER_REPLY_BUDGET (64 MiB), under a floor that a legitimate
fetcher never exceeds (PEER_MIN_REPLIES): one peer that pipelines requests without reading
pins at most `peer_pin_bytes(chunk_bytes)` here, 64 MiB for chunks up to 3.76 MiB and 17
replies above (68 MiB at the default 4 MiB chunk), and each such peer pins its own. The copy
costs no measurable fetch throughput (256 MiB on loopback: 2.2-2.7 GB/s either way).

The latest `keep` versions stay servable, so an actor that started fetching version v can
finish after v+1 is published. They live in `keep + 1` buffers, reused across versions: a
new version is written only into a buffer that no servable version holds and that no reply is
being encoded from (`_Slot.readers`), so a half-written version is never served. The first
publish grows the other buffers in a background thread (pages populated up front: a first
write that faults every page in costs several times the copy), so no later one allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from shared import protocol as P
from shared.metrics import WEIGHTS_SYNC_SECONDS
from shared.security import CurveServer
from shared.transport import Server
from shared.weights import DIGEST_ALG, chunk_digest, digest_of_chunks

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# What one peer that requests without reading may make this endpoint hold in unsent replies.
# (It was a count, 128 replies: 512 MiB of 4 MiB chunks per peer, 859 MB RSS in the soak.)
PEER_REPLY_BUDGET = 64 * 1024 * 1024
# The replies a legitimate fetcher can have queued at once, whatever the chunk size:
# shared/weights.py `fetch_into` keeps `window` requests outstanding (4, as the actors fetch:
# actor/weights.py) and sends what is still pending again after 3, 6 and 12 s of silence
# (within its 30 s budget), so an endpoint that stalled may owe it 4 replies per request and
# answer them in one burst. The floor keeps all of them. (Only stalls of 3 s and more again
# and again, with single answers between, make it owe more; ZeroMQ then drops late replies,
# and a chunk still missing is asked for again after 3 s: a delay, not a failed fetch.)
FETCH_WINDOW = 4
PEER_MIN_REPLIES = 4 * FETCH_WINDOW
# The bytes a reply is counted at: a chunk's frame is the chunk plus a msgpack envelope of
# at most 60 bytes; an Error reply (unknown version, bad chunk, a malformed frame answered by
# shared/transport.py with at most 500 characters of detail) encodes to under 2.1 KiB, so
# 4 KiB with ZeroMQ's per-message overhead. Small chunks are counted at that size too: the
# count derived from the budget then bounds a flood of Errors as well.
CHUNK_ENVELOPE_BYTES = 64
ERROR_REPLY_BYTES = 4096


def _reply_bytes(chunk_bytes: int) -> int:
    return max(chunk_bytes + CHUNK_ENVELOPE_BYTES, ERROR_REPLY_BYTES)


def peer_replies(chunk_bytes: int, budget: int = PEER_REPLY_BUDGET) -> int:
    """The SNDHWM for `chunk_bytes` chunks: ZeroMQ queues at most this many replies per peer
    (and drops the rest) plus the one its I/O thread is writing out, so the budget is divided
    by the reply size less one; never under PEER_MIN_REPLIES."""
    return max(PEER_MIN_REPLIES, budget // _reply_bytes(chunk_bytes) - 1)


def peer_pin_bytes(chunk_bytes: int, budget: int = PEER_REPLY_BUDGET) -> int:
    """At most what one peer that never reads pins here in replies: the queue and the reply
    being written out. `budget`, unless the floor rules (chunks over ~3.76 MiB: 17 replies)."""
    return (peer_replies(chunk_bytes, budget) + 1) * _reply_bytes(chunk_bytes)


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def wire_dtype(engine_dtype: str) -> torch.dtype | None:
    """The dtype to publish in for engines running `engine_dtype` (`shared.models.model_dtype`):
    theirs when it is a 16-bit float (half the bytes of the learner's float32 weights, and what
    the engine would cast to anyway), else None (as trained)."""
    return getattr(torch, engine_dtype) if engine_dtype in ("bfloat16", "float16") else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", "bfloat16", ...


@dataclass(frozen=True)
class Layout:
    """Where every tensor of a state dict goes in its safetensors blob."""

    header: bytes  # the 8-byte length and the JSON header, padded to 8 bytes
    entries: list[tuple[str, torch.Tensor, torch.dtype, int]]  # name, source, dtype, offset
    # (in the state dict's order; offsets from the end of the header)
    total_bytes: int


def layout(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> Layout:
    """The safetensors layout of `state_dict`, floating tensors cast to `dtype` if given."""
    entries: list[tuple[str, torch.Tensor, torch.dtype, int]] = []
    for name, t in state_dict.items():
        out = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {out} has no safetensors name here")
        entries.append((name, t, out, 0))
    meta: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    end = 0
    # widest elements first (as safetensors' own writer): every tensor starts aligned
    for name, t, out, _ in sorted(entries, key=lambda e: -e[2].itemsize):
        nbytes = t.numel() * out.itemsize
        meta[name] = {"dtype": _ST_DTYPES[out], "shape": list(t.shape)}
        meta[name]["data_offsets"] = [end, end + nbytes]
        offsets[name] = end
        end += nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # the data starts 8-byte aligned, as safetensors'
    header = len(text).to_bytes(8, "little") + text
    placed = [(name, t, out, offsets[name]) for name, t, out, _ in entries]
    return Layout(header, placed, len(header) + end)


def serialize_into(lay: Layout, buf: bytearray | mmap.mmap) -> None:
    """Write the blob of `lay` into `buf[: lay.total_bytes]`: one copy per tensor."""
    base = len(lay.header)
    buf[:base] = lay.header
    for _, t, dtype, offset in lay.entries:
        n = t.numel()
        if n == 0:
            continue
        dst = torch.frombuffer(buf, dtype=dtype, count=n, offset=base + offset)
        with torch.no_grad():
            dst.view(t.shape).copy_(t.detach())


def serialize_state_dict(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> bytes:
    """safetensors bytes of `state_dict` (tied tensors saved under each name)."""
    lay = layout(state_dict, dtype)
    buf = bytearray(lay.total_bytes)
    serialize_into(lay, buf)
    return bytes(buf)


def _alloc(size: int) -> bytearray | mmap.mmap:
    """`size` bytes whose pages are already in place (Linux: an anonymous mapping populated in
    one call). A fresh buffer otherwise faults in every 4 KiB page on its first write, which
    costs more than the copy itself: 621 MiB took 0.6 s to fault in, 0.12 s to copy into."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    if size == 0:
        return bytearray()
    try:
        return mmap.mmap(-1, size, flags=flags)
    except (OSError, ValueError):
        return bytearray(size)


class _Slot:
    """A reusable blob buffer; `readers` counts replies being encoded from it. A buffer that
    grows is replaced, never closed: a reply still holding a view of the old one keeps it."""

    def __init__(self) -> None:
        self.buf: bytearray | mmap.mmap = bytearray()
        self.readers = 0


@dataclass
class _Published:
    manifest: P.WeightManifest
    slot: _Slot

    @property
    def blob(self) -> memoryview:
        return memoryview(self.slot.buf)[: self.manifest.total_bytes]


class WeightPublisher:
    """Serves the latest `keep` published versions on `bind` (call `start()` inside a loop)."""

    def __init__(
        self,
        bind: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        keep: int = 2,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        curve: CurveServer | None = None,
        dtype: torch.dtype | None = None,
        peer_budget: int = PEER_REPLY_BUDGET,
    ) -> None:
        """`curve`: `shared.security.server_keys(cfg.security, "learner", admit=("actor",))`
        serves only listed actor keys over CurveZMQ (None: plaintext). `dtype`: publish
        floating tensors in this dtype (the engine's, e.g. bfloat16: half the bytes of a
        float32 model); None keeps each tensor's own. `peer_budget`: the bytes of unsent
        replies one peer may pin (`peer_pin_bytes`)."""
        if chunk_bytes <= 0 or chunk_bytes > max_frame_bytes // 2:
            raise ValueError(f"chunk_bytes must be in (0, {max_frame_bytes // 2}]")
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        self.dtype = dtype
        # Server-side bound: a peer that pipelines requests without reading the replies pins
        # at most `peer_pin_bytes` here (N such peers pin N times that); ZeroMQ drops its
        # replies past `peer_replies`, which a legitimate fetcher never reaches.
        self.peer_replies = peer_replies(chunk_bytes, peer_budget)
        self.peer_pin_bytes = peer_pin_bytes(chunk_bytes, peer_budget)
        self.server = Server(
            bind, max_frame_bytes=max_frame_bytes, curve=curve, sndhwm=self.peer_replies
        )
        self.endpoint = self.server.endpoint  # the real address (port resolved if bound to :0)
        self._versions: OrderedDict[int, _Published] = OrderedDict()
        self._slots = [_Slot() for _ in range(keep + 1)]
        self._lock = threading.Lock()  # _versions swaps and _Slot.readers
        self._task: asyncio.Task[None] | None = None
        self._warming: threading.Thread | None = None  # grows the spare buffers
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

        Thread-safe with respect to the serving task: the heavy work happens in a buffer no
        servable version uses, before a single dict update, so this may run in a worker thread
        (`asyncio.to_thread`) while the event loop keeps answering chunk requests for the
        previous versions. One publish at a time.
        """
        t0 = time.perf_counter()
        lay = layout(state_dict, self.dtype)
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        slot = self._free_slot()
        if len(slot.buf) < lay.total_bytes:
            slot.buf = _alloc(lay.total_bytes)  # grown once, then reused
        serialize_into(lay, slot.buf)
        view = memoryview(slot.buf)[: lay.total_bytes]
        digests = [
            chunk_digest(view[i : i + self.chunk_bytes])
            for i in range(0, lay.total_bytes, self.chunk_bytes)
        ]
        manifest = P.WeightManifest(
            version=version,
            total_bytes=lay.total_bytes,
            chunk_bytes=self.chunk_bytes,
            chunk_digests=digests,
            tensors=[
                P.TensorInfo(name=name, dtype=_dtype_name(dtype), shape=list(t.shape))
                for name, t, dtype, _ in lay.entries
            ],
            digest=digest_of_chunks(digests),
            kind=kind,
            adapter_config=adapter_config,
            digest_alg=DIGEST_ALG,
        )
        with self._lock:
            versions = OrderedDict(self._versions)
            versions.pop(version, None)  # re-publishing a version (after resume) replaces it
            versions[version] = _Published(manifest, slot)
            while len(versions) > self.keep:
                versions.popitem(last=False)
            self._versions = versions  # one swap; the server reads whichever it sees
        self._warm_spares(lay.total_bytes)
        WEIGHTS_SYNC_SECONDS.labels(phase="publish").observe(time.perf_counter() - t0)
        log.debug(  # every step: the progress bar shows the version
            "published policy v%d (%s): %d bytes, %d chunks",
            version,
            kind,
            lay.total_bytes,
            len(digests),
        )
        return manifest

    def _warm_spares(self, size: int) -> None:
        """Grow, in a background thread, the buffers no servable version holds that are
        smaller than `size`: the next publishes find theirs in place (the first `keep`
        after start would otherwise each fault in a whole blob while a step waits on them).
        The next `publish` joins the thread before it picks a buffer."""
        with self._lock:
            held = {id(p.slot) for p in self._versions.values()}
        small = [s for s in self._slots if id(s) not in held and len(s.buf) < size]
        if not small:
            return

        def grow() -> None:
            for s in small:
                buf = _alloc(size)
                with self._lock:  # a slot with no reader and no version gains no reader
                    if s.readers == 0 and all(p.slot is not s for p in self._versions.values()):
                        s.buf = buf

        self._warming = threading.Thread(target=grow, name="publish-warm", daemon=True)
        self._warming.start()

    def _free_slot(self) -> _Slot:
        """A buffer that no servable version holds, once no reply is being read from it.

        Versions leave `_versions` before their buffer is reused, and a reply is encoded only
        from a version found there under the lock: no new reader can appear on this slot.
        """
        with self._lock:
            held = {id(p.slot) for p in self._versions.values()}
        slot = next(s for s in self._slots if id(s) not in held)
        while True:
            with self._lock:
                if slot.readers == 0:
                    return slot
            time.sleep(0.001)

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        return self._task

    def _acquire(self, version: int) -> _Published | None:
        with self._lock:
            pub = self._versions.get(version)
            if pub is not None:
                pub.slot.readers += 1
            return pub

    def _release(self, pub: _Published) -> None:
        with self._lock:
            pub.slot.readers -= 1

    async def _serve(self) -> None:
        while True:
            ident, msg = await self.server.recv()
            if not isinstance(msg, P.WeightRequest):
                await self.server.send(
                    ident, P.Error(reason="unexpected", detail=f"{type(msg).__name__}")
                )
                continue
            pub = self._acquire(msg.version)
            if pub is None:
                have = ",".join(map(str, self._versions)) or "none"
                await self.server.send(
                    ident,
                    P.Error(reason="unknown_version", detail=f"v{msg.version}; have {have}"),
                )
                continue
            try:
                await self._send_chunk(ident, msg, pub)
            finally:
                self._release(pub)

    async def _send_chunk(self, ident: bytes, msg: P.WeightRequest, pub: _Published) -> None:
        n_chunks = len(pub.manifest.chunk_digests)
        if not 0 <= msg.chunk < n_chunks:
            await self.server.send(
                ident, P.Error(reason="bad_chunk", detail=f"{msg.chunk} of {n_chunks}")
            )
            return
        start = msg.chunk * self.chunk_bytes
        data = pub.blob[start : start + self.chunk_bytes]  # read while the slot is held
        # copy=True: ZeroMQ copies the frame into a message of its own and frees it itself,
        # in its I/O thread, once written out or dropped past the SNDHWM. A zero-copy send
        # would keep each frame alive until pyzmq's garbage-collector thread takes the GIL
        # to release it: with this loop busy encoding replies for a peer that floods
        # requests, such frames, sent or dropped, piled up by the hundred MiB past the SNDHWM
        # bound (up to 91 frames, 364 MiB, measured).
        chunk = P.WeightChunk(version=msg.version, chunk=msg.chunk, data=data)
        await self.server.send(ident, chunk, copy=True)
        self.chunks_served += 1

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.server.close()
