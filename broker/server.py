"""The broker's asyncio ROUTER loop: tasks out (leases), trajectories in, batches to the learner.

One event loop owns every in-memory structure (peers, leases, pending groups, replay table), so
no locks are needed; the only awaits that take time (store commits and claims) run in spawned
tasks, so a slow disk never stalls heartbeats, task requests or status replies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from broker import metrics as M
from broker.actor_side import ActorSide
from broker.batches import NEXT_ID_KEY, PREFIX, BatchBook
from broker.curriculum.banks import make_bank
from broker.curriculum.service import STATE_KEY as CURRICULUM_STATE_KEY
from broker.curriculum.service import Curriculum
from broker.evaluation import EvalRounds
from broker.groups import GroupAssembler
from broker.intake import model_vocab_size
from broker.learner_side import LearnerSide
from broker.leases import LeaseBook, LeaseRecord
from broker.peers import INFERRED_ROLE, Peer, forbidden
from broker.replay import GroupItem, build_table
from broker.retention import Retention
from broker.store import Store
from shared import protocol as P
from shared.config import Config
from shared.metrics import REJECTED_FRAMES
from shared.security import server_keys
from shared.transport import Server
from shared.validation import Invalid, check_feedback

log = logging.getLogger(__name__)

PEER_FORGET_AFTER_S = 3600.0  # peers silent this long leave Status and the relay list


class Broker(ActorSide, LearnerSide):
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        b = cfg.broker
        self.clock = clock
        self.store = Store(
            None if b.durability == "none" else b.data_dir, commit_interval_s=b.commit_interval_s
        )
        self.batches = BatchBook()  # handed to the learner, kept until checkpointed
        self.retention = Retention(
            self.store,
            b.retention,
            b.max_times_sampled,
            on_evict=self._evict_for_retention,
            keep_from=self.batches.oldest_seq,
        )
        self.table = build_table(b)  # [broker.replay]: sampler, rate limiter; removers
        self.leases = LeaseBook(
            b.lease_deadline_s, b.heartbeat_timeout_s, clock, timeout_s=b.episode_timeout_s
        )
        self.bank = make_bank(cfg.env)
        self.evals = EvalRounds(
            self.bank, LeaseBook(b.lease_deadline_s, b.heartbeat_timeout_s, clock, requeue=False)
        )
        self.vocab_size = model_vocab_size(cfg.model.path)
        self.curriculum = Curriculum(self.bank, b.curriculum)
        self.peers: dict[bytes, Peer] = {}
        self.groups = GroupAssembler()
        self.policy: P.PolicyPublished | None = None
        self.run_id = ""
        self.learner_batch = 0  # last SampleRequest.batch_size seen (backpressure bound)
        self.learner_announced = 0  # policy version of the learner's Hello (learner_side)
        self.learner_ident: bytes | None = None  # the active learner (learner_side.fenced)
        self.learner_epoch = 0
        self.ingest_bytes = 0  # received, not yet committed (bounded by max_ingest_bytes)
        self.evicted: Counter[str] = Counter()
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._handlers: dict[type, Callable[[bytes, Peer, Any], Coroutine[Any, Any, None]]] = {
            P.Hello: self._on_hello,
            P.Heartbeat: self._on_heartbeat,
            P.TaskRequest: self._on_task_request,
            P.TrajectoryBatchFrames: self._on_trajectories,
            P.SampleRequest: self._on_sample,
            P.BatchTrained: self._on_batch_trained,
            P.Checkpointed: self._on_checkpointed,
            P.PolicyPublished: self._on_policy,
            P.PriorityUpdate: self._on_priorities,
            P.TaskFeedback: self._on_feedback,
            P.EvalRequest: self._on_eval_request,
            P.EvalOutcome: self._on_eval_outcome,
            P.Status: self._on_status,
        }

    # ------------------------------------------------------------ lifecycle

    async def start(self, bind: str | None = None) -> str:
        """Bind, open the store, rebuild state; returns the bound endpoint."""
        b = self.cfg.broker
        self.server = Server(
            bind or f"tcp://{b.bind_host}:{b.port}",
            b.max_frame_bytes,
            accepts=P.BrokerInbound,
            curve=server_keys(self.cfg.security, "broker"),  # None unless [security] curve
        )
        try:
            await self.store.open()
            await self._load_state()
        except BaseException:
            self.server.close()
            await self.store.close()
            raise
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._serve()), loop.create_task(self._reap())]
        self._loops.append(loop.create_task(self.retention.run()))
        log.info(
            "broker %s listening on %s (store %s, %d stored, replay %d, policy v%d, vocab %s)",
            self.run_id,
            self.server.endpoint,
            self.store.path,
            self.store.stored,
            self.table.size,
            self.policy_version,
            self.vocab_size or "unknown: token ids checked for >= 0 only",
        )
        return self.server.endpoint

    async def stop(self) -> None:
        """Stop serving, let in-flight commits finish (and be acked), flush and close."""
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        self._save_curriculum()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        await self.store.close()
        if self.server is not None:
            self.server.close()

    async def _load_state(self) -> None:
        run_id = await self.store.kv_get("run_id")
        if run_id is None:
            self.run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            await self.store.kv_set("run_id", self.run_id.encode())
        else:
            self.run_id = run_id.decode()
        policy = await self.store.kv_get("policy")
        if policy is not None:
            self.policy = msgspec.msgpack.decode(policy, type=P.PolicyPublished)
            M.POLICY_VERSION.set(self.policy.version)
        records = [
            msgspec.msgpack.decode(v, type=LeaseRecord)
            for _, v in await self.store.kv_scan("lease/")
        ]
        self.leases.restore(records)
        for _, v in await self.store.kv_scan("feedback/"):
            self.bank.feedback(msgspec.msgpack.decode(v, type=P.TaskFeedback))
        self.curriculum.load(await self.store.kv_get(CURRICULUM_STATE_KEY))
        self.batches.load(await self.store.kv_scan(PREFIX), await self.store.kv_get(NEXT_ID_KEY))
        M.BATCHES_KEPT.set(len(self.batches.records))
        # Rebuild the replay index: open trajectories regrouped, complete groups in FIFO order.
        now = self.clock()
        for meta in await self.store.scan_open(self.cfg.broker.max_times_sampled):
            self._add_to_group(meta, now, times_sampled=meta.times_sampled, restoring=True)
        self._update_gauges()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("broker task failed", exc_info=task.exception())

    @property
    def policy_version(self) -> int:
        return self.policy.version if self.policy else 0

    # ------------------------------------------------------------ the loop

    async def _serve(self) -> None:
        assert self.server is not None
        while True:
            ident, msg = await self.server.recv()
            peer = self.peers.get(ident)
            if peer is None:  # unknown peers are fine: after a broker restart nobody re-Hellos
                peer = self.peers[ident] = Peer(ident, ident.decode(errors="replace"))
            peer.last_seen = self.clock()
            key_role = self.server.roles is not None
            if key_role:
                peer.role = self.server.role_of(ident) or "unknown"
            elif peer.role == "unknown":
                peer.role = INFERRED_ROLE.get(type(msg), "unknown")
            # Plaintext: a peer is held to the role its Hello claimed (no claim, no check).
            why = None
            if key_role or peer.said_hello:
                why = forbidden(peer.role if peer.role != "unknown" else None, msg, key_role)
            why = why or self.fenced(ident, msg)  # one learner per run
            if why is not None and type(msg) in self._handlers:
                REJECTED_FRAMES.labels(reason="forbidden").inc()
                log.warning("refused %s from %s: %s", type(msg).__name__, peer.peer_id, why)
                await self.server.send(ident, P.Error(reason="forbidden", detail=why))
                continue
            handler = self._handlers.get(type(msg))
            if handler is None:
                if not isinstance(msg, P.Error):  # never answer an Error with an Error
                    REJECTED_FRAMES.labels(reason="unexpected").inc()
                    detail = f"the broker does not accept {type(msg).__name__}"
                    await self.server.send(ident, P.Error(reason="unexpected", detail=detail))
                else:
                    log.warning("peer %s sent error %s: %s", peer.peer_id, msg.reason, msg.detail)
                continue
            try:
                await handler(ident, peer, msg)
            except Exception as e:  # a bug in one handler must not take the broker down
                log.exception("handling %s from %s", type(msg).__name__, peer.peer_id)
                await self.server.send(ident, P.Error(reason="internal", detail=repr(e)[:300]))

    async def _send(self, ident: bytes, msg: P.Base) -> None:
        assert self.server is not None
        await self.server.send(ident, msg)

    async def _reap(self) -> None:
        """Expire leases of silent actors, drop abandoned partial groups, refresh gauges."""
        b = self.cfg.broker
        tick = min(1.0, max(0.05, b.heartbeat_timeout_s / 4))
        while True:
            await asyncio.sleep(tick)
            self.reap()

    def _save_curriculum(self) -> None:
        state = self.curriculum.state_if_changed()
        if state is not None:
            self._spawn(self.store.kv_set(CURRICULUM_STATE_KEY, state))

    def reap(self) -> None:
        b = self.cfg.broker
        self._save_curriculum()
        self.curriculum.refresh_metrics()

        def last_seen(ident: bytes) -> float | None:
            return self.peers[ident].last_seen if ident in self.peers else None

        expired = self.leases.expire(last_seen)
        self.evals.requeue(self.evals.book.expire(last_seen))
        if expired:
            M.LEASES_EXPIRED.inc(len(expired))
            log.info("expired %d leases; their tasks are requeued", len(expired))
            self._spawn(self.store.kv_write([(f"lease/{a.lease_id}", None) for a in expired]))
        now = self.clock()
        abandoned = self.groups.drop_abandoned(
            now, b.lease_deadline_s, lambda gid: gid in self.leases
        )
        self._retire([(item, "incomplete") for item in abandoned])
        # Forget long-gone peers (every `headrace status` call is a new one); keep lease holders.
        forget = now - PEER_FORGET_AFTER_S
        for ident in [i for i, p in self.peers.items() if p.last_seen < forget]:
            if not self.leases.count_for(ident) and not self.evals.book.count_for(ident):
                del self.peers[ident]
        self._update_gauges()

    def _update_gauges(self) -> None:
        now = self.clock()
        timeout = self.cfg.broker.heartbeat_timeout_s
        M.REPLAY_SIZE.set(self.table.size)
        M.REPLAY_GROUPS.set(len(self.table))
        M.PENDING_GROUPS.set(len(self.groups))
        M.LEASES_ACTIVE.set(len(self.leases))
        M.RATE_LIMITER_INSERTS.set(self.table.rate_limiter.inserts)
        M.RATE_LIMITER_SAMPLES.set(self.table.rate_limiter.samples)
        M.ACTORS_CONNECTED.set(
            sum(p.role == "actor" and now - p.last_seen <= timeout for p in self.peers.values())
        )

    # ------------------------------------------------------------ actors

    async def _on_hello(self, ident: bytes, peer: Peer, msg: P.Hello) -> None:
        peer.role, peer.peer_id, peer.said_hello = msg.role, msg.peer_id, True
        log.info("hello from %s %s", msg.role, msg.peer_id)
        # A Hello starts a process; a restarted actor keeps its routing id, so without this its
        # heartbeats would keep renewing leases whose episodes died with the old process.
        released = self.leases.release(ident)
        self.evals.requeue(self.evals.book.release(ident))
        if released:
            log.info("requeued %d leases of restarted %s", len(released), msg.peer_id)
            self._spawn(self.store.kv_write([(f"lease/{a.lease_id}", None) for a in released]))
        if msg.role == "learner":
            step, version = (msg.capabilities.get(k, "0") for k in ("step", "policy_version"))
            self.learner_resumed(
                msg.peer_id,
                int(step) if step.isdigit() else 0,
                int(version) if version.isdigit() else 0,
            )
        p = self.policy
        welcome = P.Welcome(
            run_id=self.run_id,
            policy_version=self.policy_version,
            weights_endpoint=p.weights_endpoint if p else "",
            config_digest=self.cfg.digest(),
            manifest=p.manifest if p else None,
        )
        await self._send(ident, welcome)

    def _evict_for_retention(self, group_ids: set[str]) -> None:
        """Retention is about to delete unconsumed trajectories of these groups: take the
        groups out of replay and out of assembly first, counted as evicted ("retention")."""
        doomed = [item for item in self.table.items() if item.group_id in group_ids]
        for item in doomed:
            self.table.remove(item.key)  # the rows are deleted, not marked: no _retire
        # drop_abandoned with "now" = inf and idle 0 drops exactly the groups not kept here
        dropped = self.groups.drop_abandoned(math.inf, 0.0, lambda gid: gid not in group_ids)
        n = len(doomed) + len(dropped)
        if n:
            M.EVICTED.labels(reason="retention").inc(n)
            self.evicted["retention"] += n
            self._update_gauges()

    def _retire(self, removals: list[tuple[GroupItem, str]]) -> None:
        """Count evictions and record them durably so a restart does not resurrect them."""
        by_reason: dict[str, list[int]] = {}
        for item, reason in removals:
            M.EVICTED.labels(reason=reason).inc()
            self.evicted[reason] += 1
            by_reason.setdefault(reason, []).extend(item.seqs)
        for reason, seqs in by_reason.items():
            self._spawn(self.store.retire(seqs, reason))

    # ------------------------------------------------------------ curriculum

    async def _on_feedback(self, ident: bytes, peer: Peer, msg: P.TaskFeedback) -> None:
        bad = check_feedback(msg)
        if bad is None and not self._knows_task(msg.task_id):
            # Kept per task id (and saved): unknown ids would grow that without bound.
            bad = Invalid("feedback", f"{msg.task_id[:80]}: no such task in this bank")
        if bad is not None:  # never reaches the curator or its saved state
            M.TRAJ_REJECTED.labels(reason=bad.reason).inc()
            log.warning("refused feedback from %s: %s", peer.peer_id, bad.detail)
            await self._send(ident, P.Error(reason="invalid", detail=bad.detail[:300]))
            return
        self.curriculum.feedback(msg)
        self._spawn(self.store.kv_set(f"feedback/{msg.task_id}", P.encode(msg)))

    def _knows_task(self, task_id: str) -> bool:
        try:
            self.bank.task(task_id)
        except KeyError:
            return False
        return True

    # ------------------------------------------------------------ status

    async def _on_status(self, ident: bytes, peer: Peer, msg: P.Status) -> None:
        await self._send(ident, P.StatusReply(info=self.status()))

    def status(self) -> dict[str, object]:
        now = self.clock()

        def describe(p: Peer) -> dict[str, object]:
            return p.describe(now, self.leases.count_for(p.ident))

        peers = self.peers.values()
        return {
            "run_id": self.run_id,
            "protocol_version": P.PROTOCOL_VERSION,
            "config_digest": self.cfg.digest(),
            "durability": self.cfg.broker.durability,
            "policy_version": self.policy_version,
            "weights_endpoint": self.policy.weights_endpoint if self.policy else "",
            "stored_trajectories": self.store.stored,
            "replay_size": self.table.size,
            "replay_groups": len(self.table),
            "pending_groups": len(self.groups),
            "leases_active": len(self.leases),
            "leases_requeued": len(self.leases.requeued),
            "outstanding": self.outstanding(),
            "backpressure_bound": self.backpressure_bound(),
            "rate_limiter": self.table.rate_limiter.state(self.table.size),
            "sampler": self.table.sampler.state(),
            "evicted": dict(self.evicted),
            "learner_batches": self.batches.state(),
            "curriculum": self.curriculum.summary(),
            "evaluations": self.evals.status(),  # policy version -> tasks done / in the round
            "actors": [describe(p) for p in peers if p.role == "actor"],
            "learners": [describe(p) for p in peers if p.role == "learner"],
        }
