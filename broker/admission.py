"""Admission: which tasks go out to the actors, and how many.

A TaskRequest is answered with evaluation leases first (they bypass backpressure and the
rate limiter: their episodes never reach replay, broker/evaluation.py), then training leases,
as many as backpressure and the replay rate limiter allow, requeued tasks (of expired leases)
before the curriculum's picks. Heartbeats keep an actor's leases alive; the learner's task
feedback teaches the curriculum what to pick.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

import msgspec

from broker import metrics as M
from broker.leases import ActiveLease
from broker.parts import Books, Wiring
from broker.peers import Peer
from shared import protocol as P
from shared.config import BrokerConfig
from shared.metrics import REJECTED_FRAMES
from shared.validation import Invalid, check_feedback

log = logging.getLogger("broker.server")

MAX_LEASES_PER_REQUEST = 256
MAX_HEARTBEAT_STATS = 64  # an actor sends ~10; each peer's are kept (Status) for an hour
BACKPRESSURE_RETRY_S = 0.5  # what an actor is told to wait when it gets fewer leases


class Admission:
    def __init__(
        self, cfg: BrokerConfig, books: Books, learner_batch: Callable[[], int], io: Wiring
    ) -> None:
        """`learner_batch()`: the learner's last batch size in trajectories (0: none yet)."""
        self.cfg = cfg
        self.group_size = cfg.group_size  # the broker's: every lease carries it
        self.store, self.table, self.leases = books.store, books.table, books.leases
        self.groups, self.curriculum, self.bank = books.groups, books.curriculum, books.bank
        self.evals = books.evals
        self.learner_batch = learner_batch
        self.io = io

    # ------------------------------------------------------------ leases out

    async def on_task_request(self, ident: bytes, peer: Peer, msg: P.TaskRequest) -> None:
        await self.io.send(ident, self.grant(ident, msg.n, peer.stats.get("policy_version")))

    def grant(self, ident: bytes, asked: int, holds: float | None = None) -> P.TaskGrant:
        """Leases for `asked` groups, fewer under backpressure (then with a retry delay).
        `holds`: the policy version the actor's heartbeats report (eval rounds wait for it)."""
        want = max(0, min(asked, MAX_LEASES_PER_REQUEST))
        evals = self.evals.grant(ident, want, holds)
        want -= len(evals)
        n = self.rate_limited(min(want, max(0, self.room_for(ident) // self.group_size)))
        tasks = [(t, 1.0 / len(self.bank)) for t in self.leases.take_requeued(n)]
        tasks += [(p.task, p.prob) for p in self.curriculum.pick(n - len(tasks))]
        granted = [
            self.leases.grant(ident, task, self.group_size, prob, self.curriculum.version)
            for task, prob in tasks
        ]
        if granted:
            M.LEASES_GRANTED.inc(len(granted))
            rows = [(f"lease/{a.lease_id}", msgspec.msgpack.encode(a.record())) for a in granted]
            self.io.spawn(self.store.kv_write(rows))
        retry = 0.0
        if n + len(evals) < asked:
            M.BACKPRESSURE.inc()
            retry = BACKPRESSURE_RETRY_S
        self.io.changed()
        return P.TaskGrant(leases=evals + [a.lease for a in granted], retry_after_s=retry)

    def owed(self) -> dict[bytes, int]:
        """Episodes still owed by active leases, per actor (routing id)."""
        owed: dict[bytes, int] = {}
        for a in self.leases.active.values():
            left = max(0, a.lease.group_size - self.groups.delivered(a.lease_id))
            owed[a.peer] = owed.get(a.peer, 0) + left
        return owed

    def outstanding(self) -> int:
        """Trajectories stored-but-unsampled plus episodes still owed by active leases."""
        return self.table.size + self.groups.n_trajs + sum(self.owed().values())

    def room_for(self, ident: bytes) -> int:
        """Episodes actor `ident` may be granted now: the room under the backpressure bound,
        and never more than its fair share of the bound, split evenly among the actors that
        hold some of it and this one. What an actor holds: the episodes its leases still owe,
        and the trajectories waiting in partial groups of its leases (its own and ones it no
        longer holds, until they are dropped as abandoned). An actor that holds more than
        its share (a greedy or hung one: it keeps leases until their `timeout_s`, and a
        restart leaves partial groups behind) cannot starve the others: an actor below its
        share gets up to it even past the bound, which the hog's excess overshoots by at
        most one bound."""
        owed = self.owed()
        held = Counter(owed)
        held.update(self.groups.by_owner)
        held.pop(b"", None)  # partial groups rebuilt after a restart: nobody's
        bound = self.backpressure_bound()
        room = bound - (self.table.size + self.groups.n_trajs + sum(owed.values()))
        share = max(self.group_size, bound // len(held.keys() | {ident}))
        fair = share - held.get(ident, 0)
        if any(n > share for peer, n in held.items() if peer != ident):
            room = max(room, fair)
        return min(room, fair)

    def backpressure_bound(self) -> int:
        """Most trajectories the broker lets be outstanding (see `outstanding`).

        Anything beyond what the learner consumes within its staleness window would be evicted
        as stale before it is sampled, so once a learner has told us its batch size the bound
        is (max_staleness + 1) batches, capped by replay_capacity; before that, replay_capacity.
        Never below one group, so a run can always make progress.
        """
        b = self.cfg
        bound = b.replay_capacity
        if self.learner_batch() and b.max_staleness >= 0:
            bound = min(bound, (b.max_staleness + 1) * self.learner_batch())
        return max(bound, self.group_size)

    def rate_limited(self, n: int) -> int:
        """How many of `n` leases the rate limiter lets be granted now (actors ahead: fewer).

        Every trajectory already owed (partial groups, active leases) counts as an insert to
        come, so grants stop before the ratio would be exceeded, not after. Data already sent
        is never refused. Liveness: when nothing is owed and the learner still cannot be
        served, enough leases for one batch are granted whatever the ratio says (otherwise an
        eviction that left the ratio in debt, or a too narrow error_buffer, could stall both).
        """
        if n <= 0:
            return n
        g = self.group_size
        rl, size = self.table.rate_limiter, self.table.size
        owed = self.outstanding() - size
        k = 0
        while k < n and rl.can_insert(size, owed + (k + 1) * g):
            k += 1
        batch = self.learner_batch()
        if k == 0 and owed == 0 and batch and not self.table.can_sample(batch):
            k = min(n, max(1, math.ceil((batch - size) / g)))
        if k < n:
            M.RATE_LIMITER_BLOCKED.labels(side="insert").inc()
        return k

    # ------------------------------------------------------------ leases kept, leases lost

    async def on_heartbeat(self, ident: bytes, peer: Peer, msg: P.Heartbeat) -> None:
        peer.last_heartbeat = peer.last_seen
        if len(msg.stats) > MAX_HEARTBEAT_STATS or any(len(k) > 64 for k in msg.stats):
            REJECTED_FRAMES.labels(reason="oversize_stats").inc()  # kept for an hour: bounded
            peer.stats = {}
        else:
            peer.stats = msg.stats
        if msg.peer_id:
            peer.peer_id = msg.peer_id
        self.leases.renew(ident)
        self.evals.book.renew(ident)

    def release(self, ident: bytes, peer_id: str) -> None:
        """Requeue the leases of routing id `ident`, a process of `peer_id` that a Hello
        says is gone (a restarted process's old id, or the same Client saying Hello again):
        their episodes died with it, and they would otherwise wait out the heartbeat timeout
        (or, under the same id, be renewed by the new process's heartbeats for ever)."""
        released = self.leases.release(ident)
        self.evals.requeue(self.evals.book.release(ident))
        if released:
            log.info("requeued %d leases of restarted %s", len(released), peer_id)
            self._forget(released)

    def expire(self, last_seen: Callable[[bytes], float | None]) -> None:
        """Expire leases of silent actors (and past their deadline); their tasks are requeued."""
        expired = self.leases.expire(last_seen)
        self.evals.requeue(self.evals.book.expire(last_seen))
        if expired:
            M.LEASES_EXPIRED.inc(len(expired))
            log.info("expired %d leases; their tasks are requeued", len(expired))
            self._forget(expired)

    def _forget(self, gone: list[ActiveLease]) -> None:
        self.io.spawn(self.store.kv_write([(f"lease/{a.lease_id}", None) for a in gone]))

    def holds_any(self, ident: bytes) -> bool:
        return bool(self.leases.count_for(ident) or self.evals.book.count_for(ident))

    # ------------------------------------------------------------ what to pick

    async def on_feedback(self, ident: bytes, peer: Peer, msg: P.TaskFeedback) -> None:
        bad = check_feedback(msg)
        if bad is None and not self._knows_task(msg.task_id):
            # Kept per task id (and saved): unknown ids would grow that without bound.
            bad = Invalid("feedback", f"{msg.task_id[:80]}: no such task in this bank")
        if bad is not None:  # never reaches the curator or its saved state
            M.TRAJ_REJECTED.labels(reason=bad.reason).inc()
            log.warning("refused feedback from %s: %s", peer.peer_id, bad.detail)
            await self.io.send(ident, P.Error(reason="invalid", detail=bad.detail[:300]))
            return
        self.curriculum.feedback(msg)
        self.io.spawn(self.store.kv_set(f"feedback/{msg.task_id}", P.encode(msg)))

    def _knows_task(self, task_id: str) -> bool:
        try:
            self.bank.task(task_id)
        except KeyError:
            return False
        return True
