"""Weight publisher round trip over real ZMQ sockets on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from safetensors.torch import load as st_load

from learner.publish import WeightPublisher, serialize_state_dict
from shared import protocol as P
from shared.transport import Client
from shared.weights import DIGEST_ALG, WeightFetchError, chunk_digest, digest_of_chunks
from shared.weights import fetch_blob as fetch_weights

T = TypeVar("T")


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
        assert m2.digest_alg == DIGEST_ALG == "xxh3-128"
        assert m2.digest == digest_of_chunks(m2.chunk_digests)

        for v in (1, 2):  # the latest two versions are servable
            blob = await fetch_weights(client, manifests[v], window=3)
            assert blob == serialize_state_dict(sds[v])
            assert [chunk_digest(blob[i : i + 1000]) for i in range(0, len(blob), 1000)] == (
                manifests[v].chunk_digests
            )
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


def _kernel_slack() -> int:
    """What loopback TCP can hold between the endpoint and a reader: the endpoint's send
    buffer (autotuned up to tcp_wmem's maximum) and the reader's (RCVBUF 64 KiB, doubled)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem = 4 << 20
    return wmem + 2 * (64 << 10)


async def _greedy_peer(chunk: int, n_chunks: int, requests: int) -> tuple[int, int, int]:
    """A peer pipelines `requests` chunk requests (cycling over `n_chunks` chunks) without
    reading; once every one is handled (sent or dropped), an honest fetcher fetches the blob,
    then the peer reads what was queued for it. Returns (replies, their bytes, the bytes of
    Python objects that ZeroMQ still referenced before the peer read: zero-copy frames that
    only pyzmq's garbage-collector thread releases)."""
    import zmq
    import zmq.asyncio
    from zmq.utils.garbage import gc

    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=chunk)
    pub.start()
    ctx = zmq.asyncio.Context()
    greedy = ctx.socket(zmq.DEALER)
    greedy.setsockopt(zmq.RCVHWM, 1)
    greedy.setsockopt(zmq.RCVBUF, 64 * 1024)
    greedy.connect(f"tcp://127.0.0.1:{pub.port}")
    honest = Client(f"tcp://127.0.0.1:{pub.port}", peer_id="honest")
    try:
        m = pub.publish(1, {"w": torch.zeros(n_chunks * chunk // 4)})
        for i in range(requests):
            await greedy.send(P.encode(P.WeightRequest(version=1, chunk=i % n_chunks)))
        while pub.chunks_served < requests:  # every request handled (sent or dropped)
            await asyncio.sleep(0.01)
        blob = await fetch_weights(honest, m, window=4)  # others are still served
        assert len(blob) == m.total_bytes
        in_python = sum(memoryview(r.obj).nbytes for r in list(gc.refs.values()))
        got = got_bytes = 0
        while await greedy.poll(500):
            frame = await greedy.recv()
            assert isinstance(P.decode(frame), P.WeightChunk)
            got, got_bytes = got + 1, got_bytes + len(frame)
        return got, got_bytes, in_python
    finally:
        honest.close()
        greedy.close(0)
        ctx.term()
        await pub.aclose()


async def test_a_peer_that_never_reads_pins_at_most_the_byte_budget() -> None:
    """400 requests for 1 MiB chunks pipelined by a peer that does not read: the endpoint
    holds at most 64 MiB of replies for it (ZeroMQ drops the rest; it was 128 replies, 128 MiB
    here and 512 MiB of 4 MiB chunks), and keeps serving others."""
    chunk = 1 << 20
    got, got_bytes, in_python = await asyncio.wait_for(_greedy_peer(chunk, 16, 400), 60)
    # what the endpoint held, what loopback TCP held, the reader's one slot and the reply it
    # was reading in
    slack = _kernel_slack() + 2 * (chunk + 64)
    assert got_bytes <= (64 << 20) + slack, (got, got_bytes)
    assert got < 400
    # The queued replies are ZeroMQ's own copies: none waits on pyzmq's gc thread, which a
    # busy serving loop starves (zero-copy frames, sent or dropped, piled up past the bound).
    assert in_python < chunk, in_python

    from learner.publish import PEER_REPLY_BUDGET, peer_pin_bytes

    assert peer_pin_bytes(chunk) <= PEER_REPLY_BUDGET == 64 << 20


async def test_a_fetcher_that_sent_every_request_four_times_loses_no_reply() -> None:
    """fetch_into's worst case against an endpoint that stalled: its window of 4 requests,
    each sent 4 times (after 3, 6 and 12 s of silence), answered in one burst while it is not
    reading yet. At the default 4 MiB chunk the byte budget alone would queue 14 replies; the
    floor queues all 16."""
    from learner.publish import DEFAULT_CHUNK_BYTES, FETCH_WINDOW, peer_replies

    assert peer_replies(DEFAULT_CHUNK_BYTES) >= 4 * FETCH_WINDOW == 16
    got, _, _ = await asyncio.wait_for(_greedy_peer(DEFAULT_CHUNK_BYTES, 4, 16), 60)
    assert got == 16


def test_bfloat16_publish_halves_the_floats() -> None:
    pub = WeightPublisher("tcp://127.0.0.1:0", dtype=torch.bfloat16)
    try:
        sd = _state_dict(3)
        m = pub.publish(1, sd)
        loaded = st_load(bytes(pub._versions[1].blob))
        for k, t in sd.items():
            assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], t.bfloat16()), k
        assert {t.dtype for t in m.tensors} == {"bfloat16"}
        assert m.total_bytes < len(serialize_state_dict(sd))
    finally:
        pub.server.close()


async def test_a_corrupted_chunk_is_refused_by_name() -> None:
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000)
    pub.start()
    client = Client(pub.endpoint, peer_id="test-corrupt")
    try:
        m = pub.publish(1, _state_dict(0))
        pub._versions[1].slot.buf[2500] ^= 0xFF  # chunk 2, on the endpoint's side
        with pytest.raises(WeightFetchError, match="chunk 2 of v1: bad digest"):
            await asyncio.wait_for(fetch_weights(client, m, window=2), 10)
    finally:
        client.close()
        await pub.aclose()


async def test_buffers_are_reused_but_never_while_a_reply_reads_them() -> None:
    """keep=2 versions in 3 buffers: v4 goes into v1's buffer, and only once the reply being
    encoded from v1 (held since before v1 was evicted) is done with it."""
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000, keep=2)
    try:
        sds = {v: _state_dict(v) for v in range(1, 5)}
        pub.publish(1, sds[1])
        pub.publish(2, sds[2])
        v1 = pub._acquire(1)  # the serving loop, mid-reply on v1
        assert v1 is not None
        pub.publish(3, sds[3])  # a third buffer: v1 evicted, its buffer still being read
        assert pub._acquire(1) is None  # evicted: no new reader on its buffer
        writer = asyncio.create_task(asyncio.to_thread(pub.publish, 4, sds[4]))
        await asyncio.sleep(0.3)
        assert not writer.done()  # waits for the reader
        assert bytes(v1.blob) == serialize_state_dict(sds[1])  # untouched meanwhile
        pub._release(v1)
        m4 = await asyncio.wait_for(writer, 5)
        assert pub._versions[4].slot is v1.slot  # reused, not reallocated
        assert len({id(s) for s in pub._slots}) == 3
        for v in (3, 4):
            assert bytes(pub._versions[v].blob) == serialize_state_dict(sds[v])
        assert m4.digest == digest_of_chunks(m4.chunk_digests)
    finally:
        pub.server.close()


async def test_fetches_racing_publishes_never_see_a_half_written_version() -> None:
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=512, keep=2)
    pub.start()
    client = Client(pub.endpoint, peer_id="test-race")
    sds = {v: _state_dict(v) for v in range(8)}
    blobs = {v: serialize_state_dict(sd) for v, sd in sds.items()}
    manifests = {0: pub.publish(0, sds[0])}

    def publish_all() -> None:
        for v in range(1, 8):
            manifests[v] = pub.publish(v, sds[v])

    try:
        writer = asyncio.create_task(asyncio.to_thread(publish_all))
        fetched = 0
        while not writer.done() or fetched == 0:
            m = manifests[max(manifests)]
            try:
                blob = await asyncio.wait_for(fetch_weights(client, m, window=2), 10)
            except P.ProtocolError as e:  # evicted mid-fetch: fine, never a bad chunk
                assert e.reason == "unknown_version"
                client.close()
                client = Client(pub.endpoint, peer_id=f"test-race-{m.version}")
                continue
            assert blob == blobs[m.version]
            fetched += 1
        await writer
    finally:
        client.close()
        await pub.aclose()


def test_spare_buffers_are_grown_after_the_first_publish_then_reused() -> None:
    """The first publish grows the other keep buffers in the background, so the next ones
    write into memory already in place; from then on no publish allocates."""
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000, keep=2)
    try:
        sds = {v: _state_dict(v) for v in range(1, 6)}
        m1 = pub.publish(1, sds[1])
        assert pub._warming is not None
        pub._warming.join(10)
        assert all(len(s.buf) >= m1.total_bytes for s in pub._slots)
        bufs = [id(s.buf) for s in pub._slots]
        for v in range(2, 6):
            pub.publish(v, sds[v])
            assert pub._warming is None  # nothing left to grow
        assert [id(s.buf) for s in pub._slots] == bufs
        for v in (4, 5):
            assert bytes(pub._versions[v].blob) == serialize_state_dict(sds[v])
    finally:
        pub.server.close()


def test_a_buffer_being_read_is_not_replaced_by_the_warm_up() -> None:
    """A reply still encoding from an evicted version's buffer keeps that buffer: the warm-up
    (here for a bigger model) grows only buffers nobody reads."""
    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000, keep=1)
    try:
        pub.publish(1, _state_dict(1))
        assert pub._warming is not None
        pub._warming.join(10)
        reader = pub._acquire(1)
        assert reader is not None
        before, buf = bytes(reader.blob), reader.slot.buf
        big = {**_state_dict(2), "extra": torch.randn(4000)}
        pub.publish(2, big)  # v1 evicted, its buffer still read: not grown
        assert pub._warming is not None
        pub._warming.join(10)
        assert reader.slot.buf is buf and bytes(reader.blob) == before
        pub._release(reader)
    finally:
        pub.server.close()


async def _when_port_free(bind: Callable[[], T]) -> T:
    """`bind()`, again while the address is in use: libzmq closes a socket's listener in its
    own threads, after `close` returns (on a loaded machine, often after the next bind)."""
    import zmq

    for _ in range(100):
        try:
            return bind()
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            await asyncio.sleep(0.05)
    return bind()


async def _fetch_across_a_learner_restart() -> float:
    import zmq
    import zmq.asyncio

    first = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=1000)
    manifest = first.publish(3, _state_dict(3))
    endpoint = f"tcp://127.0.0.1:{first.port}"
    await first.aclose()  # only its address and manifest are wanted
    # The learner before the restart: it takes the requests and dies without answering.
    ctx = zmq.asyncio.Context.instance()
    doomed = ctx.socket(zmq.ROUTER)
    await _when_port_free(lambda: doomed.bind(endpoint))
    client = Client(endpoint, peer_id="restart-fetcher")
    fetch = asyncio.ensure_future(fetch_weights(client, manifest, window=2, timeout=20))
    await doomed.recv_multipart()  # a request reached it
    doomed.close(linger=0)
    second = await _when_port_free(lambda: WeightPublisher(endpoint, chunk_bytes=1000))
    second.publish(3, _state_dict(3))  # the restarted learner serves the same version
    second.start()
    t0 = asyncio.get_running_loop().time()
    try:
        blob = await fetch
    finally:
        client.close()
        await second.aclose()
    assert blob == serialize_state_dict(_state_dict(3))
    return asyncio.get_running_loop().time() - t0


async def test_a_fetch_survives_the_learner_restarting_on_the_same_endpoint() -> None:
    """Requests the dead process took are sent again: the fetch ends in seconds, not after
    the silence timeout (the chaos test's real actor once waited out 30 s per try)."""
    elapsed = await asyncio.wait_for(_fetch_across_a_learner_restart(), 30)
    assert elapsed < 10, elapsed
