"""The broker's message handling, in process: a real ROUTER on loopback, real DEALER clients."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from shared import protocol as P
from shared.config import Config
from shared.handshake import run_digest
from shared.transport import Client
from tests.broker_helpers import make_traj, running, take

GROUP = 2


def group(
    group_id: str, version: int = 0, n_tokens: int = 6, task_id: str = "symbols-L1-0"
) -> P.TrajectoryBatch:
    items = [make_traj(group_id, i, version, n_tokens, task_id=task_id) for i in range(GROUP)]
    return P.TrajectoryBatch(items=items)


def leased(lease: P.Lease) -> P.TrajectoryBatch:
    """A lease's whole group, as its actor sends it."""
    return group(lease.lease_id, task_id=lease.task.task_id)


def config(data_dir: Path, max_model_len: int = 512, **broker: object) -> Config:
    cfg = Config()
    b = msgspec.structs.replace(
        cfg.broker, data_dir=str(data_dir), group_size=GROUP, commit_interval_s=0.005, **broker
    )
    # No model on disk here: token ids are checked for >= 0 only (see test_validation).
    model = msgspec.structs.replace(cfg.model, path=str(data_dir / "no-model"))
    actor = msgspec.structs.replace(cfg.actor, max_model_len=max_model_len)
    return msgspec.structs.replace(cfg, broker=b, model=model, actor=actor)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def status(c: Client) -> dict:
    return (await c.request(P.Status(), P.StatusReply)).info


async def test_hello_leases_ack_dedupe_and_sample(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("actor-1"), client("learner")
        hello = P.Hello(role="actor", peer_id="actor-1", protocol_version=P.PROTOCOL_VERSION)
        welcome = await actor.request(hello, P.Welcome)
        assert welcome.run_id == broker.run_id and welcome.policy_version == 0
        assert welcome.config_digest == run_digest(broker.cfg) and welcome.manifest is None
        assert welcome.group_size == GROUP  # the broker's: peers follow it, not their own
        grant = await actor.request(P.TaskRequest(n=2), P.TaskGrant)
        assert len(grant.leases) == 2 and grant.retry_after_s == 0
        assert all(lease.group_size == GROUP for lease in grant.leases)
        assert grant.leases[0].task.task_id.startswith("symbols-L")
        l1, l2 = grant.leases
        g1 = l1.lease_id
        ack = await actor.request(leased(l1), P.Ack)
        assert ack.traj_ids == [f"{g1}-0", f"{g1}-1"] and ack.duplicates == 0
        assert broker.store.stored == 2  # acked => committed
        assert (await actor.request(leased(l1), P.Ack)).duplicates == 2
        await actor.request(leased(l2), P.Ack)
        info = await status(actor)
        assert info["stored_trajectories"] == 4 and info["replay_size"] == 4
        assert info["leases_active"] == 0  # complete groups end their leases
        assert info["actors"][0]["episodes"] == 4
        staleness = REGISTRY.get_sample_value("headrace_trajectory_staleness_count") or 0
        batch = await take(learner, P.SampleRequest(batch_size=2), (P.Batch, P.NotReady))
        assert isinstance(batch, P.Batch)
        assert [t.group_id for t in batch.items] == [g1, g1]  # FIFO: the first group
        assert len(batch.sample_ids) == 2 and batch.is_weights == [1.0, 1.0]
        assert batch.cursor == max(batch.sample_ids)
        assert REGISTRY.get_sample_value("headrace_trajectory_staleness_count") == staleness + 2
        nxt = await take(learner, P.SampleRequest(batch_size=4), (P.Batch, P.NotReady))
        assert isinstance(nxt, P.NotReady) and nxt.replay_size == 2 and nxt.retry_after_s > 0


async def test_backpressure_grants_fewer_leases(tmp_path: Path) -> None:
    async with running(config(tmp_path, replay_capacity=2 * GROUP)) as (broker, client):
        actor = client("actor-1")  # never says Hello: unknown peers are served too
        grant = await actor.request(P.TaskRequest(n=5), P.TaskGrant)
        assert len(grant.leases) == 2 and grant.retry_after_s > 0
        grant2 = await actor.request(P.TaskRequest(n=1), P.TaskGrant)
        assert grant2.leases == [] and grant2.retry_after_s > 0
        await actor.request(leased(grant.leases[0]), P.Ack)
        # stored-but-unsampled still counts; sampling frees room
        assert (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases == []
        learner = client("learner")
        assert isinstance(await take(learner, P.SampleRequest(batch_size=2), P.Batch), P.Batch)
        assert len((await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases) == 1


async def test_silent_actor_lease_expires_and_task_is_regranted(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = config(tmp_path, heartbeat_timeout_s=10.0, lease_deadline_s=60.0)
    async with running(cfg, clock=clock) as (broker, client):
        silent, alive = client("silent"), client("alive")
        lost = (await silent.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        kept = (await alive.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        clock.t += 8
        await alive.send(P.Heartbeat(peer_id="alive"))
        await status(alive)  # the heartbeat was handled before this reply
        clock.t += 5
        expired = REGISTRY.get_sample_value("headrace_broker_leases_expired_total") or 0
        broker.reap()
        assert REGISTRY.get_sample_value("headrace_broker_leases_expired_total") == expired + 1
        assert lost.lease_id not in broker.leases and kept.lease_id in broker.leases
        regrant = (await alive.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        assert regrant.task == lost.task and regrant.lease_id != lost.lease_id


async def test_staleness_cap_evicts_old_groups(tmp_path: Path) -> None:
    async with running(config(tmp_path, max_staleness=2)) as (broker, client):
        actor, learner = client("a"), client("l")
        await actor.request(group("old", version=1), P.Ack)
        await actor.request(group("new", version=5), P.Ack)
        manifest = P.WeightManifest(1, 1, 1, ["d"], [], "d")
        await learner.send(P.PolicyPublished(6, "tcp://h:1", manifest))  # the learner's v6
        req = P.SampleRequest(batch_size=2, policy_version=6)  # the broker's cap of 2
        batch = await take(learner, req, P.Batch)
        assert {t.group_id for t in batch.items} == {"new"}
        info = await status(learner)
        assert info["evicted"] == {"stale": 1} and info["replay_size"] == 0
        assert info["learners"][0]["id"] == "l"


async def test_policy_is_relayed_and_welcomed(tmp_path: Path) -> None:
    manifest = P.WeightManifest(
        version=3, total_bytes=8, chunk_bytes=8, chunk_digests=["ab"], tensors=[], digest="ab"
    )
    pub = P.PolicyPublished(version=3, weights_endpoint="tcp://w:1", manifest=manifest)
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        hello = P.Hello(role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION)
        await actor.request(hello, P.Welcome)
        await learner.send(pub)
        assert await actor.recv(P.PolicyPublished, timeout=5) == pub
        await learner.send(msgspec.structs.replace(pub, version=2))  # older: ignored
        late = client("late")
        welcome = await late.request(msgspec.structs.replace(hello, peer_id="late"), P.Welcome)
        assert welcome.policy_version == 3 and welcome.weights_endpoint == "tcp://w:1"
        assert welcome.manifest == manifest
    # persisted: a restarted broker welcomes with the same policy and run id
    run_id = broker.run_id
    async with running(config(tmp_path)) as (broker2, client):
        welcome = await client("b").request(hello, P.Welcome)
        assert welcome.policy_version == 3 and welcome.run_id == run_id


async def test_full_store_is_never_acked(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_model_len=300_000)
    async with running(cfg, quota_bytes=640_000) as (broker, client):
        actor = client("a")
        errors = (
            REGISTRY.get_sample_value("headrace_broker_store_errors_total", {"kind": "full"}) or 0
        )
        await actor.send(group("big", n_tokens=200_000))
        deadline = time.monotonic() + 10
        while (
            REGISTRY.get_sample_value("headrace_broker_store_errors_total", {"kind": "full"}) or 0
        ) <= errors:
            assert time.monotonic() < deadline, "the store never reported full"
            await asyncio.sleep(0.01)
        info = await status(actor)
        assert info["stored_trajectories"] == 0
        with pytest.raises(TimeoutError):
            await actor.recv(P.Ack, timeout=0.2)
        # the broker keeps serving, and what fits is acked
        assert (await actor.request(group("small"), P.Ack)).duplicates == 0


async def test_bad_messages_get_errors(tmp_path: Path) -> None:
    async with running(config(tmp_path, durability="none")) as (broker, client):
        c = client("x")
        bad = group("g")
        bad.items[0].role = b"\x00"  # one role byte for six tokens
        ack = await c.request(bad, P.Ack)  # the bad one refused, the good one stored
        assert ack.traj_ids == ["g-1"] and [r.traj_id for r in ack.rejected] == ["g-0"]
        assert ack.rejected[0].reason == "shape"
        with pytest.raises(P.ProtocolError, match="unexpected"):
            await c.request(P.Ack(traj_ids=[]), P.Ack)
        with pytest.raises(P.ProtocolError, match="invalid"):
            await take(c, P.SampleRequest(batch_size=0), P.Batch)
        assert (await status(c))["stored_trajectories"] == 1


async def test_restart_rebuilds_replay_and_never_resamples(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        lease = (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        for gid in ("g1", "g2", "g3"):
            await actor.request(group(gid), P.Ack)
        await actor.request(P.TrajectoryBatch(items=[make_traj("g4", 0)]), P.Ack)  # partial
        first = await take(learner, P.SampleRequest(batch_size=2), P.Batch)
        assert {t.group_id for t in first.items} == {"g1"}
        # messages of one peer are handled in order: the acknowledgement is in
        assert (await status(learner))["learner_batches"] == {"handed": 0, "trained_unsaved": 1}
    async with running(config(tmp_path)) as (broker, client):
        learner = client("l")
        info = await status(learner)
        assert info["stored_trajectories"] == 7 and info["replay_size"] == 4
        assert info["pending_groups"] == 1 and info["leases_active"] == 1
        assert lease.lease_id in broker.leases
        batch = await take(learner, P.SampleRequest(batch_size=4), P.Batch)
        assert [t.group_id for t in batch.items] == ["g2", "g2", "g3", "g3"]
        assert isinstance(
            await take(learner, P.SampleRequest(batch_size=1), P.NotReady), P.NotReady
        )


async def test_actor_restart_requeues_its_leases(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor = client("a")
        hello = P.Hello(role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION)
        await actor.request(hello, P.Welcome)
        lease = (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        # same peer id (so same routing id) says Hello again: a new process
        await actor.request(hello, P.Welcome)
        assert len(broker.leases) == 0 and list(broker.leases.requeued) == [lease.task]
        again = (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        assert again.task == lease.task and again.lease_id != lease.lease_id


async def test_priorities_and_task_feedback_are_kept(tmp_path: Path) -> None:
    fb = P.TaskFeedback(task_id="symbols-L1-3", mean_abs_advantage=0.4, pass_rate=0.5)
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        await actor.request(group("g1"), P.Ack)
        sids = [s for item in broker.table.items() for s in item.seqs]
        await learner.send(P.PriorityUpdate(sample_ids=sids, priorities=[0.1, 2.5]))
        await learner.send(fb)
        await status(learner)  # both were handled before this reply
        assert broker.table.items()[0].priority == 2.5
        assert broker.bank.feedback_by_task[fb.task_id] == fb
    async with running(config(tmp_path)) as (broker, client):
        assert broker.bank.feedback_by_task[fb.task_id] == fb  # persisted


async def test_ingest_past_max_ingest_bytes_is_shed_and_taken_on_resend(tmp_path: Path) -> None:
    """A slow store: what waits for its commit is bounded; a batch beyond the bound gets no
    ack (its sender resends it) and is taken once the store has caught up."""
    one_batch = sum(len(P.encode(t)) for t in group("a").items)

    cfg = config(tmp_path, durability="none", max_ingest_bytes=one_batch + 1)
    async with running(cfg) as (broker, client):
        gate = asyncio.Event()
        real_put = broker.store.put_many

        async def slow_put(batches):  # the disk stalls until the gate opens
            await gate.wait()
            return await real_put(batches)

        broker.store.put_many = slow_put
        actor = client("a")

        def shed() -> float:
            return REGISTRY.get_sample_value("headrace_broker_ingest_shed_total") or 0.0

        before = shed()
        await actor.send(group("a"))
        while broker.ingest.bytes_waiting == 0:
            await asyncio.sleep(0.005)
        assert broker.ingest.bytes_waiting == one_batch
        await actor.send(group("b"))  # would double what waits: not taken
        while shed() < before + GROUP:
            await asyncio.sleep(0.005)
        assert broker.ingest.bytes_waiting == one_batch
        gate.set()
        assert (await actor.recv(P.Ack, timeout=5)).traj_ids == ["a-0", "a-1"]
        assert (await actor.request(group("b"), P.Ack)).traj_ids == ["b-0", "b-1"]
        assert broker.ingest.bytes_waiting == 0
        assert (await status(actor))["stored_trajectories"] == 4


async def test_lease_ids_granted_before_a_restart_are_still_known_after_it(
    tmp_path: Path,
) -> None:
    """The key of lease ids' tags lives in the store: an actor's late episodes of a lease
    granted before a broker restart (and since ended) still verify under curve."""
    async with running(config(tmp_path)) as (broker, client):
        lease = (await client("a").request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        secret = broker.leases.secret
    async with running(config(tmp_path)) as (broker, client):
        assert broker.leases.secret == secret
        broker.leases.complete(lease.lease_id)
        assert broker.leases.granted(lease.lease_id, lease.task.task_id)
        assert not broker.leases.granted(lease.lease_id, "another-task")
