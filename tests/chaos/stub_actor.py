"""A vLLM-free actor whose trajectories a learner can train on.

`python -m tests.chaos.stub_actor --broker tcp://HOST:PORT --acked FILE [--group-delay-s S]`

Like `tests.synthetic_actor` it talks to the broker through the real `shared.transport.Client`
and the real `actor.outbox.Outbox` (every trajectory kept until acked, resent after
`--resend-s`, every acked traj_id appended to `--acked`), but its trajectories are trainable:
token ids inside the tiny model's vocabulary, stamped with the newest policy version it has
heard of (Welcome, then the broker's PolicyPublished relays), so the broker's staleness remover
treats them like a real actor's. `--group-delay-s` stands in for generation time.

SIGTERM / SIGINT: take no more leases, drain the outbox, exit 0 (3 if it could not be drained).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from shared import protocol as P
from shared.transport import Client
from tests.synthetic_actor import LoggingOutbox

log = logging.getLogger("stub_actor")


class PolicyTracker:
    """The newest policy version announced to this actor (never goes back)."""

    def __init__(self) -> None:
        self.version = 0

    def see(self, version: int) -> None:
        self.version = max(self.version, version)

    def on_policy(self, msg: P.PolicyPublished) -> None:
        self.see(msg.version)


def make_trajectory(
    lease: P.Lease, k: int, actor_id: str, n_tokens: int, version: int, vocab: int
) -> P.Trajectory:
    """Trajectory `k` of `lease`'s group: a prompt, then alternating reasoning/action tokens."""
    n = n_tokens
    p = max(1, n // 4)
    roles = [P.Role.PROMPT] * p + [P.Role.REASONING, P.Role.ACTION] * ((n - p + 1) // 2)
    reward = float(k % 2)
    return P.Trajectory(
        traj_id=f"{lease.lease_id}-{k}",
        group_id=lease.lease_id,
        task_id=lease.task.task_id,
        env=lease.task.env,
        actor_id=actor_id,
        lease_id=lease.lease_id,
        token_ids=P.pack([4 + (i * 31 + k * 7) % (vocab - 4) for i in range(n)], "token_ids"),
        role=P.pack(roles[:n], "role"),
        loss_mask=P.pack([0] * p + [1] * (n - p), "loss_mask"),
        behav_logprob=P.pack([-5.0] * n, "behav_logprob"),
        policy_version=P.pack([version] * n, "policy_version"),
        turn_idx=P.pack([0] * n, "turn_idx"),
        turns=[P.TurnInfo(reward=reward, done=True, truncated=False, action_valid=True)],
        outcome_reward=reward,
        success=reward > 0,
        termination=P.Termination.DONE,
        n_turns=1,
        sampling={"temperature": 1.0},
        timings={"generate_s": 0.0},
    )


async def heartbeats(client: Client, peer_id: str) -> None:
    while True:
        await client.send(P.Heartbeat(peer_id=peer_id))
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = Client(args.broker, args.peer_id)
    policy = PolicyTracker()
    client.on(P.PolicyPublished, policy.on_policy)
    with open(args.acked, "a") as acked:  # noqa: ASYNC230 - tiny appends, flushed per Ack
        outbox = LoggingOutbox(client, acked, batch=8, flush_s=0.05, resend_s=args.resend_s)
        client.start()
        hello = P.Hello(role="actor", peer_id=args.peer_id, protocol_version=P.PROTOCOL_VERSION)
        welcome = await client.request(hello, P.Welcome, timeout=2.0, retries=30)
        policy.see(welcome.policy_version)
        tasks = [loop.create_task(outbox.run()), loop.create_task(heartbeats(client, args.peer_id))]
        groups = 0
        while not stop.is_set():
            if len(outbox) >= args.max_outbox:
                await asyncio.sleep(0.02)
                continue
            # Like the real actor: a late TaskGrant is used too (`client.request` would drop
            # it, and the broker would renew its leases with our heartbeats for ever).
            try:  # a late grant already here goes first
                grant = await client.recv(P.TaskGrant, timeout=0.01)
            except TimeoutError:
                await client.send(P.TaskRequest(n=1))
                try:
                    grant = await client.recv(P.TaskGrant, timeout=1.0)
                except TimeoutError:  # broker down or restarting: ZMQ reconnects, ask again
                    continue
            if not grant.leases:
                await asyncio.sleep(grant.retry_after_s or 0.05)
                continue
            for lease in grant.leases:
                if args.group_delay_s:
                    await asyncio.sleep(args.group_delay_s)
                for k in range(lease.group_size):
                    traj = make_trajectory(
                        lease, k, args.peer_id, args.n_tokens, policy.version, args.vocab
                    )
                    outbox.put(traj)
                groups += 1
        drained = await outbox.drain(timeout=args.drain_s)
        for t in tasks:
            t.cancel()
        client.close()
    log.info("%s: %d groups, outbox %s", args.peer_id, groups, "drained" if drained else "NOT")
    return 0 if drained else 3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stub_actor", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--peer-id", default=f"stub-actor-{os.getpid()}")
    ap.add_argument("--acked", required=True, help="file to append acked traj_ids to")
    ap.add_argument("--n-tokens", type=int, default=48)
    ap.add_argument("--vocab", type=int, default=256, help="token ids stay below this")
    ap.add_argument("--group-delay-s", type=float, default=0.2, help="'generation' time a group")
    ap.add_argument("--max-outbox", type=int, default=32)
    ap.add_argument("--resend-s", type=float, default=1.0)
    ap.add_argument("--drain-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
