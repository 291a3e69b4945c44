"""Admission without sockets: how many leases an actor gets, for which tasks, and what is kept
of them, driven through `broker.admission.Admission` with a fake wiring."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from broker.admission import Admission
from broker.parts import Books, Wiring, build_books
from broker.peers import Peer
from broker.store import Store, TrajMeta
from shared import protocol as P
from shared.config import Config
from tests.unit.broker.test_broker_server import GROUP, FakeClock, config


class Wired:
    """The parts' wiring without a socket: replies kept in order, store writes run as tasks
    on the test's loop (`settle` waits for them)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, P.Base]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def send(self, ident: bytes, msg: P.Base) -> None:
        self.sent.append((ident, msg))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop(0)

    def of(self, kind: type) -> list[Any]:
        return [m for _, m in self.sent if isinstance(m, kind)]

    @property
    def io(self) -> Wiring:
        return Wiring(self.send, self.spawn)


def admission(
    cfg: Config, store: Store, wired: Wired, batch: list[int] | None = None, clock=None
) -> tuple[Admission, Books]:
    """`batch[0]`: the learner's batch size as the sampling part last saw it (0: none)."""
    batch = batch if batch is not None else [0]
    books = build_books(cfg, store, wired.spawn, clock or FakeClock())
    return Admission(cfg.broker, books, lambda: batch[0], wired.io), books


async def test_a_lease_is_refused_under_backpressure(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    adm, _ = admission(config(tmp_path, replay_capacity=2 * GROUP), store, wired)
    grant = adm.grant(b"a", 5)
    assert len(grant.leases) == 2 and grant.retry_after_s > 0  # room for two groups
    again = adm.grant(b"a", 1)
    assert again.leases == [] and again.retry_after_s > 0  # owed episodes count as data
    assert adm.outstanding() == 2 * GROUP == adm.backpressure_bound()


async def test_an_actor_holding_every_lease_does_not_starve_another(
    tmp_path: Path, store: Store
) -> None:
    """A greedy (or hung) actor takes the whole bound and never plays; a second actor still
    gets its fair share (half the bound, two actors), the greedy one nothing more."""
    wired = Wired()
    adm, _ = admission(config(tmp_path, replay_capacity=4 * GROUP), store, wired)
    assert len(adm.grant(b"hog", 100).leases) == 4
    assert len(adm.grant(b"honest", 100).leases) == 2  # its share, past the bound
    assert adm.grant(b"hog", 100).leases == []
    assert adm.grant(b"honest", 100).leases == []  # at its share
    assert adm.outstanding() == 6 * GROUP


async def test_partial_groups_an_actor_left_behind_count_against_its_share(
    tmp_path: Path, store: Store
) -> None:
    """Partial groups wait for their lease deadline after their actor said Hello again (its
    leases released) or went silent: they fill the bound, but they are that actor's, so
    another actor is still served its share."""
    wired = Wired()
    adm, books = admission(config(tmp_path, replay_capacity=4 * GROUP), store, wired)
    leases = adm.grant(b"hog", 100).leases
    adm.release(b"hog", "hog")
    for i in range(4 * GROUP):  # part of each group: none completes
        lease = leases[i % len(leases)]
        gid, task = lease.lease_id, lease.task.task_id
        meta = TrajMeta(i, f"{gid}-{i}", gid, task, gid, "hog", 0, 8, 0.0, False, 1.0, 0.0)
        books.groups.add(meta, 10 * GROUP, 0.0, owner=b"hog")
    assert adm.outstanding() >= adm.backpressure_bound()
    assert len(adm.grant(b"honest", 100).leases) == 2
    assert adm.grant(b"hog", 100).leases == []


async def test_actors_sharing_the_bound_get_equal_shares(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    adm, _ = admission(config(tmp_path, replay_capacity=4 * GROUP), store, wired)
    assert len(adm.grant(b"a", 1).leases) == 1
    assert len(adm.grant(b"b", 100).leases) == 2  # half of the bound
    assert len(adm.grant(b"a", 100).leases) == 1  # the rest: half for a too
    assert adm.grant(b"b", 1).leases == [] and adm.outstanding() == 4 * GROUP


async def test_the_bound_follows_the_learners_batch(tmp_path: Path, store: Store) -> None:
    """Beyond (max_staleness + 1) learner batches, data would go stale before it is sampled."""
    batch = [0]
    cfg = config(tmp_path, replay_capacity=100, max_staleness=1)
    adm, _ = admission(cfg, store, Wired(), batch)
    assert adm.backpressure_bound() == 100
    batch[0] = GROUP
    assert adm.backpressure_bound() == 2 * GROUP
    assert len(adm.grant(b"a", 10).leases) == 2


async def test_every_lease_carries_the_brokers_group_size_and_is_kept(
    tmp_path: Path, store: Store
) -> None:
    wired = Wired()
    adm, _ = admission(config(tmp_path), store, wired)
    leases = adm.grant(b"a", 3).leases
    assert [x.group_size for x in leases] == [GROUP] * 3
    await wired.settle()
    kept = {k for k, _ in await store.kv_scan("lease/")}  # a restarted broker re-adopts them
    assert kept == {f"lease/{x.lease_id}" for x in leases}


async def test_the_task_of_an_expired_lease_goes_out_first(tmp_path: Path, store: Store) -> None:
    clock, wired = FakeClock(), Wired()
    cfg = config(tmp_path, heartbeat_timeout_s=10.0)
    adm, _ = admission(cfg, store, wired, clock=clock)
    (lost,) = adm.grant(b"silent", 1).leases
    await wired.settle()
    clock.t += 11
    adm.expire(lambda ident: None)  # never heard from since the grant
    (again,) = adm.grant(b"alive", 1).leases
    assert again.task == lost.task and again.lease_id != lost.lease_id
    await wired.settle()
    assert f"lease/{lost.lease_id}" not in {k for k, _ in await store.kv_scan("lease/")}


async def test_a_restarted_actor_gives_its_leases_back(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    adm, books = admission(config(tmp_path), store, wired)
    (lease,) = adm.grant(b"a", 1).leases
    assert adm.holds_any(b"a")
    adm.release(b"a", "actor-a")  # its Hello: a new process under the same routing id
    assert not adm.holds_any(b"a") and list(books.leases.requeued) == [lease.task]


async def test_evaluation_leases_bypass_backpressure(tmp_path: Path, store: Store) -> None:
    adm, books = admission(config(tmp_path, replay_capacity=GROUP), store, Wired())
    assert len(adm.grant(b"a", 1).leases) == 1  # the only room there is
    assert adm.grant(b"a", 1).leases == []
    books.evals.request(P.EvalRequest(version=0, tasks=1, samples=2))
    got = adm.grant(b"a", 4).leases
    assert got and all(x.purpose == "eval" and x.group_size == 2 for x in got)


async def test_feedback_on_a_task_the_bank_lacks_is_refused(tmp_path: Path, store: Store) -> None:
    wired = Wired()
    adm, books = admission(config(tmp_path), store, wired)
    peer = Peer(b"l", "learner", role="learner")
    fb = P.TaskFeedback(task_id="no-such-task", pass_rate=0.5)
    await adm.on_feedback(b"l", peer, fb)
    (error,) = wired.of(P.Error)
    assert error.reason == "invalid" and "no such task" in error.detail
    known = msgspec.structs.replace(fb, task_id=books.bank.task_id_at(0))
    await adm.on_feedback(b"l", peer, known)
    await wired.settle()
    assert list(books.bank.feedback_by_task) == [known.task_id]
    assert len(await store.kv_scan("feedback/")) == 1  # kept across a restart
