"""Peers of the broker, known by ZMQ routing identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared import protocol as P

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


@dataclass(slots=True)
class Peer:
    ident: bytes  # ZMQ routing id: stable across reconnects and broker restarts
    peer_id: str
    role: str = "unknown"  # from Hello, or inferred from what the peer sends
    said_hello: bool = False  # its role is what its Hello claimed (what plaintext checks)
    last_seen: float = 0.0  # clock of the last message of any kind
    last_heartbeat: float | None = None
    episodes: int = 0  # new trajectories stored from this peer
    stats: dict[str, float] = field(default_factory=dict)

    def describe(self, now: float, leases: int) -> dict[str, object]:
        hb = None if self.last_heartbeat is None else round(now - self.last_heartbeat, 3)
        return {
            "id": self.peer_id,
            "last_seen_age_s": round(now - self.last_seen, 3),
            "last_heartbeat_age_s": hb,
            "episodes": self.episodes,
            "leases": leases,
            "stats": self.stats,
        }
