"""The broker's actor-facing handlers: heartbeats, leases out (with backpressure and the
replay rate limiter), trajectories in (screened, stored, acked, assembled into groups). Mixed
into `Broker` (broker/server.py), which owns the state they use."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import msgspec

from broker import metrics as M
from broker.curriculum.banks import TaskBank
from broker.curriculum.service import Curriculum
from broker.evaluation import EvalRounds
from broker.groups import GroupAssembler
from broker.intake import screen
from broker.leases import LeaseBook
from broker.parts import BrokerParts
from broker.peers import Peer
from broker.replay.table import Table
from broker.store import Incoming, Store, StoreError, TrajMeta
from shared import protocol as P
from shared.config import Config
from shared.metrics import REJECTED_FRAMES
from shared.validation import Invalid, Limits

log = logging.getLogger("broker.server")

MAX_LEASES_PER_REQUEST = 256
MAX_HEARTBEAT_STATS = 64  # an actor sends ~10; each peer's are kept (Status) for an hour
BACKPRESSURE_RETRY_S = 0.5  # what an actor is told to wait when it gets fewer leases


class ActorSide(BrokerParts):
    # provided by Broker
    cfg: Config
    store: Store
    table: Table
    leases: LeaseBook
    groups: GroupAssembler
    curriculum: Curriculum
    evals: EvalRounds
    bank: TaskBank
    vocab_size: int | None
    policy: P.PolicyPublished | None
    ingest_bytes: int
    learner_batch: int
    clock: Callable[[], float]

    async def _on_heartbeat(self, ident: bytes, peer: Peer, msg: P.Heartbeat) -> None:
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

    def outstanding(self) -> int:
        """Trajectories stored-but-unsampled plus episodes still owed by active leases."""
        owed = sum(
            max(0, a.lease.group_size - self.groups.delivered(a.lease_id))
            for a in self.leases.active.values()
        )
        return self.table.size + self.groups.n_trajs + owed

    def backpressure_bound(self) -> int:
        """Most trajectories the broker lets be outstanding (see `outstanding`).

        Anything beyond what the learner consumes within its staleness window would be evicted
        as stale before it is sampled, so once a learner has told us its batch size the bound
        is (max_staleness + 1) batches, capped by replay_capacity; before that, replay_capacity.
        Never below one group, so a run can always make progress.
        """
        b = self.cfg.broker
        bound = b.replay_capacity
        if self.learner_batch and b.max_staleness >= 0:
            bound = min(bound, (b.max_staleness + 1) * self.learner_batch)
        return max(bound, b.group_size)

    async def _on_task_request(self, ident: bytes, peer: Peer, msg: P.TaskRequest) -> None:
        b = self.cfg.broker
        want = max(0, min(msg.n, MAX_LEASES_PER_REQUEST))
        room = self.backpressure_bound() - self.outstanding()
        # Evaluation first: its leases bypass backpressure and the rate limiter, since their
        # episodes never reach replay (broker/evaluation.py).
        evals = self.evals.grant(ident, want, peer.stats.get("policy_version"))
        want -= len(evals)
        n = self._rate_limited(min(want, max(0, room // b.group_size)))
        tasks = [(t, 1.0 / len(self.bank)) for t in self.leases.take_requeued(n)]
        tasks += [(p.task, p.prob) for p in self.curriculum.pick(n - len(tasks))]
        granted = [
            self.leases.grant(ident, task, b.group_size, prob, self.curriculum.version)
            for task, prob in tasks
        ]
        if granted:
            M.LEASES_GRANTED.inc(len(granted))
            rows = [(f"lease/{a.lease_id}", msgspec.msgpack.encode(a.record())) for a in granted]
            self._spawn(self.store.kv_write(rows))
        retry = 0.0
        if n + len(evals) < msg.n:
            M.BACKPRESSURE.inc()
            retry = BACKPRESSURE_RETRY_S
        self._update_gauges()
        leases = evals + [a.lease for a in granted]
        await self._send(ident, P.TaskGrant(leases=leases, retry_after_s=retry))

    async def _on_eval_outcome(self, ident: bytes, peer: Peer, msg: P.EvalOutcome) -> None:
        why = self.evals.outcome(ident, msg)
        if why is not None:  # nothing to answer: the actor does not wait for it
            M.EVAL_REFUSED.inc()
            log.info("eval outcome from %s not recorded: %s", peer.peer_id, why)

    def _rate_limited(self, n: int) -> int:
        """How many of `n` leases the rate limiter lets be granted now (actors ahead: fewer).

        Every trajectory already owed (partial groups, active leases) counts as an insert to
        come, so grants stop before the ratio would be exceeded, not after. Data already sent
        is never refused. Liveness: when nothing is owed and the learner still cannot be
        served, enough leases for one batch are granted whatever the ratio says (otherwise an
        eviction that left the ratio in debt, or a too narrow error_buffer, could stall both).
        """
        if n <= 0:
            return n
        g = self.cfg.broker.group_size
        rl, size = self.table.rate_limiter, self.table.size
        owed = self.outstanding() - size
        k = 0
        while k < n and rl.can_insert(size, owed + (k + 1) * g):
            k += 1
        if (
            k == 0
            and owed == 0
            and self.learner_batch
            and not self.table.can_sample(self.learner_batch)
        ):
            k = min(n, max(1, math.ceil((self.learner_batch - size) / g)))
        if k < n:
            M.RATE_LIMITER_BLOCKED.labels(side="insert").inc()
        return k

    async def _on_trajectories(
        self, ident: bytes, peer: Peer, msg: P.TrajectoryBatchFrames
    ) -> None:
        nbytes = sum(len(f) for f in msg.items)
        if self.ingest_bytes and self.ingest_bytes + nbytes > self.cfg.broker.max_ingest_bytes:
            # Backpressure by shedding: no ack, so the outbox keeps the batch and resends it.
            M.INGEST_SHED.inc(len(msg.items))
            return
        got = screen(msg.items, self._limits(), peer.peer_id, self._lease_check(ident))
        for error in got.errors:
            await self._send(ident, error)
        if got.items:
            self.ingest_bytes += nbytes
            M.INGEST_BYTES.set(self.ingest_bytes)
            self._spawn(self._ingest(ident, peer, got.items, got.rejected, nbytes))
        elif got.rejected:
            await self._send(ident, P.Ack(traj_ids=[], rejected=got.rejected))

    def _lease_check(self, ident: bytes) -> Callable[[P.TrajectoryView], Invalid | None]:
        """A trajectory belongs to its lease's group, and a live lease to the actor it was
        granted to, for the task it was granted for: no actor can put episodes into another's
        group (and skew its baseline). A lease the book no longer has (expired, completed,
        or granted before a restart without durability) is taken as it comes."""

        def check(t: P.TrajectoryView) -> Invalid | None:
            if t.group_id != t.lease_id:
                return Invalid("lease", f"{t.traj_id}: group {t.group_id!r} is not its lease")
            held = self.leases.get(t.lease_id)
            if held is None:
                return None
            if held.peer != ident:
                return Invalid("lease", f"{t.traj_id}: lease {t.lease_id} is another actor's")
            if t.task_id != held.lease.task.task_id:
                return Invalid("lease", f"{t.traj_id}: task {t.task_id!r} is not the lease's")
            return None

        return check

    def _limits(self) -> Limits:
        """What a trajectory is checked against: the model's vocabulary, [actor]
        max_model_len, and the newest policy this broker knows (none after a restart without
        durability: then versions are only checked for order)."""
        return Limits(
            vocab_size=self.vocab_size,
            max_tokens=self.cfg.actor.max_model_len,
            # + 1: the newest publication may have been relayed but not yet saved when this
            # broker last stopped (see _on_policy)
            policy_version=self.policy.version + 1 if self.policy else None,
        )

    async def _ingest(
        self,
        ident: bytes,
        peer: Peer,
        items: list[Incoming],
        rejected: list[P.Rejected],
        nbytes: int,
    ) -> None:
        try:
            result = await self.store.put(items)
        except StoreError as e:
            # No ack: the actor's outbox keeps the batch and resends it; dedupe makes that safe.
            # The store logged the failure (once per streak) and counted it.
            log.debug("not acking %d trajectories from %s: %s", len(items), peer.peer_id, e)
            return
        finally:
            self.ingest_bytes -= nbytes
            M.INGEST_BYTES.set(self.ingest_bytes)
        now = self.clock()
        peer.episodes += len(result.new)
        for meta in result.new:
            self._add_to_group(meta, now)
        M.TRAJ_ACKED.inc(len(items))
        M.DUPLICATES.inc(len(result.duplicates))
        self._update_gauges()
        ids = [t.view.traj_id for t in items]
        await self._send(ident, P.Ack(ids, duplicates=len(result.duplicates), rejected=rejected))

    def _add_to_group(
        self, meta: TrajMeta, now: float, times_sampled: int = 0, restoring: bool = False
    ) -> None:
        gid = meta.group_id
        lease = self.leases.get(gid)  # group_id == lease_id
        size = lease.lease.group_size if lease else self.cfg.broker.group_size
        done = self.groups.add(meta, size, now, times_sampled)
        if done is None:
            return
        item, metas = done
        # After a restart the curator resumes from its saved state: rebuilt groups taught it
        # already, so only live completions are fed to it.
        if restoring:
            zero_variance = len({m.reward for m in metas}) <= 1
        else:
            zero_variance = self.curriculum.group_done(item.task_id, metas)
        if zero_variance and self.cfg.broker.exclude_zero_variance:
            self._retire([(item, "zero_variance")])
        else:
            self._retire(self.table.insert(item))
        if self.leases.complete(gid) is not None:
            self._spawn(self.store.kv_write([(f"lease/{gid}", None)]))
