"""Weight publisher round trip over real ZMQ sockets on loopback."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load as st_load

from learner.publish import WeightPublisher
from shared import protocol as P
from shared.transport import Client
from shared.weights import blake2b_128
from shared.weights import fetch_blob as fetch_weights


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 16, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(50, 16, generator=g).t(),  # non-contiguous on purpose
        "model.norm.weight": torch.ones(16),
    }


async def _roundtrip() -> None:
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000)
    pub.start()
    client = Client(f"tcp://127.0.0.1:{pub.port}", peer_id="test-fetcher")
    try:
        sds = {v: _state_dict(v) for v in (0, 1, 2)}
        manifests = {v: pub.publish(v, sd) for v, sd in sds.items()}
        m2 = manifests[2]
        assert len(m2.chunk_digests) == -(-m2.total_bytes // 1000) > 3
        assert [t.name for t in m2.tensors] == list(sds[2])
        assert {t.name: t.dtype for t in m2.tensors}["model.layers.0.mlp.up_proj.weight"] == (
            "bfloat16"
        )
        assert pub.latest == m2

        for v in (1, 2):  # the latest two versions are servable
            blob = await fetch_weights(client, manifests[v], window=3)
            assert blake2b_128(blob) == manifests[v].digest
            loaded = st_load(blob)
            assert sorted(loaded) == sorted(sds[v])
            for k, t in sds[v].items():
                assert torch.equal(loaded[k], t), k

        with pytest.raises(P.ProtocolError) as e:  # version 0 was evicted
            await fetch_weights(client, manifests[0])
        assert e.value.reason == "unknown_version"

        # A fresh client: the evicted-version fetch above may still have Errors in flight.
        client.close()
        client = Client(f"tcp://127.0.0.1:{pub.port}", peer_id="test-fetcher-2")
        client.start()
        with pytest.raises(P.ProtocolError) as e:
            await client.request(P.WeightRequest(version=2, chunk=10_000), P.WeightChunk)
        assert e.value.reason == "bad_chunk"
    finally:
        client.close()
        await pub.aclose()


async def test_publish_fetch_roundtrip() -> None:
    await asyncio.wait_for(_roundtrip(), 20)


def test_tied_tensors_serialise() -> None:
    w = torch.randn(8, 4)
    pub = WeightPublisher("tcp://127.0.0.1:0")
    try:
        m = pub.publish(0, {"a": w, "b": w})
        assert m.total_bytes > 2 * w.numel() * 4
    finally:
        pub.server.close()


async def test_a_peer_that_never_reads_pins_a_bounded_number_of_chunks() -> None:
    """400 chunk requests pipelined by a peer that does not read: the endpoint queues at most
    PEER_CHUNK_CREDIT replies for it (ZeroMQ drops the rest), and keeps serving others."""
    import zmq
    import zmq.asyncio

    from learner.publish import PEER_CHUNK_CREDIT

    chunk, n = 1 << 18, 400

    async def main() -> None:
        pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=chunk)
        pub.start()
        ctx = zmq.asyncio.Context()
        greedy = ctx.socket(zmq.DEALER)
        greedy.setsockopt(zmq.RCVHWM, 1)
        greedy.setsockopt(zmq.RCVBUF, 64 * 1024)
        greedy.connect(f"tcp://127.0.0.1:{pub.port}")
        honest = Client(f"tcp://127.0.0.1:{pub.port}", peer_id="honest")
        try:
            m = pub.publish(1, {"w": torch.zeros(n * chunk // 4)})
            for i in range(n):
                await greedy.send(P.encode(P.WeightRequest(version=1, chunk=i)))
            while pub.chunks_served < n:  # every request handled (sent or dropped)
                await asyncio.sleep(0.01)
            blob = await fetch_weights(honest, m, window=4)  # others are still served
            assert blake2b_128(blob) == m.digest
            got = 0
            while await greedy.poll(500):
                await greedy.recv_multipart()
                got += 1
            # the queue, the reader's one slot, and what the kernel's socket buffers held
            assert got <= PEER_CHUNK_CREDIT + 1 + 32 < n, got
        finally:
            honest.close()
            greedy.close(0)
            ctx.term()
            await pub.aclose()

    await asyncio.wait_for(main(), 60)
