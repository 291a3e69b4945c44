"""Relay: the learner's policies out to the actors, and its evaluation rounds in.

The broker is the one place every actor hears a new policy from: it keeps the newest
publication (so every Welcome carries it), saves it, and forwards it to the actors heard
from recently. A publication's version must be plausible, so a forged one cannot lock the
real learner out or evict the whole replay as stale.
"""

from __future__ import annotations

import logging

from broker import metrics as M
from broker.parts import Books, Wiring
from broker.peers import Peer, Peers
from shared import protocol as P
from shared.metrics import REJECTED_FRAMES

log = logging.getLogger("broker.server")

# A policy version more than this beyond both the newest one and the version the learner's
# Hello announced is implausible (a learner moves by `publish_every` per publish): refused,
# so a forged huge version cannot lock the real learner out. Versions are int32 on the wire.
MAX_POLICY_JUMP = 1000
MAX_POLICY_VERSION = 2**31 - 1
MAX_EVAL_TASKS = 4096  # held-out tasks per family in one evaluation round
MAX_EVAL_SAMPLES = 256  # episodes per held-out task


class Relay:
    def __init__(
        self,
        books: Books,
        peers: Peers,
        horizon_s: float,
        io: Wiring,
    ) -> None:
        """`horizon_s`: actors silent longer than this are not sent publications."""
        self.store, self.evals, self.peers = books.store, books.evals, peers
        self.horizon_s = horizon_s
        self.io = io
        self.policy: P.PolicyPublished | None = None
        self.learner_announced = 0  # the policy version the learner's Hello announced

    @property
    def version(self) -> int:
        return self.policy.version if self.policy else 0

    def restore(self, policy: P.PolicyPublished) -> None:
        """The publication saved before a restart."""
        self.policy = policy
        M.POLICY_VERSION.set(policy.version)

    def learner_said_hello(self, version: int) -> None:
        self.learner_announced = min(version, MAX_POLICY_VERSION)

    def refusal(self, msg: P.PolicyPublished) -> str | None:
        """Why a publication is refused as implausible (None: it is not)."""
        current = self.version
        bound = min(MAX_POLICY_VERSION, max(current, self.learner_announced) + MAX_POLICY_JUMP)
        if 0 <= msg.version <= bound:
            return None
        return f"policy v{msg.version} is implausible (newest v{current}, at most v{bound})"

    async def on_policy(self, ident: bytes, peer: Peer, msg: P.PolicyPublished) -> None:
        detail = self.refusal(msg)
        if detail is not None:
            REJECTED_FRAMES.labels(reason="implausible_version").inc()
            log.warning("refused from %s: %s", peer.peer_id, detail)
            await self.io.send(ident, P.Error(reason="invalid", detail=detail))
            return
        if self.policy is not None and msg.version < self.policy.version:
            log.warning("ignoring policy v%d: v%d is newer", msg.version, self.policy.version)
            return
        self.policy = msg  # in memory first, so every Welcome from now on carries it
        M.POLICY_VERSION.set(msg.version)
        # Saved in the background: waiting for the store here would delay every actor's next
        # weights by a commit (more staleness). A broker that crashes before the save knows
        # one version less than its actors may run: intake's `limits` allows for that one.
        self.io.spawn(self.store.kv_set("policy", P.encode(msg)))
        actors = self.recipients()
        for p in actors:
            await self.io.send(p.ident, msg)
        log.info("policy v%d published; relayed to %d actors", msg.version, len(actors))

    def recipients(self) -> list[Peer]:
        return self.peers.connected("actor", self.horizon_s)

    async def on_eval_request(self, ident: bytes, peer: Peer, msg: P.EvalRequest) -> None:
        if not (0 <= msg.version <= MAX_POLICY_VERSION and 0 <= msg.tasks <= MAX_EVAL_TASKS):
            detail = f"eval request v{msg.version} for {msg.tasks} tasks per family"
        elif not 1 <= msg.samples <= MAX_EVAL_SAMPLES:
            detail = f"eval request with {msg.samples} samples per task"
        else:
            await self.io.send(ident, self.evals.request(msg))
            return
        REJECTED_FRAMES.labels(reason="invalid").inc()
        await self.io.send(ident, P.Error(reason="invalid", detail=detail))
