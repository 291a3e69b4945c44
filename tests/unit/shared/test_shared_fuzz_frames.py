"""Fuzzed frames against a live broker and a live weight publisher (hypothesis).

Each server runs in its own event loop thread; the test speaks raw ZMQ through a plain DEALER,
so any bytes at all reach the ROUTER. Frames that still decode (a flipped byte inside a
string) are not bad and are not sent. For the rest the contract is: one `Error` per frame,
in order, with the reason the decoder gives here; `headrace_rejected_frames_total` grows by
exactly the number sent; the server answers afterwards as before. A frame beyond the ZMQ hard
cap (2x the protocol cap) is dropped by ZMQ itself, uncounted, and the server lives on.
benchmarks/fuzz.py runs the same generators at scale.
"""

from __future__ import annotations

import asyncio
import threading
import typing
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz import HUGE_HEADERS, WRONG_VALUES, Classifier, sample_messages
from learner.publish import WeightPublisher
from shared import protocol as P
from shared.config import Config
from shared.metrics import REJECTED_FRAMES
from tests.broker_helpers import running

CAP = 4096  # protocol cap of both servers here; ZMQ drops frames over 2x this
VALID = [P.encode(m) for m in sample_messages()]
BUILTINS = [msgspec.to_builtins(m) for m in sample_messages()]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- strategies


def _flip(frame: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(frame)
    for pos, xor in edits:
        out[pos % len(out)] ^= xor
    return bytes(out)


def _retype(msg: dict, pick: int, value: object) -> bytes:
    msg = dict(msg)
    fields = [k for k in msg if k != "type"] or ["bogus"]
    msg[fields[pick % len(fields)]] = value
    return msgspec.msgpack.encode(msg)


valid = st.sampled_from(VALID)
offset = st.integers(0, 10**6)  # taken modulo the frame's length
flipped = st.builds(
    _flip, valid, st.lists(st.tuples(offset, st.integers(1, 255)), min_size=1, max_size=4)
)
truncated = st.builds(lambda f, cut: f[: cut % len(f)], valid, offset)
extended = st.builds(bytes.__add__, valid, st.binary(min_size=1, max_size=32))
wrong_type = st.builds(
    _retype, st.sampled_from(BUILTINS), st.integers(0, 50), st.sampled_from(WRONG_VALUES)
)
unknown_tag = st.builds(
    lambda m, tag: msgspec.msgpack.encode({**m, "type": tag}),
    st.sampled_from(BUILTINS),
    st.text(max_size=12) | st.integers(-(2**63), 2**64 - 1),
)
huge_length = st.builds(
    lambda f, at, header: f[: at % len(f)] + header, valid, offset, st.sampled_from(HUGE_HEADERS)
)
deep = st.builds(
    lambda unit, n: unit * n + b"\xc0",
    st.sampled_from([b"\x91", b"\x81\xa1k"]),
    st.integers(1, 1200),
)
oversize = st.builds(lambda f, n: f + bytes(n), valid, st.integers(CAP, CAP + 100))
single = st.one_of(
    st.binary(max_size=300),
    flipped,
    truncated,
    extended,
    wrong_type,
    unknown_tag,
    huge_length,
    deep,
    oversize,
)
frame_st = st.one_of(single, st.lists(st.binary(max_size=40) | valid, min_size=2, max_size=4))


# ---------------------------------------------------------------- live servers


Serve = Callable[[asyncio.Event, list[str]], Coroutine[Any, Any, None]]


class LoopThread:
    """An event loop in a daemon thread running `serve` until closed: the test thread stays
    synchronous, which hypothesis needs, while the server runs its real asyncio code."""

    def __init__(self, serve: Serve) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoint: list[str] = []  # `serve` appends its endpoint once it is listening
        self.stop: asyncio.Event | None = None

        async def main() -> None:
            self.stop = asyncio.Event()
            await serve(self.stop, self.endpoint)

        self.done = asyncio.run_coroutine_threadsafe(main(), self.loop)
        for _ in range(600):
            if self.endpoint or self.done.done():
                break
            threading.Event().wait(0.05)
        if not self.endpoint:
            raise RuntimeError(f"server did not start: {self.done.exception(timeout=1)!r}")

    def close(self) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.done.result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def _broker(stop: asyncio.Event, endpoint: list[str]) -> None:
    cfg = Config()
    b = msgspec.structs.replace(cfg.broker, durability="none", max_frame_bytes=CAP)
    async with running(msgspec.structs.replace(cfg, broker=b)) as (broker, _):
        assert broker.server is not None
        endpoint.append(broker.server.endpoint)
        await stop.wait()
        assert not broker._loops[0].done(), "the serve loop ended"


async def _publisher(stop: asyncio.Event, endpoint: list[str]) -> None:
    import torch

    pub = WeightPublisher("tcp://127.0.0.1:0", chunk_bytes=512, max_frame_bytes=CAP)
    pub.publish(1, {"w": torch.ones(300)})
    task = pub.start()
    endpoint.append(pub.endpoint)
    await stop.wait()
    assert not task.done(), "the serve loop ended"
    await pub.aclose()


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    server = LoopThread(_broker)
    yield server.endpoint[0]
    server.close()


@pytest.fixture(scope="module")
def publisher() -> Iterator[str]:
    server = LoopThread(_publisher)
    yield server.endpoint[0]
    server.close()


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    return sock


def _rejected_total() -> float:
    samples = (s for m in REJECTED_FRAMES.collect() for s in m.samples)
    return sum(s.value for s in samples if s.name.endswith("_total"))


def _fuzz(sock: zmq.Socket, frames: list[bytes | list[bytes]], classify: Classifier) -> None:
    before = _rejected_total()
    want: list[str] = []
    for frame in frames:
        reason = classify.reason(frame)
        if reason is None:
            continue  # still a valid message: not what this test is about
        if isinstance(frame, list):
            sock.send_multipart(frame)
        else:
            sock.send(frame)
        want.append(reason)
    got = []
    for _ in want:
        reply = P.decode(sock.recv())
        assert isinstance(reply, P.Error), reply
        got.append(reply.reason)
    assert got == want
    assert _rejected_total() - before == len(want)


@pytest.fixture(scope="module")
def broker_sock(ctx: zmq.Context, broker: str) -> zmq.Socket:
    return _dealer(ctx, broker)


@pytest.fixture(scope="module")
def publisher_sock(ctx: zmq.Context, publisher: str) -> zmq.Socket:
    return _dealer(ctx, publisher)


@SETTINGS
@given(frames=st.lists(frame_st, min_size=40, max_size=120))
def test_broker_answers_every_bad_frame(broker_sock: zmq.Socket, frames: list) -> None:
    _fuzz(broker_sock, frames, Classifier(P.BrokerInbound, CAP))
    broker_sock.send(P.encode(P.Status()))
    assert isinstance(P.decode(broker_sock.recv()), P.StatusReply)


@settings(SETTINGS, max_examples=25)
@given(frames=st.lists(frame_st, min_size=40, max_size=120))
def test_publisher_answers_every_bad_frame(publisher_sock: zmq.Socket, frames: list) -> None:
    _fuzz(publisher_sock, frames, Classifier(P.Message, CAP))
    publisher_sock.send(P.encode(P.WeightRequest(version=1, chunk=0)))
    assert isinstance(P.decode(publisher_sock.recv()), P.WeightChunk)


@pytest.mark.parametrize("server", ["broker", "publisher"])
def test_frames_over_the_hard_cap_are_dropped(
    server: str, ctx: zmq.Context, request: pytest.FixtureRequest
) -> None:
    endpoint = request.getfixturevalue(server)
    before = _rejected_total()
    sock = _dealer(ctx, endpoint)
    sock.setsockopt(zmq.RCVTIMEO, 500)
    sock.send(bytes(2 * CAP + 1))
    with pytest.raises(zmq.Again):  # ZMQ closed the connection: nothing comes back
        sock.recv()
    sock.close()
    assert _rejected_total() == before
    probe = _dealer(ctx, endpoint)
    probe.send(P.encode(P.Status() if server == "broker" else P.WeightRequest(version=1, chunk=0)))
    assert isinstance(P.decode(probe.recv()), P.StatusReply | P.WeightChunk)
    probe.close()


def test_seeds_cover_every_message_type() -> None:
    assert {type(m) for m in sample_messages()} == set(typing.get_args(P.Message))
