"""Lease bookkeeping: grant, renew, complete, expire -> requeue."""

from __future__ import annotations

from broker.leases import LeaseBook
from shared import protocol as P


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def task(i: int) -> P.TaskSpec:
    return P.TaskSpec(task_id=f"task-{i}", env="symbols")


def test_silent_peer_lease_expires_and_task_is_regranted() -> None:
    clock = FakeClock()
    book = LeaseBook(deadline_s=100, heartbeat_timeout_s=10, clock=clock)
    a = book.grant(b"actor-a", task(1), group_size=4)
    b = book.grant(b"actor-b", task(2), group_size=4)
    assert len(book) == 2 and a.lease.deadline_s == 100 and a.lease.group_size == 4
    seen = {b"actor-a": clock.t, b"actor-b": clock.t}
    clock.t += 8
    seen[b"actor-b"] = clock.t  # b keeps talking, a goes silent
    clock.t += 5
    expired = book.expire(seen.get)
    assert [x.lease_id for x in expired] == [a.lease_id]
    assert a.lease_id not in book and b.lease_id in book
    requeued = book.take_requeued(5)
    assert requeued == [task(1)]
    again = book.grant(b"actor-b", requeued[0], group_size=4)
    assert again.lease.task == task(1) and again.lease_id != a.lease_id


def test_deadline_is_renewed_by_heartbeats() -> None:
    clock = FakeClock()
    book = LeaseBook(deadline_s=10, heartbeat_timeout_s=1000, clock=clock)
    a = book.grant(b"p", task(1), group_size=2)
    clock.t += 8
    assert book.renew(b"p") == 1 and book.renew(b"other") == 0
    clock.t += 8  # 16 s after the grant, 8 s after the renewal
    assert book.expire(lambda peer: clock.t) == []
    clock.t += 3
    assert [x.lease_id for x in book.expire(lambda peer: clock.t)] == [a.lease_id]


def test_heartbeats_never_renew_a_lease_past_its_timeout() -> None:
    """A live actor whose episode hangs loses the lease at timeout_s; its task is requeued."""
    clock = FakeClock()
    book = LeaseBook(deadline_s=10, heartbeat_timeout_s=1000, clock=clock, timeout_s=25)
    a = book.grant(b"p", task(1), group_size=2)
    assert a.lease.timeout_s == 25  # the actor stops its episodes then too
    for _ in range(3):  # heartbeats every 8 s: 24 s after the grant, still held
        clock.t += 8
        book.renew(b"p")
        assert book.expire(lambda peer: clock.t) == []
    clock.t += 2  # 26 s: past the timeout although the last heartbeat was 2 s ago
    assert [x.lease_id for x in book.expire(lambda peer: clock.t)] == [a.lease_id]
    assert book.take_requeued(1) == [task(1)]


def test_complete_removes_and_restore_readopts() -> None:
    clock = FakeClock()
    book = LeaseBook(deadline_s=10, heartbeat_timeout_s=5, clock=clock)
    a = book.grant(b"p", task(1), group_size=2)
    b = book.grant(b"p", task(2), group_size=2)
    assert book.count_for(b"p") == 2
    assert book.complete(a.lease_id) is a and book.complete(a.lease_id) is None
    # after a broker restart the lease comes back with fresh clocks; unknown peer -> grant time
    clock.t += 100
    other = LeaseBook(deadline_s=10, heartbeat_timeout_s=5, clock=clock)
    other.restore([b.record()])
    assert other.expire(lambda peer: None) == []
    clock.t += 6
    assert [x.lease_id for x in other.expire(lambda peer: None)] == [b.lease_id]
    assert other.take_requeued(1) == [task(2)]
