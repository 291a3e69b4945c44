"""Exactly-once hand-out: a batch is kept until a learner checkpoint covers the step that
trained it, and handed again (same id, same trajectories) when its reply was lost, when the
learner restarts from an older checkpoint, and after a broker restart."""

from __future__ import annotations

from pathlib import Path

import msgspec
from prometheus_client import REGISTRY

from shared import protocol as P
from shared.config import RetentionConfig
from tests.broker_helpers import running
from tests.unit.broker.test_broker_server import config, group, status

REQ = P.SampleRequest(batch_size=2)


def hello(step: int) -> P.Hello:
    caps = {"step": str(step)}
    return P.Hello(
        role="learner", peer_id="l", protocol_version=P.PROTOCOL_VERSION, capabilities=caps
    )


def handed_again() -> float:
    return REGISTRY.get_sample_value("headrace_broker_learner_batches_handed_again_total") or 0


async def test_unacknowledged_batch_is_handed_again_until_acknowledged(tmp_path: Path) -> None:
    before = handed_again()

    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        for gid in ("g1", "g2"):
            await actor.request(group(gid), P.Ack)
        first = await learner.request(REQ, P.Batch)  # say its reply was lost
        again = await learner.request(REQ, P.Batch)
        assert again.batch_id == first.batch_id and again.sample_ids == first.sample_ids
        assert [t.traj_id for t in again.items] == [t.traj_id for t in first.items]
        await learner.send(P.BatchTrained(batch_id=first.batch_id, step=1))
        nxt = await learner.request(REQ, P.Batch)
        assert nxt.batch_id == first.batch_id + 1
        assert {t.group_id for t in nxt.items} == {"g2"}
        # a repeated acknowledgement changes nothing
        await learner.send(P.BatchTrained(batch_id=first.batch_id, step=1))
        await learner.send(P.BatchTrained(batch_id=nxt.batch_id, step=2))
        assert (await status(learner))["learner_batches"] == {
            "handed": 0,
            "trained_unsaved": 2,
        }
        await learner.send(P.Checkpointed(step=2))
        assert (await status(learner))["learner_batches"] == {
            "handed": 0,
            "trained_unsaved": 0,
        }
        assert isinstance(await learner.request(REQ, P.NotReady), P.NotReady)

    assert handed_again() == before + 1


async def test_learner_restart_gets_the_batches_trained_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        for gid in ("g1", "g2", "g3", "g4"):
            await actor.request(group(gid), P.Ack)
        ids = []
        for step in (1, 2, 3):
            b = await learner.request(REQ, P.Batch)
            await learner.send(P.BatchTrained(batch_id=b.batch_id, step=step))
            ids.append(b.batch_id)
            if step == 1:
                await learner.send(P.Checkpointed(step=1))
        # the learner dies; its successor resumes from the checkpoint at step 1
        learner.close()
        learner = client("l")
        await learner.request(hello(step=1), P.Welcome)
        again = [(await learner.request(REQ, P.Batch)) for _ in range(2)]
        # batch 2 until acknowledged, then batch 3, then a new one
        assert [b.batch_id for b in again] == [ids[1], ids[1]]
        await learner.send(P.BatchTrained(batch_id=ids[1], step=2))
        b3 = await learner.request(REQ, P.Batch)
        assert b3.batch_id == ids[2] and {t.group_id for t in b3.items} == {"g3"}
        await learner.send(P.BatchTrained(batch_id=ids[2], step=3))
        b4 = await learner.request(REQ, P.Batch)
        assert b4.batch_id == ids[2] + 1 and {t.group_id for t in b4.items} == {"g4"}


async def test_broker_restart_keeps_the_batches_and_never_reuses_an_id(tmp_path: Path) -> None:
    async with running(config(tmp_path)) as (broker, client):
        actor, learner = client("a"), client("l")
        for gid in ("g1", "g2", "g3"):
            await actor.request(group(gid), P.Ack)
        b1 = await learner.request(REQ, P.Batch)
        await learner.send(P.BatchTrained(batch_id=b1.batch_id, step=1))
        await learner.send(P.Checkpointed(step=1))  # b1 forgotten
        b2 = await learner.request(REQ, P.Batch)  # handed, not acknowledged: kept
        await status(learner)
    async with running(config(tmp_path)) as (broker, client):
        learner = client("l")
        again = await learner.request(REQ, P.Batch)
        assert again.batch_id == b2.batch_id
        assert [t.traj_id for t in again.items] == [t.traj_id for t in b2.items]
        await learner.send(P.BatchTrained(batch_id=b2.batch_id, step=2))
        b3 = await learner.request(REQ, P.Batch)
        assert b3.batch_id == b2.batch_id + 1 and {t.group_id for t in b3.items} == {"g3"}


async def test_retention_keeps_what_a_kept_batch_holds(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    retention = RetentionConfig(max_trajectories=1, interval_s=3600)
    cfg = msgspec.structs.replace(
        cfg, broker=msgspec.structs.replace(cfg.broker, retention=retention)
    )

    async with running(cfg) as (broker, client):
        actor, learner = client("a"), client("l")
        await actor.request(group("g1"), P.Ack)
        b1 = await learner.request(REQ, P.Batch)
        await learner.send(P.BatchTrained(batch_id=b1.batch_id, step=1))
        await status(learner)
        await broker.retention.sweep()  # over the limit, yet g1 is consumed and kept
        assert broker.store.stored == 2
        await learner.send(P.Checkpointed(step=1))
        await status(learner)
        assert dict(await broker.retention.sweep()) == {"consumed": 1}
        assert broker.store.stored == 1
