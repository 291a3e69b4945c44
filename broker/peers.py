"""Peers of the broker, known by ZMQ routing identity: who is there, what each role may send,
and which learner is the run's one learner.

A routing id is `<peer_id>/<nonce>` (shared/transport.py): one per process, kept across its
reconnects and the broker's restarts, never shown to other peers (Status shows peer ids). A
restarted process comes back under a new id; its Hello retires the old ones (`restarted`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shared import protocol as P
from shared.transport import peer_name

log = logging.getLogger("broker.server")

# The role of a peer that never said Hello (e.g. after a broker restart), from what it sends.
INFERRED_ROLE: dict[type, str] = {
    P.TaskRequest: "actor",
    P.Heartbeat: "actor",
    P.TrajectoryBatchFrames: "actor",
    P.SampleRequest: "learner",
    P.BatchTrained: "learner",
    P.Checkpointed: "learner",
    P.PolicyPublished: "learner",
    P.PriorityUpdate: "learner",
    P.TaskFeedback: "learner",
    P.EvalRequest: "learner",
    P.EvalOutcome: "actor",
    P.Status: "cli",
}


# What each role may send; the broker answers anything else with Error("forbidden"). Under
# CurveZMQ the role is the sender's key's (shared/security.py), otherwise what its Hello said
# (or INFERRED_ROLE): that only guards against mistakes, a plaintext peer can claim any role.
ALLOWED: dict[str, frozenset[type]] = {
    "actor": frozenset(
        {
            P.Hello,
            P.Heartbeat,
            P.TaskRequest,
            P.TrajectoryBatchFrames,
            P.EvalOutcome,
            P.Status,
            P.Error,
        }
    ),
    "learner": frozenset(
        {
            P.Hello,
            P.Heartbeat,
            P.SampleRequest,
            P.BatchTrained,
            P.Checkpointed,
            P.PolicyPublished,
            P.PriorityUpdate,
            P.TaskFeedback,
            P.EvalRequest,
            P.Status,
            P.Error,
        }
    ),
    "cli": frozenset({P.Hello, P.Status, P.Error}),
}


def forbidden(role: str | None, msg: P.Base, key_role: bool) -> str | None:
    """Why a peer of `role` may not send `msg` (None: it may). `key_role`: the role is the
    sender's key's, so a Hello claiming another one is refused too."""
    if role is None:
        return "its key names no role"
    if type(msg) not in ALLOWED.get(role, ()):
        return f"role {role} may not send {type(msg).__name__}"
    if key_role and isinstance(msg, P.Hello) and msg.role != role:
        return f"a key of role {role} may not say Hello as {msg.role}"
    return None


def may_not_send(peer: Peer, msg: P.Base, keyed: bool) -> str | None:
    """Why `peer` may not send `msg` (None: it may). `keyed`: under curve, where its role is
    its key's; in plaintext it is the role its Hello claimed (no claim, no check)."""
    if not (keyed or peer.said_hello):
        return None
    return forbidden(peer.role if peer.role != "unknown" else None, msg, keyed)


@dataclass(slots=True)
class Peer:
    ident: bytes  # ZMQ routing id: stable across reconnects and broker restarts, never shown
    peer_id: str  # what Status shows: its Hello's or heartbeats' peer id, else `peer_name`
    role: str = "unknown"  # from Hello, or inferred from what the peer sends
    said_hello: bool = False  # its role is what its Hello claimed (what plaintext checks)
    last_seen: float = 0.0  # clock of the last message of any kind
    last_heartbeat: float | None = None
    episodes: int = 0  # new trajectories stored from this peer
    stats: dict[str, float] = field(default_factory=dict)
    key: str = ""  # under curve: the allow-list name of its key (what it cannot make up)

    def describe(self, now: float, leases: int) -> dict[str, object]:
        hb = None if self.last_heartbeat is None else round(now - self.last_heartbeat, 3)
        return {
            "id": self.peer_id,
            **({"key": self.key} if self.key else {}),
            "last_seen_age_s": round(now - self.last_seen, 3),
            "last_heartbeat_age_s": hb,
            "episodes": self.episodes,
            "leases": leases,
            "stats": self.stats,
        }


# What only the active learner may send (one learner per run: see `LearnerFence`): the
# learner's messages that other roles may not send either.
LEARNER_MESSAGES = tuple(ALLOWED["learner"] - ALLOWED["actor"] - ALLOWED["cli"])


class LearnerFence:
    """One learner per run, so the policy lineage never alternates between two learners.

    The first learner to speak becomes the active one. A second learner's Hello is refused
    while the active one is alive (heard from within `heartbeat_timeout_s`; the learner
    heartbeats while it trains); once it is silent that long, a new learner's Hello takes
    over and the old one is fenced off: everything it sends is refused."""

    def __init__(
        self,
        peers: dict[bytes, Peer],
        heartbeat_timeout_s: float,
        clock: Callable[[], float],
        restart_of: Callable[[bytes, bytes], bool] = lambda old, new: False,
    ) -> None:
        """`restart_of(old, new)`: routing id `new` is a restart of the peer that had `old`
        (same peer id; under curve, same key): its Hello takes over at once."""
        self.peers = peers
        self.restart_of = restart_of
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.ident: bytes | None = None  # the active learner's routing id
        self.epoch = 0  # how many learners have been active (a fencing token)

    def refusal(self, ident: bytes, msg: P.Base) -> str | None:
        """Why a learner's message is refused: another learner is the active one."""
        learnerish = isinstance(msg, P.Hello) and msg.role == "learner"
        if not learnerish and not isinstance(msg, LEARNER_MESSAGES):
            return None
        holder = self.ident
        if holder is None or holder == ident:
            self._activate(ident)
            return None
        if not learnerish:
            return "fenced: another learner is the active one (this one was replaced)"
        if self.restart_of(holder, ident):  # the active learner, restarted (a new routing id)
            self._activate(ident)
            return None
        active = self.peers.get(holder)
        silent = self.clock() - active.last_seen if active is not None else math.inf
        if silent <= self.heartbeat_timeout_s:
            name = active.peer_id if active is not None else "?"
            return f"learner {name} is active (heard {silent:.0f}s ago): one learner per run"
        self._activate(ident)
        return None

    def _activate(self, ident: bytes) -> None:
        if self.ident != ident:
            self.ident = ident
            self.epoch += 1
            name = peer_name(ident)
            log.info("learner %s is the active learner (epoch %d)", name, self.epoch)


PEER_FORGET_AFTER_S = 3600.0  # peers silent this long leave Status and the relay list


class Peers(dict[bytes, Peer]):
    """Every peer heard from, by routing id; unknown ones are fine (after a broker restart
    nobody says Hello again), their role then inferred from what they send."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock

    def heard(self, ident: bytes, msg: P.Base, key_role: str | None) -> Peer:
        """The sender of `msg`, seen now. `key_role`: under curve, its key's role ("" for a
        key that names none); None in plaintext."""
        peer = self.get(ident)
        if peer is None:
            peer = self[ident] = Peer(ident, peer_name(ident))  # the nonce is never shown
        peer.last_seen = self.clock()
        if key_role is not None:
            peer.role = key_role or "unknown"
        elif peer.role == "unknown":
            peer.role = INFERRED_ROLE.get(type(msg), "unknown")
        return peer

    def forget_silent(self, keep: Callable[[bytes], bool]) -> list[bytes]:
        """Forget long-gone peers (every `headrace status` call is a new one), but `keep`
        those it names (e.g. lease holders); returns the routing ids forgotten."""
        forget = self.clock() - PEER_FORGET_AFTER_S
        gone = [i for i, p in self.items() if p.last_seen < forget and not keep(i)]
        for ident in gone:
            del self[ident]
        return gone

    def restarted(
        self, ident: bytes, holders: Iterable[bytes], same_key: Callable[[bytes, bytes], bool]
    ) -> list[bytes]:
        """The routing ids a Hello from `ident` retires: the other ids of its peer id (known
        here or holding leases, `holders`: after a broker restart lease holders may not have
        been heard from yet) that `same_key` says are the same peer's."""
        name = peer_name(ident)
        return [
            old
            for old in dict.fromkeys([*self, *holders])
            if old != ident and peer_name(old) == name and same_key(old, ident)
        ]

    def connected(self, role: str, within_s: float) -> list[Peer]:
        now = self.clock()
        return [p for p in self.values() if p.role == role and now - p.last_seen <= within_s]
