"""Fuzzing of meaning: well-formed messages with hostile values, of every type, from peers of
every role (and from a second would-be learner). The broker must keep its invariants, not just
stay up: the legitimate learner's policy stays the newest, nothing is evicted as stale, the
legitimate actor is still acked and its group still handed out, priorities and the curator
stay finite."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from shared import protocol as P
from tests.broker_helpers import make_traj, running
from tests.unit.broker.test_broker_server import config, status
from tests.unit.shared.test_shared_protocol import MANIFEST

BIG = 2**62
NAN, INF = math.nan, math.inf


def hello(role: str, peer_id: str) -> P.Hello:
    return P.Hello(role=role, peer_id=peer_id, protocol_version=P.PROTOCOL_VERSION)


def hostile_messages() -> list[P.Base]:
    bad_traj = msgspec.structs.replace(
        make_traj("evil", 0),
        token_ids=P.pack([2**31 - 1] * 8, "token_ids"),
        outcome_reward=NAN,
        sample_prob=0.0,
    )
    return [
        P.Hello(role="learner", peer_id="x", protocol_version=BIG),
        hello("learner", "x" * 10_000),
        P.Heartbeat(
            peer_id="x", stats={"nan": NAN, "inf": INF, **{f"k{i}": 1.0 for i in range(500)}}
        ),
        P.TaskRequest(n=BIG),
        P.TaskRequest(n=-5),
        P.TrajectoryBatch(items=[bad_traj]),
        P.SampleRequest(batch_size=BIG, policy_version=BIG),
        P.SampleRequest(batch_size=-1, policy_version=-BIG),
        P.BatchTrained(batch_id=BIG, step=-1),
        P.Checkpointed(step=BIG),
        P.PolicyPublished(version=BIG, weights_endpoint="tcp://evil:1", manifest=MANIFEST),
        P.PolicyPublished(version=-1, weights_endpoint="tcp://evil:1", manifest=MANIFEST),
        P.PriorityUpdate(sample_ids=[1, 2, BIG], priorities=[NAN, INF, -1.0]),
        P.TaskFeedback(task_id="symbols-L1-0", mean_abs_advantage=NAN, pass_rate=INF),
        P.TaskFeedback(task_id="no-such-task", pass_rate=0.5),
        P.Status(),
    ]


async def _status_after_errors(learner) -> dict:
    """The broker's status once it has answered everything sent before: the refusals of the
    hostile messages may still be on their way when the request goes out (it would take one
    of them as its answer), so ask until a status comes back."""
    for _ in range(50):
        try:
            return await status(learner)
        except P.ProtocolError:
            continue
    raise AssertionError("no status answer among the refusals")


async def test_hostile_values_from_every_role_keep_the_invariants(tmp_path: Path) -> None:
    async with running(config(tmp_path, max_staleness=4)) as (broker, client):
        actor, learner = client("actor-1"), client("learner")
        await actor.request(hello("actor", "actor-1"), P.Welcome)
        await learner.request(hello("learner", "learner"), P.Welcome)
        legit = P.PolicyPublished(version=1, weights_endpoint="tcp://h:1", manifest=MANIFEST)
        await learner.send(legit)
        grant = await actor.request(P.TaskRequest(n=1), P.TaskGrant)
        gid = grant.leases[0].lease_id
        task = grant.leases[0].task.task_id
        items = [
            msgspec.structs.replace(make_traj(gid, i, version=1), task_id=task) for i in range(2)
        ]
        assert len((await actor.request(P.TrajectoryBatch(items=items), P.Ack)).traj_ids) == 2

        # every role's peer, plus a second would-be learner, sends every hostile message
        peers = [client(f"evil-{role}") for role in ("actor", "learner", "cli")]
        for peer, role in zip(peers, ("actor", "learner", "cli"), strict=True):
            try:
                await peer.request(hello(role, f"evil-{role}"), P.Welcome)
            except P.ProtocolError as e:
                assert role == "learner" and e.reason == "forbidden"  # one learner per run
        for peer in [*peers, actor]:
            for msg in hostile_messages():
                await peer.send(msg)
        # the legitimate learner's own messages with hostile values
        for msg in hostile_messages()[6:14]:
            if not isinstance(msg, P.SampleRequest | P.Checkpointed):
                await learner.send(msg)
        info = await _status_after_errors(learner)  # handled in order: all above is in

        assert broker.policy_version == 1  # no forged version took over
        assert "stale" not in broker.books.retirement.counts and info["replay_size"] == 2
        assert broker.fence.ident == learner.routing_id
        for key in ("pass_rate", "mean_abs_advantage"):
            assert all(math.isfinite(v) for v in broker.curriculum.summary().get(key, {}).values())
        # the legitimate pipeline goes on: a group acked, the learner served and its
        # batch handed out whole
        grant = await actor.request(P.TaskRequest(n=1), P.TaskGrant)
        assert grant.leases, "no lease granted after the flood"
        batch = await learner.request(P.SampleRequest(batch_size=2, policy_version=1), P.Batch)
        assert [t.group_id for t in batch.items] == [gid, gid]
        assert all(math.isfinite(w) for w in batch.is_weights)


async def test_no_actor_puts_episodes_into_another_actors_group(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        owner, intruder = client("actor-1"), client("actor-2")
        lease = (await owner.request(P.TaskRequest(n=1), P.TaskGrant)).leases[0]
        gid, task = lease.lease_id, lease.task.task_id

        def traj(i: int, **kw: object) -> P.Trajectory:
            return msgspec.structs.replace(make_traj(gid, i), **{"task_id": task, **kw})

        # the intruder's episodes for the owner's live lease, and a mislabelled one
        ack = await intruder.request(P.TrajectoryBatch(items=[traj(0)]), P.Ack)
        assert [r.reason for r in ack.rejected] == ["lease"] and not ack.traj_ids
        bad = [traj(1, task_id="symbols-L1-999"), traj(1, group_id="other")]
        ack = await owner.request(P.TrajectoryBatch(items=bad), P.Ack)
        assert [r.reason for r in ack.rejected] == ["lease", "lease"]
        assert broker.store.stored == 0
        # the owner's own group goes in whole
        ack = await owner.request(P.TrajectoryBatch(items=[traj(0), traj(1)]), P.Ack)
        assert len(ack.traj_ids) == 2 and not ack.rejected
        assert (await status(owner))["replay_size"] == 2
