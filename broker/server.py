"""The broker's asyncio ROUTER loop: each message routed to the part that owns its job.

  admission.Admission  leases out (backpressure, rate limiter), heartbeats, task feedback
  intake.Ingest        trajectories in (screened, stored, acked, grouped), eval scores in
  sampling.Sampling    batches out to the learner exactly once, priorities in
  relay.Relay          policies out to the actors, evaluation rounds requested
  peers.LearnerFence   one learner per run

This module builds them, restores their state from the store (broker/restore.py), routes,
answers Hello and Status, and reaps. One event loop owns every in-memory structure (peers,
leases, pending groups, replay table), so no locks are needed; the only awaits that take time
(store commits and claims) run in spawned tasks, so a slow disk never stalls heartbeats, task
requests or status replies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from broker.admission import Admission
from broker.curriculum.service import STATE_KEY as CURRICULUM_STATE_KEY
from broker.intake import Ingest, model_vocab_size
from broker.parts import Wiring, build_books
from broker.peers import LearnerFence, Peer, Peers, may_not_send
from broker.relay import Relay
from broker.restore import restore
from broker.retention import Retention
from broker.sampling import Sampling
from broker.status import refresh_gauges, report
from broker.store import Store
from shared import protocol as P
from shared.config import Config
from shared.handshake import run_digest
from shared.metrics import REJECTED_FRAMES
from shared.security import server_keys
from shared.transport import Server, peer_name

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Peer, Any], Coroutine[Any, Any, None]]
# Frames routed per wake-up of the loop at most, before the tasks they started get a turn:
# enough to fold a burst of batches into one commit, few enough to ack while more arrive.
DRAIN_LIMIT = 16
GAUGES_EVERY_S = 0.1  # the gauges trail a change by this much at most


class Broker:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        b = cfg.broker
        self.store = Store(
            None if b.durability == "none" else b.data_dir, commit_interval_s=b.commit_interval_s
        )
        self.books = books = build_books(cfg, self.store, self._spawn, clock)
        # the parts' shared state, by the names tests and tools read
        self.table, self.leases, self.bank = books.table, books.leases, books.bank
        self.curriculum = books.curriculum
        self.peers = Peers(clock)
        self.run_id = ""
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._gauge_timer: asyncio.TimerHandle | None = None
        io = Wiring(self._send, self._spawn, self._gauges_soon)
        self.fence = LearnerFence(self.peers, b.heartbeat_timeout_s, clock, self._restart_of)
        self.relay = Relay(books, self.peers, 10 * b.heartbeat_timeout_s, io)
        self.sampling = Sampling(cfg, books, lambda: self.relay.version, io)
        self.admission = Admission(b, books, lambda: self.sampling.learner_batch, io)
        vocab = model_vocab_size(cfg.model.path)
        self.ingest = Ingest(cfg, books, lambda: self.relay.policy, vocab, clock, io)
        self.retention = Retention(
            self.store,
            b.retention,
            b.max_times_sampled,
            on_evict=self.ingest.evict_for_retention,
            keep_from=books.batches.oldest_seq,
        )
        self._handlers: dict[type, Handler] = {
            P.Hello: self._on_hello,
            P.Heartbeat: self.admission.on_heartbeat,
            P.TaskRequest: self.admission.on_task_request,
            P.TaskFeedback: self.admission.on_feedback,
            P.TrajectoryBatchFrames: self.ingest.on_trajectories,
            P.EvalOutcome: self.ingest.on_eval_outcome,
            P.SampleRequest: self.sampling.on_sample,
            P.BatchTrained: self.sampling.on_batch_trained,
            P.Checkpointed: self.sampling.on_checkpointed,
            P.PriorityUpdate: self.sampling.on_priorities,
            P.PolicyPublished: self.relay.on_policy,
            P.EvalRequest: self.relay.on_eval_request,
            P.Status: self._on_status,
        }

    @property
    def policy_version(self) -> int:
        return self.relay.version

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
            self.ingest.vocab_size or "unknown: token ids checked for >= 0 only",
        )
        return self.server.endpoint

    async def stop(self) -> None:
        """Stop serving, let in-flight commits finish (and be acked), flush and close."""
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
            self._gauge_timer = None
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
        max_sampled = self.cfg.broker.max_times_sampled
        self.run_id = await restore(self.books, self.relay, self.ingest, max_sampled, self.clock())
        self._update_gauges()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("broker task failed", exc_info=task.exception())

    # ------------------------------------------------------------ the loop

    async def _serve(self) -> None:
        assert self.server is not None
        while True:
            # Every frame ready at this wake-up (DRAIN_LIMIT at most), routed in order; the
            # trajectory batches among them share one store put (broker/intake.py), whose task
            # gets its turn here: a socket that never runs dry does not hold back commits and
            # acks (awaiting a frame that is already there does not yield to other tasks).
            for ident, msg in await self.server.recv_ready(DRAIN_LIMIT):
                await self._route(ident, msg)
            if self.ingest.arrived:
                await asyncio.sleep(0)

    async def _route(self, ident: bytes, msg: Any) -> None:
        assert self.server is not None
        keyed = self.server.roles is not None  # under curve: a peer's role is its key's
        peer = self.peers.heard(ident, msg, (self.server.role_of(ident) or "") if keyed else None)
        if keyed:  # Status names the key: a peer id is whatever the peer says it is
            peer.key = self.server.key_name(ident)
        why = may_not_send(peer, msg, keyed) or self.fence.refusal(ident, msg)
        if why is not None and type(msg) in self._handlers:
            REJECTED_FRAMES.labels(reason="forbidden").inc()
            log.warning("refused %s from %s: %s", type(msg).__name__, peer.peer_id, why)
            await self._send(ident, P.Error(reason="forbidden", detail=why))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            if not isinstance(msg, P.Error):  # never answer an Error with an Error
                REJECTED_FRAMES.labels(reason="unexpected").inc()
                detail = f"the broker does not accept {type(msg).__name__}"
                await self._send(ident, P.Error(reason="unexpected", detail=detail))
            else:
                log.warning("peer %s sent error %s: %s", peer.peer_id, msg.reason, msg.detail)
            return
        try:
            await handler(ident, peer, msg)
        except Exception as e:  # a bug in one handler must not take the broker down
            log.exception("handling %s from %s", type(msg).__name__, peer.peer_id)
            await self._send(ident, P.Error(reason="internal", detail=repr(e)[:300]))

    async def _send(self, ident: bytes, msg: P.Base) -> None:
        assert self.server is not None
        await self.server.send(ident, msg)

    async def _reap(self) -> None:
        """Expire leases of silent actors, drop abandoned partial groups, refresh gauges."""
        tick = min(1.0, max(0.05, self.cfg.broker.heartbeat_timeout_s / 4))
        while True:
            await asyncio.sleep(tick)
            self.reap()

    def _save_curriculum(self) -> None:
        state = self.curriculum.state_if_changed()
        if state is not None:
            self._spawn(self.store.kv_set(CURRICULUM_STATE_KEY, state))

    def reap(self) -> None:
        self._save_curriculum()
        self.curriculum.refresh_metrics()

        def last_seen(ident: bytes) -> float | None:
            return self.peers[ident].last_seen if ident in self.peers else None

        self.admission.expire(last_seen)
        now = self.clock()
        self.ingest.drop_abandoned(now)
        for ident in self.peers.forget_silent(self.admission.holds_any):  # holders stay
            if self.server is not None:
                self.server.forget(ident)
        self._update_gauges()

    def _update_gauges(self) -> None:
        refresh_gauges(self.books, self.peers, self.cfg.broker.heartbeat_timeout_s)

    def _gauges_soon(self) -> None:
        """Sizes changed: refresh the gauges once within GAUGES_EVERY_S, however many
        changes (every acked batch is one) come meanwhile."""
        if self._gauge_timer is None:
            loop = asyncio.get_running_loop()
            self._gauge_timer = loop.call_later(GAUGES_EVERY_S, self._gauges_now)

    def _gauges_now(self) -> None:
        self._gauge_timer = None
        self._update_gauges()

    # ------------------------------------------------------------ hello, status

    async def _on_hello(self, ident: bytes, peer: Peer, msg: P.Hello) -> None:
        """A Hello starts a process. Its routing id is new (shared/transport.py), so the
        peer's other ids are its previous processes': their leases are requeued at once
        (their episodes died with them; trajectories already made are still taken) and they
        leave the peer list (no ghosts in Status, no policies relayed to them)."""
        peer.role, peer.peer_id, peer.said_hello = msg.role, msg.peer_id, True
        log.info("hello from %s %s", msg.role, msg.peer_id)
        holders = {a.peer for a in self.leases.active.values()}
        holders.update(a.peer for a in self.books.evals.book.active.values())
        for old in self.peers.restarted(ident, holders, self._same_key):
            self.admission.release(old, msg.peer_id)
            self.peers.pop(old, None)
            if self.server is not None:
                self.server.forget(old)
        self.admission.release(ident, msg.peer_id)  # the same Client saying Hello again
        if msg.role == "learner":
            step, version = (msg.capabilities.get(k, "0") for k in ("step", "policy_version"))
            self.relay.learner_said_hello(int(version) if version.isdigit() else 0)
            self.sampling.learner_resumed(msg.peer_id, int(step) if step.isdigit() else 0)
        p = self.relay.policy
        welcome = P.Welcome(
            run_id=self.run_id,
            policy_version=self.policy_version,
            weights_endpoint=p.weights_endpoint if p else "",
            config_digest=run_digest(self.cfg),
            manifest=p.manifest if p else None,
            group_size=self.cfg.broker.group_size,
        )
        await self._send(ident, welcome)

    def _same_key(self, old: bytes, new: bytes) -> bool:
        """Whether routing ids `old` and `new` may be the same peer's as far as keys tell:
        always in plaintext; under curve, when `old`'s key is `new`'s, or unknown (a lease
        holder not heard from since this broker started: requeuing its leases costs episodes
        at worst, and diverts nothing)."""
        if self.server is None or self.server.roles is None:
            return True
        key = self.server.key_of(old)
        return key is None or key == self.server.key_of(new)

    def _restart_of(self, old: bytes, new: bytes) -> bool:
        """Routing id `new` is the restart of `old`'s peer: the same peer id and the same,
        known key (the active learner's takeover: never on a key merely unknown)."""
        if peer_name(old) != peer_name(new):
            return False
        if self.server is None or self.server.roles is None:
            return True
        key = self.server.key_of(old)
        return key is not None and key == self.server.key_of(new)

    async def _on_status(self, ident: bytes, peer: Peer, msg: P.Status) -> None:
        if self._gauge_timer is not None:  # a change waits for the timer: the gauges agree now
            self._gauge_timer.cancel()
            self._gauges_now()
        await self._send(ident, P.StatusReply(info=self.status()))

    def status(self) -> dict[str, object]:
        return report(
            self.cfg,
            self.run_id,
            self.books,
            self.peers,
            self.relay,
            self.admission,
            self.clock(),
            self.fence.ident,
        )
