"""A stand-in actor without vLLM: `python -m tests.synthetic_actor --broker tcp://... --acked FILE`.

It speaks to the broker exactly as the real actor's broker side does - `shared.transport.Client`
for Hello / leases / heartbeats and the real `actor.outbox.Outbox`, which keeps every trajectory
until it is acked and resends after `--resend-s` - but fills each lease's group with synthetic
trajectories at once instead of running episodes. Every acked traj_id is appended to `--acked`
(flushed per Ack), so a test can compare what the broker promised with what it stored.

SIGTERM or SIGINT: stop taking leases, wait until the outbox is empty (everything acked), exit 0
(3 if the outbox could not be drained in time).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from prometheus_client import REGISTRY

from actor.outbox import Outbox
from shared import protocol as P
from shared.transport import Client, PeerUnreachable

log = logging.getLogger("synthetic_actor")


class LoggingOutbox(Outbox):
    """The real outbox; every Ack is also written to a file (append + flush per Ack)."""

    def __init__(self, client: Client, log_file: TextIO, **kw: float) -> None:
        super().__init__(client, **kw)  # type: ignore[arg-type]
        self.log_file = log_file

    def _on_ack(self, ack: P.Ack) -> None:
        super()._on_ack(ack)
        self.log_file.write("".join(f"{tid}\n" for tid in ack.traj_ids))
        self.log_file.flush()


def make_trajectory(
    lease: P.Lease, k: int, actor_id: str, n_tokens: int, n_prompt: int = 16
) -> P.Trajectory:
    """Trajectory `k` of `lease`'s group; every per-token array filled, deterministic."""
    n, p = n_tokens, min(n_prompt, n_tokens - 1)
    roles = [P.Role.PROMPT] * p + [P.Role.REASONING, P.Role.ACTION] * ((n - p + 1) // 2)
    return P.Trajectory(
        traj_id=f"{lease.lease_id}-{k}",
        group_id=lease.lease_id,
        task_id=lease.task.task_id,
        env=lease.task.env,
        actor_id=actor_id,
        lease_id=lease.lease_id,
        # inside the tiny model's vocabulary: the broker refuses ids it does not have
        token_ids=P.pack([(i * 7919 + k) % 256 for i in range(n)], "token_ids"),
        role=P.pack(roles[:n], "role"),
        loss_mask=P.pack([0] * p + [1] * (n - p), "loss_mask"),
        behav_logprob=P.pack([-0.01 * (i % 100) for i in range(n)], "behav_logprob"),
        policy_version=P.pack([0] * n, "policy_version"),
        turn_idx=P.pack([i * 4 // n for i in range(n)], "turn_idx"),
        turns=[
            P.TurnInfo(reward=0.25 * t, done=t == 3, truncated=False, action_valid=True)
            for t in range(4)
        ],
        outcome_reward=float(k % 2),
        success=k % 2 == 1,
        termination=P.Termination.DONE,
        n_turns=4,
        sampling={"temperature": 1.0},
        timings={"generate_s": 0.1},
    )


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = Client(args.broker, args.peer_id)
    with open(args.acked, "a") as acked:  # noqa: ASYNC230 - tiny appends, flushed per Ack
        outbox = LoggingOutbox(
            client, acked, batch=args.batch, flush_s=0.05, resend_s=args.resend_s
        )
        client.start()
        hello = P.Hello(role="actor", peer_id=args.peer_id, protocol_version=P.PROTOCOL_VERSION)
        await client.request(hello, P.Welcome, timeout=2.0, retries=15)
        tasks = [loop.create_task(outbox.run()), loop.create_task(heartbeats(client, args))]
        groups = 0
        while not stop.is_set() and (not args.max_groups or groups < args.max_groups):
            if len(outbox) >= args.max_outbox:  # like a real actor: bounded episodes in flight
                await asyncio.sleep(0.01)
                continue
            try:
                grant = await client.request(
                    P.TaskRequest(n=args.leases), P.TaskGrant, timeout=1.0, retries=0
                )
            except PeerUnreachable:  # broker down or restarting: ZMQ reconnects, we ask again
                continue
            if not grant.leases:
                await asyncio.sleep(grant.retry_after_s or 0.05)
                continue
            for lease in grant.leases:
                for k in range(lease.group_size):
                    outbox.put(make_trajectory(lease, k, args.peer_id, args.n_tokens))
                groups += 1
        drained = await outbox.drain(timeout=args.drain_s)
        for t in tasks:
            t.cancel()
        client.close()
    log.info(
        "%s: %d groups, %d trajectories resent, outbox %s",
        args.peer_id,
        groups,
        REGISTRY.get_sample_value("headrace_actor_outbox_resent_total") or 0,
        "drained" if drained else "NOT drained",
    )
    return 0 if drained else 3


async def heartbeats(client: Client, args: argparse.Namespace) -> None:
    while True:
        await client.send(P.Heartbeat(peer_id=args.peer_id))
        await asyncio.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="synthetic_actor", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--peer-id", default="synthetic-actor")
    ap.add_argument("--acked", required=True, help="file to append acked traj_ids to")
    ap.add_argument("--n-tokens", type=int, default=256)
    ap.add_argument("--leases", type=int, default=2, help="leases asked for per TaskRequest")
    ap.add_argument("--batch", type=int, default=8, help="outbox batch (trajectories)")
    ap.add_argument("--max-outbox", type=int, default=64)
    ap.add_argument("--resend-s", type=float, default=1.0)
    ap.add_argument("--drain-s", type=float, default=30.0)
    ap.add_argument("--max-groups", type=int, default=0, help="stop after this many (0: never)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
