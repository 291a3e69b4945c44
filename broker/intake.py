"""Intake: what the actors send in (trajectories, evaluation scores), screened, stored, acked,
and assembled into the groups that enter replay.

Each frame is validated as strictly as a full decode, but through a zero-copy view
(`protocol.decode_view`); the frame slice itself is what the store keeps and what the learner
will get. Then `shared.validation` checks what decoding cannot (`screen`, which needs neither
sockets nor store). A bad frame is refused on its own, named in the Ack so its sender drops
it; the good ones of the same batch go on. An Ack goes out only once the store has committed
what it names: an actor's outbox forgets only what is durable.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from broker import metrics as M
from broker.parts import Books, Wiring
from broker.peers import Peer
from broker.store import Incoming, StoreError, TrajMeta
from shared import protocol as P
from shared.config import Config
from shared.metrics import REJECTED_FRAMES
from shared.validation import Invalid, Limits, check_batch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Screened:
    items: list[Incoming] = field(default_factory=list)  # to store, then ack
    rejected: list[P.Rejected] = field(default_factory=list)  # named in the Ack: dropped
    errors: list[P.Error] = field(default_factory=list)  # undecodable, not even a traj_id


@dataclass(slots=True)
class Arrival:
    """A screened TrajectoryBatch waiting for its commit: what its Ack will say."""

    ident: bytes
    peer: Peer
    items: list[Incoming]
    rejected: list[P.Rejected]
    nbytes: int


def screen(
    frames: list[msgspec.Raw],
    limits: Limits,
    sender: str,
    lease_check: Callable[[P.TrajectoryView], Invalid | None] | None = None,
) -> Screened:
    """`lease_check`: what the broker's lease book says of a trajectory's lease."""
    out = Screened()
    views: list[P.TrajectoryView] = []
    decoded: list[msgspec.Raw] = []
    for frame in frames:
        try:
            views.append(P.decode_view(frame))
            decoded.append(frame)
        except P.ProtocolError as e:
            REJECTED_FRAMES.labels(reason=e.reason).inc()
            tid = P.peek_traj_id(frame)
            if not tid:  # nothing to name: the sender can only be told
                out.errors.append(P.Error(reason=e.reason, detail=e.detail[:500]))
                continue
            _refuse(out, sender, tid, Invalid(e.reason, f"{tid}: {e.detail}"))
    # the per-token checks of the whole batch at once (shared/validation.py)
    for view, frame, bad in zip(views, decoded, check_batch(views, limits), strict=True):
        if bad is None and lease_check is not None:
            bad = lease_check(view)
        if bad is None:
            out.items.append(Incoming(view, frame))
        else:
            _refuse(out, sender, view.traj_id, bad)
    M.TRAJ_RECEIVED.inc(len(out.items))
    return out


def _refuse(out: Screened, sender: str, tid: str, bad: Invalid) -> None:
    M.TRAJ_REJECTED.labels(reason=bad.reason).inc()
    log.warning("refused a trajectory from %s (%s): %s", sender, bad.reason, bad.detail)
    out.rejected.append(P.Rejected(traj_id=tid, reason=bad.reason, detail=bad.detail[:300]))


def model_vocab_size(path: str) -> int:
    """`vocab_size` from the model's config.json, or 0 (token ids then only checked >= 0)
    when this machine has no copy of the model."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class Ingest:
    def __init__(
        self,
        cfg: Config,
        books: Books,
        policy: Callable[[], P.PolicyPublished | None],
        vocab_size: int,
        clock: Callable[[], float],
        io: Wiring,
    ) -> None:
        """`policy()`: the newest publication this broker knows, if any; `vocab_size`: 0
        when unknown (token ids then only checked >= 0)."""
        self.cfg = cfg
        self.store, self.table, self.leases = books.store, books.table, books.leases
        self.groups, self.curriculum = books.groups, books.curriculum
        self.evals, self.retirement = books.evals, books.retirement
        self.policy = policy
        self.vocab_size = vocab_size
        self.clock = clock
        self.io = io
        self.bytes_waiting = 0  # received, not yet committed (bounded by max_ingest_bytes)
        self._arrived: list[Arrival] = []  # screened, for the store_and_ack task spawned

    # ------------------------------------------------------------ trajectories

    async def on_trajectories(self, ident: bytes, peer: Peer, msg: P.TrajectoryBatchFrames) -> None:
        nbytes = sum(len(f) for f in msg.items)
        if self.bytes_waiting and self.bytes_waiting + nbytes > self.cfg.broker.max_ingest_bytes:
            # Backpressure by shedding: no ack, so the outbox keeps the batch and resends it.
            M.INGEST_SHED.inc(len(msg.items))
            return
        got = screen(msg.items, self.limits(), peer.peer_id, self.lease_check(ident))
        for error in got.errors:
            await self.io.send(ident, error)
        if got.items:
            self.bytes_waiting += nbytes
            M.INGEST_BYTES.set(self.bytes_waiting)
            # Every batch screened before the loop next runs this task (all the frames one
            # wake-up drained) shares one store put, one commit and one wait.
            if not self._arrived:
                self.io.spawn(self.store_and_ack())
            self._arrived.append(Arrival(ident, peer, got.items, got.rejected, nbytes))
        elif got.rejected:
            await self.io.send(ident, P.Ack(traj_ids=[], rejected=got.rejected))

    @property
    def arrived(self) -> int:
        """Batches screened and waiting for their store put to start."""
        return len(self._arrived)

    def lease_check(self, ident: bytes) -> Callable[[P.TrajectoryView], Invalid | None]:
        """A trajectory belongs to its lease's group, and a live lease to the actor it was
        granted to, for the task it was granted for: no actor can put episodes into another's
        group (and skew its baseline). A lease the book no longer has (expired, completed)
        is taken as it comes; under curve, only if this broker granted it for that task (its
        id's tag, broker/leases.py): an actor cannot make up groups. (In plaintext any peer
        can claim any role, so the tag would guard nothing; without durability the secret
        does not outlive the broker, and neither does anything else.)"""
        keyed = self.cfg.security.curve

        def check(t: P.TrajectoryView) -> Invalid | None:
            if t.group_id != t.lease_id:
                return Invalid("lease", f"{t.traj_id}: group {t.group_id!r} is not its lease")
            held = self.leases.get(t.lease_id)
            if held is None:
                if keyed and not self.leases.granted(t.lease_id, t.task_id):
                    return Invalid(
                        "lease", f"{t.traj_id}: lease {t.lease_id!r} was never granted here"
                    )
                return None
            if held.peer != ident:
                return Invalid("lease", f"{t.traj_id}: lease {t.lease_id} is another actor's")
            if t.task_id != held.lease.task.task_id:
                return Invalid("lease", f"{t.traj_id}: task {t.task_id!r} is not the lease's")
            return None

        return check

    def limits(self) -> Limits:
        """What a trajectory is checked against: the model's vocabulary, [actor]
        max_model_len, and the newest policy this broker knows (none after a restart without
        durability: then versions are only checked for order)."""
        policy = self.policy()
        return Limits(
            vocab_size=self.vocab_size,
            max_tokens=self.cfg.actor.max_model_len,
            # + 1: the newest publication may have been relayed but not yet saved when this
            # broker last stopped (see relay.Relay.on_policy)
            policy_version=policy.version + 1 if policy else None,
        )

    async def store_and_ack(self) -> None:
        """Store every batch that arrived since this task was spawned; ack each (one Ack per
        TrajectoryBatch, to its sender) once the commit holding them all is done."""
        arrived, self._arrived = self._arrived, []
        nbytes = sum(a.nbytes for a in arrived)
        try:
            results = await self.store.put_many([a.items for a in arrived])
        except StoreError as e:
            # No ack: the actor's outbox keeps the batch and resends it; dedupe makes that safe.
            # The store logged the failure (once per streak) and counted it.
            n = sum(len(a.items) for a in arrived)
            log.debug("not acking %d trajectories of %d batches: %s", n, len(arrived), e)
            return
        finally:
            self.bytes_waiting -= nbytes
            M.INGEST_BYTES.set(self.bytes_waiting)
        now = self.clock()
        for a, result in zip(arrived, results, strict=True):
            a.peer.episodes += len(result.new)
            for meta in result.new:
                self.add_to_group(meta, now, sender=a.ident)
            M.TRAJ_ACKED.inc(len(a.items))
            M.DUPLICATES.inc(len(result.duplicates))
        self.io.changed()
        for a, result in zip(arrived, results, strict=True):
            ids = [t.view.traj_id for t in a.items]
            ack = P.Ack(ids, duplicates=len(result.duplicates), rejected=a.rejected)
            await self.io.send(a.ident, ack)

    # ------------------------------------------------------------ groups

    def add_to_group(
        self,
        meta: TrajMeta,
        now: float,
        times_sampled: int = 0,
        restoring: bool = False,
        sender: bytes = b"",
    ) -> None:
        """A stored trajectory joins its group; a complete group enters replay (or is
        retired: zero variance) and ends its lease. `sender`: the actor it came from (the
        holder of its lease, if the lease is live), whose share a partial group uses."""
        gid = meta.group_id
        lease = self.leases.get(gid)  # group_id == lease_id
        size = lease.lease.group_size if lease else self.cfg.broker.group_size
        done = self.groups.add(meta, size, now, times_sampled, sender)
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
            self.retirement.retire([(item, "zero_variance")])
        else:
            self.retirement.retire(self.table.insert(item))
        if self.leases.complete(gid) is not None:
            self.io.spawn(self.store.kv_write([(f"lease/{gid}", None)]))

    def drop_abandoned(self, now: float) -> None:
        """Partial groups whose lease is gone and that heard nothing for a lease deadline."""
        abandoned = self.groups.drop_abandoned(
            now, self.cfg.broker.lease_deadline_s, lambda gid: gid in self.leases
        )
        self.retirement.retire([(item, "incomplete") for item in abandoned])

    def evict_for_retention(self, group_ids: set[str]) -> None:
        """Retention is about to delete unconsumed trajectories of these groups: take the
        groups out of replay and out of assembly first, counted as evicted ("retention")."""
        doomed = [item for item in self.table.items() if item.group_id in group_ids]
        for item in doomed:
            self.table.remove(item.key)  # the rows are deleted, not marked: not retired
        # drop_abandoned with "now" = inf and idle 0 drops exactly the groups not kept here
        dropped = self.groups.drop_abandoned(math.inf, 0.0, lambda gid: gid not in group_ids)
        n = len(doomed) + len(dropped)
        if n:
            self.retirement.count("retention", n)
            self.io.changed()

    # ------------------------------------------------------------ evaluation scores

    async def on_eval_outcome(self, ident: bytes, peer: Peer, msg: P.EvalOutcome) -> None:
        why = self.evals.outcome(ident, msg)
        if why is not None:  # nothing to answer: the actor does not wait for it
            M.EVAL_REFUSED.inc()
            log.info("eval outcome from %s not recorded: %s", peer.peer_id, why)
