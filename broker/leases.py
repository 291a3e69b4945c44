"""Lease bookkeeping: grant, renew, complete, expire -> requeue.

A lease is one task x `group_size` episodes handed to one actor; its id is also the group id of
the trajectories it produces. A lease ends when its group is complete in the store, or expires
when its actor has been silent for `heartbeat_timeout_s` or it outlives its deadline (renewed
by the actor's heartbeats, but never past `timeout_s` after the grant, so a hung episode cannot
hold its task forever); the task of an expired lease is re-granted under a new lease id, so a
crashed actor costs time, not tasks.

A lease id carries a tag, a keyed hash of its nonce and its task under the broker's lease
secret (kept in the store, so it survives restarts): long after a lease has left the book
(completed, expired), the broker can still tell an id it granted for that task from one an
actor made up (`LeaseBook.granted`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from shared import protocol as P


class LeaseRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A lease as persisted in the store's kv table (so a broker restart keeps them)."""

    lease: P.Lease
    peer: bytes


@dataclass(slots=True)
class ActiveLease:
    lease: P.Lease
    peer: bytes  # routing identity of the actor holding it
    granted: float  # monotonic clock
    deadline: float  # monotonic clock; renewals never move it past `hard`
    hard: float = float("inf")  # granted + the lease's timeout_s

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id

    def record(self) -> LeaseRecord:
        return LeaseRecord(lease=self.lease, peer=self.peer)


def new_lease_id(secret: bytes, task_id: str) -> str:
    # Random rather than a counter: ids must stay unique across broker restarts, since they are
    # the group ids of stored trajectories.
    nonce = secrets.token_hex(8)
    return f"{nonce}-{_tag(secret, nonce, task_id)}"


def _tag(secret: bytes, nonce: str, task_id: str) -> str:
    msg = f"{nonce}\0{task_id}".encode()
    return hashlib.blake2b(msg, key=secret, digest_size=8).hexdigest()


class LeaseBook:
    def __init__(
        self,
        deadline_s: float,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 0.0,
        requeue: bool = True,
    ) -> None:
        """`requeue`: tasks of expired or released leases go to `requeued` (the training
        book); False for a book whose owner puts them back itself (evaluation rounds)."""
        self.deadline_s = deadline_s
        self.requeue = requeue
        self.timeout_s = timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.active: dict[str, ActiveLease] = {}
        # the tags' key: a fresh one until the server restores the store's (broker/restore.py)
        self.secret = secrets.token_bytes(16)
        self.requeued: deque[P.TaskSpec] = deque()  # tasks of expired leases, granted first

    def __len__(self) -> int:
        return len(self.active)

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self.active

    def get(self, lease_id: str) -> ActiveLease | None:
        return self.active.get(lease_id)

    def granted(self, lease_id: str, task_id: str) -> bool:
        """Whether `lease_id` is one this broker (under its current secret) granted for
        `task_id`, whether or not it is still in the book."""
        nonce, _, tag = lease_id.partition("-")
        return bool(tag) and hmac.compare_digest(tag, _tag(self.secret, nonce, task_id))

    def grant(
        self,
        peer: bytes,
        task: P.TaskSpec,
        group_size: int,
        sample_prob: float = 1.0,
        curator_version: int = 0,
    ) -> ActiveLease:
        lease = P.Lease(
            lease_id=new_lease_id(self.secret, task.task_id),
            task=task,
            group_size=group_size,
            deadline_s=self.deadline_s,
            sample_prob=sample_prob,
            curator_version=curator_version,
            timeout_s=self.timeout_s,
        )
        return self._add(lease, peer)

    def _add(self, lease: P.Lease, peer: bytes) -> ActiveLease:
        now = self.clock()
        hard = now + lease.timeout_s if lease.timeout_s > 0 else float("inf")
        deadline = min(now + self.deadline_s, hard)
        active = ActiveLease(lease=lease, peer=peer, granted=now, deadline=deadline, hard=hard)
        self.active[lease.lease_id] = active
        return active

    def restore(self, records: Iterable[LeaseRecord]) -> None:
        """Re-adopt persisted leases after a restart; their clocks start now."""
        for r in records:
            self._add(r.lease, r.peer)

    def renew(self, peer: bytes) -> int:
        """A heartbeat from `peer` pushes all its deadlines out; returns how many."""
        deadline = self.clock() + self.deadline_s
        n = 0
        for a in self.active.values():
            if a.peer == peer:
                a.deadline = min(deadline, a.hard)
                n += 1
        return n

    def complete(self, lease_id: str) -> ActiveLease | None:
        return self.active.pop(lease_id, None)

    def expire(self, last_seen: Callable[[bytes], float | None]) -> list[ActiveLease]:
        """Expire leases of silent peers or past their deadline; their tasks are requeued.

        `last_seen(peer)` is the monotonic time the peer was last heard from (None: not since
        this broker started, so the lease's own grant/restore time counts).
        """
        now = self.clock()
        out = []
        for a in list(self.active.values()):
            seen = last_seen(a.peer)
            heard = a.granted if seen is None else max(seen, a.granted)
            if now - heard > self.heartbeat_timeout_s or now > a.deadline:
                del self.active[a.lease_id]
                if self.requeue:
                    self.requeued.append(a.lease.task)
                out.append(a)
        return out

    def release(self, peer: bytes) -> list[ActiveLease]:
        """Requeue every lease `peer` holds (it restarted: its episodes died with it)."""
        out = [a for a in self.active.values() if a.peer == peer]
        for a in out:
            del self.active[a.lease_id]
            if self.requeue:
                self.requeued.append(a.lease.task)
        return out

    def take_requeued(self, n: int) -> list[P.TaskSpec]:
        out: list[P.TaskSpec] = []
        while self.requeued and len(out) < n:
            out.append(self.requeued.popleft())
        return out

    def count_for(self, peer: bytes) -> int:
        return sum(1 for a in self.active.values() if a.peer == peer)
