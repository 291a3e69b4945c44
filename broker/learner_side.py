"""The broker's learner-facing handlers: batches out (exactly once), policies relayed,
priorities in. Mixed into `Broker` (broker/server.py), which owns the state they use.

Exactly-once: every batch handed out is recorded with its claim and kept in `BatchBook`
until a learner checkpoint covers the step that trained it (broker/batches.py tells the
whole life of a batch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from broker import metrics as M
from broker.batches import BatchBook, BatchRecord, encode, key
from broker.evaluation import EvalRounds
from broker.parts import BrokerParts
from broker.peers import ALLOWED, Peer
from broker.replay import GroupItem
from broker.replay.table import Table
from broker.store import CORRUPT, Claimed, CorruptRecords, Store, StoreError
from shared import protocol as P
from shared.config import Config
from shared.crashpoints import crash
from shared.metrics import REJECTED_FRAMES, TRAJECTORY_STALENESS

log = logging.getLogger("broker.server")

NOT_READY_RETRY_S = 0.2  # what the learner is told to wait when no batch can be formed
# A policy version more than this beyond both the newest one and the version the learner's
# Hello announced is implausible (a learner moves by `publish_every` per publish): refused,
# so a forged huge version cannot lock the real learner out. Versions are int32 on the wire.
MAX_POLICY_JUMP = 1000
MAX_POLICY_VERSION = 2**31 - 1
MAX_EVAL_TASKS = 4096  # held-out tasks per family in one evaluation round
MAX_EVAL_SAMPLES = 256  # episodes per held-out task
# What only the active learner may send (one learner per run: see `fenced`): the learner's
# messages that other roles may not send either.
LEARNER_MESSAGES = tuple(ALLOWED["learner"] - ALLOWED["actor"] - ALLOWED["cli"])


class LearnerSide(BrokerParts):
    # provided by Broker
    cfg: Config
    store: Store
    table: Table
    batches: BatchBook
    policy: P.PolicyPublished | None
    peers: dict[bytes, Peer]
    learner_batch: int
    learner_announced: int  # the policy version the learner's Hello announced
    learner_ident: bytes | None  # the active learner's routing id
    learner_epoch: int  # how many learners have been active (a fencing token)
    clock: Callable[[], float]
    evals: EvalRounds

    # ------------------------------------------------------------ one learner

    def fenced(self, ident: bytes, msg: P.Base) -> str | None:
        """Why a learner's message is refused: another learner is the active one.

        The first learner to speak becomes the active one. A second learner's Hello is
        refused while the active one is alive (heard from within `heartbeat_timeout_s`; the
        learner heartbeats while it trains); once it is silent that long, a new learner's
        Hello takes over and the old one is fenced off: everything it sends is refused, so
        the policy lineage never alternates between two learners."""
        learnerish = isinstance(msg, P.Hello) and msg.role == "learner"
        if not learnerish and not isinstance(msg, LEARNER_MESSAGES):
            return None
        holder = self.learner_ident
        if holder is None or holder == ident:
            self._activate(ident)
            return None
        if not learnerish:
            return "fenced: another learner is the active one (this one was replaced)"
        active = self.peers.get(holder)
        silent = self.clock() - active.last_seen if active is not None else math.inf
        if silent <= self.cfg.broker.heartbeat_timeout_s:
            name = active.peer_id if active is not None else "?"
            return f"learner {name} is active (heard {silent:.0f}s ago): one learner per run"
        self._activate(ident)
        return None

    def _activate(self, ident: bytes) -> None:
        if self.learner_ident != ident:
            self.learner_ident = ident
            self.learner_epoch += 1
            log.info("learner %r is the active learner (epoch %d)", ident, self.learner_epoch)

    # ------------------------------------------------------------ batches

    async def _on_sample(self, ident: bytes, peer: Peer, msg: P.SampleRequest) -> None:
        if msg.batch_size < 1:
            await self._send(ident, P.Error(reason="invalid", detail="batch_size must be >= 1"))
            return
        pending = self.batches.pending()
        if pending is not None:  # its reply was lost or is late, or the learner restarted
            self._spawn(self._hand_again(ident, pending))
            return
        if msg.batch_size != self.learner_batch:
            check = getattr(self.table.rate_limiter, "check_window", None)
            problem = check(msg.batch_size, self.cfg.broker.group_size) if check else None
            if problem:
                log.warning("%s", problem)
        self.learner_batch = msg.batch_size
        # The learner's version as it says, but never beyond the newest published one plus
        # a publish interval: a forged huge version would evict the whole replay as stale.
        current = self.policy.version if self.policy else 0
        version = min(msg.policy_version, current + max(1, self.cfg.learner.publish_every))
        self._retire(self.table.evict_stale(version, self.cfg.broker.max_staleness))
        items = self.table.sample(msg.batch_size)
        self._update_gauges()
        if items is None:
            M.NOT_READY.inc()
            if self.table.last_refusal == "rate_limiter":
                M.RATE_LIMITER_BLOCKED.labels(side="sample").inc()
            await self._send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        self._spawn(self._hand_out(ident, items, msg.policy_version))

    async def _hand_out(self, ident: bytes, items: list[GroupItem], version: int) -> None:
        seqs = [s for item in items for s in item.seqs]
        rec = self.batches.new(seqs, self.table.weights(items), max(item.key for item in items))
        try:
            # durable, with the batch's record, before anything leaves the broker
            claimed = await self.store.claim(seqs, self.batches.kv_of_new(rec))
        except CorruptRecords as e:
            # Quarantined by the store; drop their groups (a group-relative baseline needs the
            # whole group) and put the rest back: the learner's next request gets a batch.
            bad = set(e.seqs)
            self.table.restore(items)  # undoes the sampling count of all of them
            hit = [item for item in items if bad.intersection(item.seqs)]
            for item in hit:
                self.table.remove(item.key)
            self._retire([(item, CORRUPT) for item in hit])
            self._update_gauges()
            await self._send(ident, P.NotReady(self.table.size, 0.0))
            return
        except StoreError as e:
            log.error("could not record sampling of %d trajectories: %s", len(seqs), e)
            self.table.restore(items)
            self._update_gauges()
            await self._send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        self.batches.add(rec)
        crash("broker.after_claim")
        for c in claimed:
            TRAJECTORY_STALENESS.observe(max(0, version - c.min_version))
        M.TRAJ_SAMPLED.inc(len(claimed))
        M.BATCHES_KEPT.set(len(self.batches.records))
        await self._send(ident, self._frames(rec, claimed))

    async def _hand_again(self, ident: bytes, rec: BatchRecord) -> None:
        try:
            claimed = await self.store.read(rec.seqs)
        except StoreError as e:
            if isinstance(e, CorruptRecords):  # damaged since: its trajectories leave, named
                log.error("batch %d cannot be handed again: %s", rec.batch_id, e)
                self.batches.drop(rec.batch_id)
                self._spawn(self.store.retire(rec.seqs, CORRUPT))
                self._spawn(self.store.kv_write([(key(rec.batch_id), None)]))
                M.EVICTED.labels(reason=CORRUPT).inc()
            else:
                log.error("could not read batch %d to hand it again: %s", rec.batch_id, e)
            await self._send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        M.BATCHES_HANDED_AGAIN.inc()
        log.info("handing batch %d to the learner again (not acknowledged)", rec.batch_id)
        await self._send(ident, self._frames(rec, claimed))

    @staticmethod
    def _frames(rec: BatchRecord, claimed: list[Claimed]) -> P.BatchFrames:
        return P.BatchFrames(
            [c.frame for c in claimed],
            sample_ids=rec.seqs,
            is_weights=rec.is_weights,
            cursor=rec.cursor,
            batch_id=rec.batch_id,
        )

    async def _on_batch_trained(self, ident: bytes, peer: Peer, msg: P.BatchTrained) -> None:
        rec = self.batches.trained(msg.batch_id, msg.step)
        if rec is not None:
            self._spawn(self.store.kv_set(key(rec.batch_id), encode(rec)))

    async def _on_checkpointed(self, ident: bytes, peer: Peer, msg: P.Checkpointed) -> None:
        done = self.batches.checkpointed(msg.step)
        if done:
            self._spawn(self.store.kv_write([(key(i), None) for i in done]))
        M.BATCHES_KEPT.set(len(self.batches.records))

    def learner_resumed(self, peer_id: str, step: int, version: int) -> None:
        """A learner's Hello: batches trained after the step it resumed from go out again."""
        self.learner_announced = min(version, MAX_POLICY_VERSION)
        lost = self.batches.learner_resumed(step)
        if lost:
            log.info(
                "learner %s resumed at step %d: %d batches trained after it will be handed again",
                peer_id,
                step,
                len(lost),
            )
            self._spawn(self.store.kv_write([(key(r.batch_id), encode(r)) for r in lost]))

    # ------------------------------------------------------------ policies, priorities

    async def _on_policy(self, ident: bytes, peer: Peer, msg: P.PolicyPublished) -> None:
        current = self.policy.version if self.policy else 0
        bound = min(MAX_POLICY_VERSION, max(current, self.learner_announced) + MAX_POLICY_JUMP)
        if not 0 <= msg.version <= bound:
            detail = f"policy v{msg.version} is implausible (newest v{current}, at most v{bound})"
            REJECTED_FRAMES.labels(reason="implausible_version").inc()
            log.warning("refused from %s: %s", peer.peer_id, detail)
            await self._send(ident, P.Error(reason="invalid", detail=detail))
            return
        if self.policy is not None and msg.version < self.policy.version:
            log.warning("ignoring policy v%d: v%d is newer", msg.version, self.policy.version)
            return
        self.policy = msg  # in memory first, so every Welcome from now on carries it
        M.POLICY_VERSION.set(msg.version)
        # Saved in the background: waiting for the store here would delay every actor's next
        # weights by a commit (more staleness). A broker that crashes before the save knows
        # one version less than its actors may run: `_limits` allows for that one.
        self._spawn(self.store.kv_set("policy", P.encode(msg)))
        horizon = 10 * self.cfg.broker.heartbeat_timeout_s
        now = self.clock()
        actors = [
            p for p in self.peers.values() if p.role == "actor" and now - p.last_seen <= horizon
        ]
        for p in actors:
            await self._send(p.ident, msg)
        log.info("policy v%d published; relayed to %d actors", msg.version, len(actors))

    async def _on_eval_request(self, ident: bytes, peer: Peer, msg: P.EvalRequest) -> None:
        if not (0 <= msg.version <= MAX_POLICY_VERSION and 0 <= msg.tasks <= MAX_EVAL_TASKS):
            detail = f"eval request v{msg.version} for {msg.tasks} tasks per family"
        elif not 1 <= msg.samples <= MAX_EVAL_SAMPLES:
            detail = f"eval request with {msg.samples} samples per task"
        else:
            await self._send(ident, self.evals.request(msg))
            return
        REJECTED_FRAMES.labels(reason="invalid").inc()
        await self._send(ident, P.Error(reason="invalid", detail=detail))

    async def _on_priorities(self, ident: bytes, peer: Peer, msg: P.PriorityUpdate) -> None:
        M.PRIORITY_UPDATES.inc(self.table.update_priorities(msg.sample_ids, msg.priorities))
