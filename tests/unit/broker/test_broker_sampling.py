"""Sampling and relay without sockets: batches are whole groups, leave only once their claim
is durable, and no forged version evicts or takes over, driven through `broker.sampling` and
`broker.relay` with a fake wiring."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.intake import Ingest
from broker.parts import Books, build_books
from broker.peers import Peer, Peers
from broker.relay import Relay
from broker.sampling import Sampling
from broker.store import Store
from shared import protocol as P
from shared.config import Config
from tests.broker_helpers import make_traj
from tests.unit.broker.test_broker_admission import Wired
from tests.unit.broker.test_broker_ingest import frames
from tests.unit.broker.test_broker_server import GROUP, FakeClock, config
from tests.unit.shared.test_shared_protocol import MANIFEST

LEARNER = Peer(b"l", "learner", role="learner")


async def stocked(
    cfg: Config, store: Store, wired: Wired, groups: dict[str, int], version: list[int]
) -> tuple[Sampling, Books]:
    """A sampling part whose replay holds `groups` (group id -> policy version), stored and
    acked through the intake as an actor's would be; `version[0]`: the newest publication."""
    clock = FakeClock()
    books = build_books(cfg, store, wired.spawn, clock)
    intake = Ingest(cfg, books, lambda: None, 0, clock, wired.io)
    for gid, v in groups.items():
        trajs = [make_traj(gid, i, version=v) for i in range(GROUP)]
        await intake.on_trajectories(b"a", Peer(b"a", "a"), frames(*trajs))
    await wired.settle()
    wired.sent.clear()
    return Sampling(cfg, books, lambda: version[0], wired.io), books


async def test_a_group_is_handed_out_whole(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    part, _ = await stocked(config(tmp_path), store, wired, {"g1": 0, "g2": 0}, [0])
    await part.on_sample(b"l", LEARNER, P.SampleRequest(batch_size=3))  # 1.5 groups asked
    await wired.settle()
    (batch,) = wired.of(P.BatchFrames)
    got = [P.decode_view(f).group_id for f in batch.items]
    assert got == ["g1", "g1", "g2", "g2"]  # never half a group: the baseline needs it all


async def test_nothing_leaves_before_its_claim_is_durable(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    part, books = await stocked(config(tmp_path), store, wired, {"g1": 0}, [0])
    gate, real_claim = asyncio.Event(), store.claim

    async def slow_claim(*args, **kw):
        await gate.wait()
        return await real_claim(*args, **kw)

    store.claim = slow_claim  # type: ignore[method-assign]
    await part.on_sample(b"l", LEARNER, P.SampleRequest(batch_size=2))
    await asyncio.sleep(0.05)
    assert wired.sent == [] and books.batches.records == {}
    gate.set()
    await wired.settle()
    (batch,) = wired.of(P.BatchFrames)
    assert list(books.batches.records) == [batch.batch_id]  # kept until a checkpoint


async def test_not_enough_for_a_batch_is_not_ready(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    part, _ = await stocked(config(tmp_path), store, wired, {"g1": 0}, [0])
    await part.on_sample(b"l", LEARNER, P.SampleRequest(batch_size=2 * GROUP))
    (reply,) = [m for _, m in wired.sent]
    assert isinstance(reply, P.NotReady) and reply.replay_size == GROUP
    assert part.learner_batch == 2 * GROUP  # what backpressure bounds outstanding data by


async def test_a_forged_learner_version_evicts_nothing(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    cfg = config(tmp_path, max_staleness=2)
    part, books = await stocked(cfg, store, wired, {"old": 0, "new": 5}, [5])
    await part.on_sample(b"l", LEARNER, P.SampleRequest(batch_size=GROUP, policy_version=2**40))
    await wired.settle()
    # capped at the newest publication plus an interval (v6): only the v0 group is too old
    assert books.retirement.counts == {"stale": 1} and wired.of(P.BatchFrames)


def relay(tmp_path: Path, store: Store, wired: Wired, clock: FakeClock) -> tuple[Relay, Peers]:
    cfg = config(tmp_path, heartbeat_timeout_s=10.0)
    peers = Peers(clock)
    books = build_books(cfg, store, wired.spawn, clock)
    return Relay(books, peers, horizon_s=100.0, io=wired.io), peers


async def test_an_implausible_policy_version_is_refused(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    part, _ = relay(tmp_path, store, wired, FakeClock())
    forged = P.PolicyPublished(version=10**6, weights_endpoint="tcp://evil:1", manifest=MANIFEST)
    await part.on_policy(b"l", LEARNER, forged)
    (error,) = wired.of(P.Error)
    assert "implausible" in error.detail and part.policy is None


async def test_a_policy_goes_to_the_actors_heard_from_recently(
    tmp_path: Path, store: Store
) -> None:
    clock, wired = FakeClock(), Wired()
    part, peers = relay(tmp_path, store, wired, clock)
    peers.heard(b"gone", P.Heartbeat(peer_id="gone"), None)
    clock.t += 200  # past the horizon
    peers.heard(b"near", P.Heartbeat(peer_id="near"), None)
    peers.heard(b"l", P.SampleRequest(batch_size=1), None)  # the learner: not an actor
    pub = P.PolicyPublished(version=1, weights_endpoint="tcp://w:1", manifest=MANIFEST)
    await part.on_policy(b"l", LEARNER, pub)
    assert wired.sent == [(b"near", pub)] and part.version == 1
    await wired.settle()
    assert await store.kv_get("policy") == P.encode(pub)  # every later Welcome carries it
