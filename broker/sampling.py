"""Sampling: batches out to the learner, exactly once, and the learner's priorities in.

Every batch handed out is recorded with its claim and kept in `BatchBook` until a learner
checkpoint covers the step that trained it (broker/batches.py tells the whole life of a
batch). A batch is whole groups (a group-relative baseline needs every member), and nothing
leaves the broker before its claim is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker import metrics as M
from broker.batches import BatchRecord, encode, key
from broker.parts import Books, Wiring
from broker.peers import Peer
from broker.replay import GroupItem
from broker.store import CORRUPT, Claimed, CorruptRecords, StoreError
from shared import protocol as P
from shared.config import Config
from shared.crashpoints import crash
from shared.metrics import TRAJECTORY_STALENESS

log = logging.getLogger("broker.server")

NOT_READY_RETRY_S = 0.2  # what the learner is told to wait when no batch can be formed


class Sampling:
    def __init__(
        self, cfg: Config, books: Books, policy_version: Callable[[], int], io: Wiring
    ) -> None:
        """`policy_version()`: the newest version published (bounds the staleness cap)."""
        self.cfg = cfg
        self.store, self.table, self.batches = books.store, books.table, books.batches
        self.retirement = books.retirement
        self.policy_version = policy_version
        self.io = io
        self.learner_batch = 0  # last SampleRequest.batch_size seen (backpressure bound)

    # ------------------------------------------------------------ batches

    async def on_sample(self, ident: bytes, peer: Peer, msg: P.SampleRequest) -> None:
        if msg.batch_size < 1:
            await self.io.send(ident, P.Error(reason="invalid", detail="batch_size must be >= 1"))
            return
        pending = self.batches.pending()
        if pending is not None:  # its reply was lost or is late, or the learner restarted
            self.io.spawn(self.hand_again(ident, pending))
            return
        items = self.sample(msg.batch_size, msg.policy_version)
        if items is None:
            M.NOT_READY.inc()
            if self.table.last_refusal == "rate_limiter":
                M.RATE_LIMITER_BLOCKED.labels(side="sample").inc()
            await self.io.send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        self.io.spawn(self.hand_out(ident, items, msg.policy_version))

    def sample(self, batch_size: int, learner_version: int) -> list[GroupItem] | None:
        """Whole groups for a batch of `batch_size` trajectories, after evicting what is too
        stale for the learner at `learner_version`; None: not enough (or the rate limiter)."""
        if batch_size != self.learner_batch:
            check = getattr(self.table.rate_limiter, "check_window", None)
            problem = check(batch_size, self.cfg.broker.group_size) if check else None
            if problem:
                log.warning("%s", problem)
        self.learner_batch = batch_size
        # The learner's version as it says, but never beyond the newest published one plus
        # a publish interval: a forged huge version would evict the whole replay as stale.
        cap = self.policy_version() + max(1, self.cfg.learner.publish_every)
        version = min(learner_version, cap)
        self.retirement.retire(self.table.evict_stale(version, self.cfg.broker.max_staleness))
        items = self.table.sample(batch_size)
        self.io.changed()
        return items

    async def hand_out(self, ident: bytes, items: list[GroupItem], version: int) -> None:
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
            self.retirement.retire([(item, CORRUPT) for item in hit])
            self.io.changed()
            await self.io.send(ident, P.NotReady(self.table.size, 0.0))
            return
        except StoreError as e:
            log.error("could not record sampling of %d trajectories: %s", len(seqs), e)
            self.table.restore(items)
            self.io.changed()
            await self.io.send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        self.batches.add(rec)
        crash("broker.after_claim")
        for c in claimed:
            TRAJECTORY_STALENESS.observe(max(0, version - c.min_version))
        M.TRAJ_SAMPLED.inc(len(claimed))
        M.BATCHES_KEPT.set(len(self.batches.records))
        await self.io.send(ident, frames(rec, claimed))

    async def hand_again(self, ident: bytes, rec: BatchRecord) -> None:
        try:
            claimed = await self.store.read(rec.seqs)
        except StoreError as e:
            if isinstance(e, CorruptRecords):  # damaged since: its trajectories leave, named
                log.error("batch %d cannot be handed again: %s", rec.batch_id, e)
                self.batches.drop(rec.batch_id)
                self.io.spawn(self.store.retire(rec.seqs, CORRUPT))
                self.io.spawn(self.store.kv_write([(key(rec.batch_id), None)]))
                M.EVICTED.labels(reason=CORRUPT).inc()
            else:
                log.error("could not read batch %d to hand it again: %s", rec.batch_id, e)
            await self.io.send(ident, P.NotReady(self.table.size, NOT_READY_RETRY_S))
            return
        M.BATCHES_HANDED_AGAIN.inc()
        log.info("handing batch %d to the learner again (not acknowledged)", rec.batch_id)
        await self.io.send(ident, frames(rec, claimed))

    # ------------------------------------------------------------ acknowledgements

    async def on_batch_trained(self, ident: bytes, peer: Peer, msg: P.BatchTrained) -> None:
        rec = self.batches.trained(msg.batch_id, msg.step)
        if rec is not None:
            self.io.spawn(self.store.kv_set(key(rec.batch_id), encode(rec)))

    async def on_checkpointed(self, ident: bytes, peer: Peer, msg: P.Checkpointed) -> None:
        done = self.batches.checkpointed(msg.step)
        if done:
            self.io.spawn(self.store.kv_write([(key(i), None) for i in done]))
        M.BATCHES_KEPT.set(len(self.batches.records))

    def learner_resumed(self, peer_id: str, step: int) -> None:
        """A learner's Hello: batches trained after the step it resumed from go out again."""
        lost = self.batches.learner_resumed(step)
        if lost:
            log.info(
                "learner %s resumed at step %d: %d batches trained after it will be handed again",
                peer_id,
                step,
                len(lost),
            )
            self.io.spawn(self.store.kv_write([(key(r.batch_id), encode(r)) for r in lost]))

    async def on_priorities(self, ident: bytes, peer: Peer, msg: P.PriorityUpdate) -> None:
        M.PRIORITY_UPDATES.inc(self.table.update_priorities(msg.sample_ids, msg.priorities))


def frames(rec: BatchRecord, claimed: list[Claimed]) -> P.BatchFrames:
    return P.BatchFrames(
        [c.frame for c in claimed],
        sample_ids=rec.seqs,
        is_weights=rec.is_weights,
        cursor=rec.cursor,
        batch_id=rec.batch_id,
    )
