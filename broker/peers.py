"""Peers of the broker, known by ZMQ routing identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared import protocol as P

# The role of a peer that never said Hello (e.g. after a broker restart), from what it sends.
INFERRED_ROLE: dict[type, str] = {
    P.TaskRequest: "actor",
    P.TrajectoryBatchFrames: "actor",
    P.SampleRequest: "learner",
    P.BatchTrained: "learner",
    P.Checkpointed: "learner",
    P.PolicyPublished: "learner",
    P.PriorityUpdate: "learner",
    P.TaskFeedback: "learner",
    P.Status: "cli",
}


@dataclass(slots=True)
class Peer:
    ident: bytes  # ZMQ routing id: stable across reconnects and broker restarts
    peer_id: str
    role: str = "unknown"  # from Hello, or inferred from what the peer sends
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
