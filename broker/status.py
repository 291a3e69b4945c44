"""What the broker reports of itself: the `Status` reply (`headrace status`) and its gauges.

Peers are shown by peer id (`Peer.describe`), never by routing id: a routing id's nonce is
what keeps other peers from taking it over (shared/transport.py), and any peer may ask."""

from __future__ import annotations

from broker import metrics as M
from broker.admission import Admission
from broker.parts import Books
from broker.peers import Peer, Peers
from broker.relay import Relay
from shared import protocol as P
from shared.config import Config


def report(
    cfg: Config,
    run_id: str,
    books: Books,
    peers: Peers,
    relay: Relay,
    admission: Admission,
    now: float,
    active_learner: bytes | None = None,
) -> dict[str, object]:
    """`active_learner`: the routing id of the run's one learner (`LearnerFence`); other
    learners are listed with `active` false (a restarted or rival one, refused)."""
    p = relay.policy

    def describe(peer: Peer) -> dict[str, object]:
        return peer.describe(now, books.leases.count_for(peer.ident))

    known = peers.values()
    return {
        "run_id": run_id,
        "protocol_version": P.PROTOCOL_VERSION,
        "config_digest": cfg.digest(),
        "durability": cfg.broker.durability,
        "policy_version": relay.version,
        "weights_endpoint": p.weights_endpoint if p else "",
        "stored_trajectories": books.store.stored,
        "replay_size": books.table.size,
        "replay_groups": len(books.table),
        "pending_groups": len(books.groups),
        "leases_active": len(books.leases),
        "leases_requeued": len(books.leases.requeued),
        "outstanding": admission.outstanding(),
        "backpressure_bound": admission.backpressure_bound(),
        "rate_limiter": books.table.rate_limiter.state(books.table.size),
        "sampler": books.table.sampler.state(),
        "evicted": dict(books.retirement.counts),
        "learner_batches": books.batches.state(),
        "curriculum": books.curriculum.summary(),
        "evaluations": books.evals.status(),  # policy version -> tasks done / in the round
        "actors": [describe(x) for x in known if x.role == "actor"],
        "learners": [
            {**describe(x), "active": x.ident == active_learner}
            for x in known
            if x.role == "learner"
        ],
    }


def refresh_gauges(books: Books, peers: Peers, heartbeat_timeout_s: float) -> None:
    table = books.table
    M.REPLAY_SIZE.set(table.size)
    M.REPLAY_GROUPS.set(len(table))
    M.PENDING_GROUPS.set(len(books.groups))
    M.LEASES_ACTIVE.set(len(books.leases))
    M.RATE_LIMITER_INSERTS.set(table.rate_limiter.inserts)
    M.RATE_LIMITER_SAMPLES.set(table.rate_limiter.samples)
    M.ACTORS_CONNECTED.set(len(peers.connected("actor", heartbeat_timeout_s)))
