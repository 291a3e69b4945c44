"""Intake without sockets: trajectories screened, stored, acked only once durable, and
assembled into whole groups, driven through `broker.intake.Ingest` with a fake wiring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from broker.intake import Ingest
from broker.parts import Books, build_books
from broker.peers import Peer
from broker.store import Store, StoreError, TrajMeta
from shared import protocol as P
from shared.config import Config
from tests.broker_helpers import make_traj
from tests.unit.broker.test_broker_admission import Wired
from tests.unit.broker.test_broker_server import GROUP, FakeClock, config

ACTOR = Peer(b"a", "actor-a", role="actor")


def ingest(cfg: Config, store: Store, wired: Wired, clock=None) -> tuple[Ingest, Books]:
    clock = clock or FakeClock()
    books = build_books(cfg, store, wired.spawn, clock)
    return Ingest(cfg, books, lambda: None, 0, clock, wired.io), books


def frames(*trajs: P.Trajectory) -> P.TrajectoryBatchFrames:
    return P.TrajectoryBatchFrames(items=[msgspec.Raw(P.encode(t)) for t in trajs])


def meta(group_id: str, seq: int, reward: float) -> TrajMeta:
    return TrajMeta(
        seq, f"{group_id}-{seq}", group_id, "symbols-L1-0", group_id, "a", 0, 8, reward, False,
        1.0, 0.0,
    )  # fmt: skip


async def test_an_ack_goes_out_only_once_the_store_has_committed(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    part, _ = ingest(config(tmp_path), store, wired)
    gate, real_put = asyncio.Event(), store.put_many

    async def slow_put(batches):  # the disk stalls until the gate opens
        await gate.wait()
        return await real_put(batches)

    store.put_many = slow_put  # type: ignore[method-assign]
    await part.on_trajectories(b"a", ACTOR, frames(make_traj("g", 0), make_traj("g", 1)))
    await asyncio.sleep(0.05)
    assert not wired.of(P.Ack) and part.bytes_waiting > 0 and store.stored == 0
    gate.set()
    await wired.settle()
    (ack,) = wired.of(P.Ack)
    assert ack.traj_ids == ["g-0", "g-1"] and store.stored == 2 and part.bytes_waiting == 0


async def test_a_failed_commit_is_never_acked(tmp_path: Path, store: Store) -> None:
    """No ack: the actor's outbox keeps the batch and sends it again."""
    wired = Wired()
    part, books = ingest(config(tmp_path), store, wired)

    async def full_disk(batches):
        raise StoreError("disk full")

    store.put_many = full_disk  # type: ignore[method-assign]
    await part.on_trajectories(b"a", ACTOR, frames(make_traj("g", 0), make_traj("g", 1)))
    await wired.settle()
    assert wired.sent == [] and part.bytes_waiting == 0 and books.table.size == 0


async def test_an_episode_for_another_actors_lease_is_refused_by_name(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    part, books = ingest(config(tmp_path), store, wired)
    task = P.TaskSpec(task_id="symbols-L1-0", env="symbols")
    lease = books.leases.grant(b"owner", task, GROUP).lease
    await part.on_trajectories(b"a", ACTOR, frames(make_traj(lease.lease_id, 0)))
    (ack,) = wired.of(P.Ack)
    assert ack.traj_ids == [] and [r.reason for r in ack.rejected] == ["lease"]
    await wired.settle()
    assert store.stored == 0


async def test_a_group_enters_replay_only_whole_and_ends_its_lease(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    part, books = ingest(config(tmp_path), store, wired)
    task = P.TaskSpec(task_id="symbols-L1-0", env="symbols")
    gid = books.leases.grant(b"a", task, GROUP).lease_id
    part.add_to_group(meta(gid, 1, 0.0), now=0.0)
    assert books.table.size == 0 and len(books.groups) == 1 and gid in books.leases
    part.add_to_group(meta(gid, 2, 1.0), now=0.0)
    assert books.table.size == GROUP and len(books.groups) == 0 and gid not in books.leases
    part.add_to_group(meta(gid, 3, 1.0), now=0.0)  # one too many: stored, in no group
    assert books.table.size == GROUP and len(books.groups) == 0
    await wired.settle()


async def test_a_zero_variance_group_is_kept_out_when_asked(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    part, books = ingest(config(tmp_path, exclude_zero_variance=True), store, wired)
    part.add_to_group(meta("same", 1, 1.0), now=0.0)
    part.add_to_group(meta("same", 2, 1.0), now=0.0)  # no GRPO signal in it
    part.add_to_group(meta("mixed", 3, 0.0), now=0.0)
    part.add_to_group(meta("mixed", 4, 1.0), now=0.0)
    assert [item.group_id for item in books.table.items()] == ["mixed"]
    assert books.retirement.counts == {"zero_variance": 1}
    await wired.settle()


async def test_a_partial_group_without_a_lease_is_dropped_after_a_deadline(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    part, books = ingest(config(tmp_path, lease_deadline_s=60.0), store, wired)
    part.add_to_group(meta("orphan", 1, 0.0), now=0.0)
    part.drop_abandoned(now=30.0)
    assert len(books.groups) == 1  # its actor may still be sending the rest
    part.drop_abandoned(now=61.0)
    assert len(books.groups) == 0 and books.retirement.counts == {"incomplete": 1}
    await wired.settle()


async def test_batches_screened_together_share_one_commit_and_get_one_ack_each(
    tmp_path: Path, store: Store
) -> None:
    """What one wake-up of the loop drained goes into the store as one put (one commit);
    each TrajectoryBatch is still answered on its own, to its sender, duplicates counted."""
    wired = Wired()
    part, _ = ingest(config(tmp_path), store, wired)
    puts, real_put = [], store.put_many

    async def counted(batches):
        puts.append(len(batches))
        return await real_put(batches)

    store.put_many = counted  # type: ignore[method-assign]
    other = Peer(b"b", "actor-b", role="actor")
    await part.on_trajectories(b"a", ACTOR, frames(make_traj("g", 0), make_traj("g", 1)))
    await part.on_trajectories(b"b", other, frames(make_traj("h", 0)))
    await part.on_trajectories(b"a", ACTOR, frames(make_traj("g", 1), make_traj("k", 0)))
    await wired.settle()
    assert puts == [3]
    acks = [(ident, m.traj_ids, m.duplicates) for ident, m in wired.sent]
    assert acks == [
        (b"a", ["g-0", "g-1"], 0),
        (b"b", ["h-0"], 0),
        (b"a", ["g-1", "k-0"], 1),  # g-1 came twice in the same commit: stored once
    ]
    assert store.stored == 4 and part.bytes_waiting == 0


async def test_under_curve_an_episode_for_a_lease_never_granted_is_refused(
    tmp_path: Path, store: Store
) -> None:
    """A lease no longer in the book is taken as it comes (its group may still be filling
    after it ended), but under curve only if this broker granted it, for that task: an actor
    cannot make up a group."""
    cfg = config(tmp_path)
    cfg = msgspec.structs.replace(cfg, security=msgspec.structs.replace(cfg.security, curve=True))
    wired = Wired()
    part, books = ingest(cfg, store, wired)
    ended = books.leases.grant(b"a", P.TaskSpec(task_id="symbols-L1-0", env="symbols"), GROUP)
    elsewhere = books.leases.grant(b"a", P.TaskSpec(task_id="symbols-L1-1", env="symbols"), GROUP)
    for a in (ended, elsewhere):
        books.leases.complete(a.lease_id)  # both left the book
    made_up = "0123456789abcdef-0123456789abcdef"
    trajs = [make_traj(g, 0) for g in (ended.lease_id, made_up, "g", elsewhere.lease_id)]
    await part.on_trajectories(b"a", ACTOR, frames(*trajs))  # all for task symbols-L1-0
    await wired.settle()
    (ack,) = wired.of(P.Ack)
    assert ack.traj_ids == [f"{ended.lease_id}-0"]
    assert [r.reason for r in ack.rejected] == ["lease"] * 3
    assert all("never granted" in r.detail for r in ack.rejected)


async def test_in_plaintext_an_ended_or_unknown_lease_is_taken_as_it_comes(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    part, _ = ingest(config(tmp_path), store, wired)
    await part.on_trajectories(b"a", ACTOR, frames(make_traj("g", 0)))
    await wired.settle()
    (ack,) = wired.of(P.Ack)
    assert ack.traj_ids == ["g-0"] and not ack.rejected
