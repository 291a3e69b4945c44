"""Reverb's SampleToInsertRatio, alone and in the broker: the learner waits when it runs ahead,
lease grants slow down when the actors do. Every count below is worked out by hand."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from broker.replay import (
    FifoSampler,
    GroupItem,
    MaxTimesSampledRemover,
    MinSize,
    SampleToInsertRatio,
    Table,
)
from shared import protocol as P
from shared.config import Config, ReplayConfig
from shared.transport import Client
from tests.broker_helpers import make_traj, running, take


def test_sample_to_insert_ratio_follows_reverbs_rule() -> None:
    rl = SampleToInsertRatio(samples_per_insert=1.0, min_size_to_sample=4, error_buffer=6)
    assert (rl.min_diff, rl.max_diff) == (-2.0, 10.0)  # 1 * 4 -/+ 6
    # stage 1: below min size nothing is sampled, inserts up to min size are free
    assert not rl.can_sample(0, 1)
    assert rl.can_insert(0, 4)  # 0 + 4 <= 4
    assert rl.can_insert(0, 10)  # (0 + 10) * 1 - 0 = 10 <= 10
    assert not rl.can_insert(0, 11)  # 11 > 10
    rl.on_insert(4)
    assert rl.can_sample(4, 6)  # 4 - 0 - 6 = -2 >= -2
    assert not rl.can_sample(4, 7)  # -3 < -2
    rl.on_sample(4)
    assert not rl.can_sample(4, 4)  # 4 - 4 - 4 = -4: the learner is ahead, it waits
    assert rl.can_sample(4, 2)  # -2
    assert rl.can_insert(4, 10)  # (4 + 10) - 4 = 10
    assert not rl.can_insert(4, 11)  # 11: the actors would be ahead
    assert not rl.can_sample(3, 1)  # back below min size (evictions): no sampling
    assert rl.state(4) == {
        "kind": "sample_to_insert",
        "samples_per_insert": 1.0,
        "min_size_to_sample": 4,
        "min_diff": -2.0,
        "max_diff": 10.0,
        "inserts": 4,
        "samples": 4,
        "diff": 0.0,
        "can_sample": True,
        "can_insert": True,
    }
    # spi = 2: every inserted trajectory should be sampled twice
    rl = SampleToInsertRatio(samples_per_insert=2.0, min_size_to_sample=1, error_buffer=(-4, 8))
    rl.on_insert(2)
    assert rl.can_sample(2, 8) and not rl.can_sample(2, 9)  # 2*2 - 0 - 8 = -4
    assert rl.can_insert(2, 2) and not rl.can_insert(2, 3)  # (2+2)*2 = 8 ; (2+3)*2 = 10


def test_bad_windows_are_refused_like_reverb() -> None:
    with pytest.raises(ValueError, match="error_buffer"):
        SampleToInsertRatio(4.0, 1, error_buffer=3.0)  # window 6 < 2 * 4
    with pytest.raises(ValueError, match="above"):
        SampleToInsertRatio(1.0, 10, error_buffer=(11.0, 20.0))  # min_diff > spi * min_size
    with pytest.raises(ValueError):
        SampleToInsertRatio(0.0, 1, error_buffer=5.0)
    rl = SampleToInsertRatio(1.0, 1, error_buffer=8.0)
    assert rl.check_window(batch_size=8, group_size=8) is None  # 16 >= 8 + 8
    assert "error_buffer" in (rl.check_window(batch_size=32, group_size=8) or "")


def grp(key: int, size: int = 4) -> GroupItem:
    return GroupItem(key, f"g{key}", "t", list(range(10 * key, 10 * key + size)), 0)


def test_table_counts_inserts_and_samples_in_trajectories() -> None:
    rl = SampleToInsertRatio(samples_per_insert=1.0, min_size_to_sample=4, error_buffer=6)
    t = Table(FifoSampler(), [MaxTimesSampledRemover(10)], rl)
    t.insert(grp(1))
    t.insert(grp(2))
    assert (rl.inserts, rl.samples) == (8, 0)
    assert [g.key for g in t.sample(4) or []] == [1]  # 8 - 0 - 4 = 4 >= -2
    assert [g.key for g in t.sample(4) or []] == [1]  # 8 - 4 - 4 = 0
    assert t.sample(5) is None and t.last_refusal == "rate_limiter"  # 8 - 8 - 5 = -5
    assert t.sample(2) is None and t.last_refusal == "rate_limiter"  # -2 ok, but a group is 4
    assert rl.samples == 8 and len(t) == 2
    t.insert(grp(3))  # 12 - 8 - 4 = 0: allowed again
    batch = t.sample(4)
    assert batch is not None and rl.samples == 12
    t.restore(batch)  # a failed hand-out is not counted
    assert rl.samples == 8
    # MinSize counts the same way (for status and metrics) and never blocks inserts
    ms = MinSize(1)
    t = Table(FifoSampler(), [], ms)
    t.insert(grp(1, size=3))
    t.sample(1)
    assert (ms.inserts, ms.samples, ms.can_insert(10**9, 10**9)) == (3, 3, True)


GROUP = 2


def config(data_dir: Path, replay: ReplayConfig, **broker: object) -> Config:
    cfg = Config()
    b = msgspec.structs.replace(
        cfg.broker,
        data_dir=str(data_dir),
        group_size=GROUP,
        commit_interval_s=0.005,
        replay=replay,
        **broker,
    )
    return msgspec.structs.replace(cfg, broker=b)


def blocked(side: str) -> float:
    v = REGISTRY.get_sample_value("headrace_broker_rate_limiter_blocked_total", {"side": side})
    return v or 0.0


async def deliver(actor: Client, leases: list[P.Lease], version: int = 0) -> None:
    for lease in leases:
        items = [
            make_traj(lease.lease_id, i, version, task_id=lease.task.task_id) for i in range(GROUP)
        ]
        await actor.request(P.TrajectoryBatch(items=items), P.Ack)


async def test_broker_learner_ahead_waits_and_actors_ahead_get_fewer_leases(tmp_path: Path) -> None:
    # spi 1, min size 2, error buffer 3: min_diff = 2 - 3 = -1, max_diff = 2 + 3 = 5
    replay = ReplayConfig(rate_limiter="sample_to_insert", samples_per_insert=1.0, error_buffer=3)

    cfg = config(tmp_path, replay, min_size_to_sample=2, max_times_sampled=3)
    async with running(cfg) as (broker, client):
        actor, learner = client("actor-1"), client("learner")
        ins0, smp0 = blocked("insert"), blocked("sample")
        # actors ahead: leases of 2 trajectories; (0 + 2) <= 2 free, (0 + 4) - 0 = 4 <= 5,
        # (0 + 6) - 0 = 6 > 5: two of the ten asked for
        grant = await actor.request(P.TaskRequest(n=10), P.TaskGrant)
        assert len(grant.leases) == 2 and grant.retry_after_s > 0
        assert blocked("insert") == ins0 + 1
        # the two leases still owe 4 trajectories: (0 + 4 + 2) - 0 = 6 > 5, nothing more
        assert (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases == []
        await deliver(actor, grant.leases)
        assert (broker.table.size, broker.table.rate_limiter.inserts) == (4, 4)
        assert (await actor.request(P.TaskRequest(n=1), P.TaskGrant)).leases == []  # 6 > 5
        # learner: 4 - 0 - 2 = 2 >= -1, then 4 - 2 - 2 = 0: two batches of one group
        for _ in range(2):
            req = P.SampleRequest(batch_size=2)
            assert isinstance(await take(learner, req, (P.Batch, P.NotReady)), P.Batch)
        # learner ahead: 4 - 4 - 2 = -2 < -1, with 4 trajectories in the table it waits
        nr = await take(learner, P.SampleRequest(batch_size=2), (P.Batch, P.NotReady))
        assert isinstance(nr, P.NotReady) and nr.replay_size == 4
        assert blocked("sample") == smp0 + 1
        info = (await learner.request(P.Status(), P.StatusReply)).info
        rl = info["rate_limiter"]
        assert (rl["kind"], rl["inserts"], rl["samples"]) == ("sample_to_insert", 4, 4)
        assert rl["can_sample"] is True and rl["can_insert"] is True  # for one trajectory
        assert info["sampler"] == {"kind": "fifo"}
        v = REGISTRY.get_sample_value
        assert v("headrace_broker_rate_limiter_inserts") == 4
        assert v("headrace_broker_rate_limiter_samples") == 4
        # the samples made room: (4 + 2) - 4 = 2, (4 + 4) - 4 = 4, (4 + 6) - 4 = 6 > 5
        grant = await actor.request(P.TaskRequest(n=10), P.TaskGrant)
        assert len(grant.leases) == 2
        await deliver(actor, grant.leases)
        # 8 - 4 - 2 = 2: the learner may go on
        got = await take(learner, P.SampleRequest(batch_size=2), (P.Batch, P.NotReady))
        assert isinstance(got, P.Batch)


async def test_liveness_grant_when_evictions_leave_the_ratio_in_debt(tmp_path: Path) -> None:
    # min_diff = 1 - 2 = -1, max_diff = 1 + 2 = 3
    replay = ReplayConfig(rate_limiter="sample_to_insert", samples_per_insert=1.0, error_buffer=2)

    cfg = config(tmp_path, replay, min_size_to_sample=1, max_staleness=1)
    async with running(cfg) as (broker, client):
        actor, learner = client("actor-1"), client("learner")
        grant = await actor.request(P.TaskRequest(n=10), P.TaskGrant)
        assert len(grant.leases) == 1  # (0 + 2) - 0 = 2 <= 3 ; (0 + 4) = 4 > 3
        await deliver(actor, grant.leases, version=0)
        # the learner is at v10 with a cap of 1: the group is evicted unsampled
        manifest = P.WeightManifest(10, 1, 1, ["d"], [], "d")
        await learner.send(P.PolicyPublished(10, "tcp://h:1", manifest))
        req = P.SampleRequest(batch_size=2, policy_version=10)
        nr = await take(learner, req, (P.Batch, P.NotReady))
        assert isinstance(nr, P.NotReady) and nr.replay_size == 0
        # (2 + 2) - 0 = 4 > 3 would block forever: nothing is owed and the learner
        # cannot be served, so one batch's worth of leases (2 / 2 = 1) is granted
        grant = await actor.request(P.TaskRequest(n=10), P.TaskGrant)
        assert len(grant.leases) == 1
        # ... and only that: while it is owed, nothing more
        assert (await actor.request(P.TaskRequest(n=10), P.TaskGrant)).leases == []
        await deliver(actor, grant.leases, version=10)
        got = await take(
            learner,
            P.SampleRequest(batch_size=2, policy_version=10),
            (P.Batch, P.NotReady),
        )
        assert isinstance(got, P.Batch) and len(got.items) == 2


async def test_default_config_keeps_fifo_and_min_size(tmp_path: Path) -> None:
    async with running(config(tmp_path, ReplayConfig())) as (broker, client):
        actor = client("actor-1")
        grant = await actor.request(P.TaskRequest(n=10), P.TaskGrant)
        assert len(grant.leases) == 10 and grant.retry_after_s == 0  # no rate limiting
        assert broker.status()["rate_limiter"]["kind"] == "min_size"


async def test_broker_serves_prioritized_batches_with_weights_and_priority_updates(
    tmp_path: Path,
) -> None:
    replay = ReplayConfig(sampler="prioritized", alpha=1.0, beta0=1.0, seed=3)

    async with running(config(tmp_path, replay, max_times_sampled=100)) as (broker, client):
        actor, learner = client("actor-1"), client("learner")
        grant = await actor.request(P.TaskRequest(n=3), P.TaskGrant)
        await deliver(actor, grant.leases)
        items = broker.table.items()
        assert len(items) == 3 and all(g.priority == 1.0 for g in items)
        # group 0 -> max(4, 2) = 4 (the default reduce); group 1 -> 0: never sampled again
        sids = items[0].seqs + items[1].seqs
        upd = P.PriorityUpdate(sample_ids=sids, priorities=[4.0, 2.0, 0.0, 0.0])
        await learner.send(upd)
        info = (await learner.request(P.Status(), P.StatusReply)).info
        assert [g.priority for g in broker.table.items()] == [4.0, 0.0, 1.0]
        assert info["sampler"]["kind"] == "prioritized" and info["sampler"]["sampleable"] == 2
        seen = set()
        for _ in range(20):
            b = await take(learner, P.SampleRequest(batch_size=2), P.Batch)
            gid = b.items[0].group_id
            seen.add(gid)
            # N = 3, P = 4/5 or 1/5, beta = 1: weights 1/4 and 1 (the least likely: 1)
            want = 0.25 if gid == items[0].group_id else 1.0
            assert b.is_weights == pytest.approx([want, want])
        assert seen == {items[0].group_id, items[2].group_id}
