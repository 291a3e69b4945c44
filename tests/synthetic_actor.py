"""A stand-in actor without vLLM: `python -m tests.synthetic_actor --broker tcp://... --acked FILE`.

It speaks to the broker exactly as the real actor's broker side does - `shared.transport.Client`
for Hello / leases / heartbeats and the real `actor.outbox.Outbox`, which keeps every trajectory
until it is acked and resends after `--resend-s` - but fills each lease's group with synthetic
trajectories (shared/synthetic.py) instead of running episodes. They are trainable: token ids
inside the tiny model's vocabulary, stamped with the newest policy version this actor has heard
of (Welcome, then the broker's PolicyPublished relays), so the broker's staleness remover treats
them like a real actor's. `--group-delay-s` stands in for generation time. Every acked traj_id
is appended to `--acked` (flushed per Ack), so a test can compare what the broker promised with
what it stored.

SIGTERM or SIGINT: stop taking leases, wait until the outbox is empty (everything acked), exit 0
(3 if the outbox could not be drained in time).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from prometheus_client import REGISTRY

from actor.outbox import Outbox
from shared import protocol as P
from shared import synthetic
from shared.transport import Client

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


class PolicyTracker:
    """The newest policy version announced to this actor (never goes back)."""

    def __init__(self) -> None:
        self.version = 0

    def see(self, version: int) -> None:
        self.version = max(self.version, version)

    def on_policy(self, msg: P.PolicyPublished) -> None:
        self.see(msg.version)


async def next_grant(client: Client, n: int) -> P.TaskGrant | None:
    """The next TaskGrant, asking for `n` leases unless one is already here; None when the
    broker does not answer (down or restarting: ZMQ reconnects, the caller asks again).

    Like the real actor's lease loop, and not `client.request`: that drops a reply which comes
    after its timeout, and the broker would renew a late grant's leases with our heartbeats
    for ever, never re-granting their tasks.
    """
    try:
        return await client.recv(P.TaskGrant, timeout=0.01)
    except TimeoutError:
        await client.send(P.TaskRequest(n=n))
        try:
            return await client.recv(P.TaskGrant, timeout=1.0)
        except TimeoutError:
            return None


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = Client(args.broker, args.peer_id)
    policy = PolicyTracker()
    client.on(P.PolicyPublished, policy.on_policy)
    with open(args.acked, "a") as acked:  # noqa: ASYNC230 - tiny appends, flushed per Ack
        outbox = LoggingOutbox(
            client, acked, batch=args.batch, flush_s=0.05, resend_s=args.resend_s
        )
        client.start()
        hello = P.Hello(role="actor", peer_id=args.peer_id, protocol_version=P.PROTOCOL_VERSION)
        welcome = await client.request(hello, P.Welcome, timeout=2.0, retries=30)
        policy.see(welcome.policy_version)
        tasks = [loop.create_task(outbox.run()), loop.create_task(heartbeats(client, args))]
        groups = 0
        while not stop.is_set() and (not args.max_groups or groups < args.max_groups):
            if len(outbox) >= args.max_outbox:  # like a real actor: bounded episodes in flight
                await asyncio.sleep(0.01)
                continue
            grant = await next_grant(client, args.leases)
            if grant is None:
                continue
            if not grant.leases:
                await asyncio.sleep(grant.retry_after_s or 0.05)
                continue
            for lease in grant.leases:
                if args.group_delay_s:
                    await asyncio.sleep(args.group_delay_s)
                group = synthetic.lease_group(
                    lease,
                    args.peer_id,
                    policy.version,
                    n_tokens=args.n_tokens,
                    n_turns=args.n_turns,
                    reasoning=True,
                    vocab_size=args.vocab,
                    sampling={"temperature": 1.0},
                    timings={"generate_s": args.group_delay_s},
                )
                for traj in group:
                    outbox.put(traj)
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
    ap.add_argument("--peer-id", default=f"synthetic-actor-{os.getpid()}")
    ap.add_argument("--acked", required=True, help="file to append acked traj_ids to")
    ap.add_argument("--n-tokens", type=int, default=256)
    ap.add_argument("--n-turns", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=synthetic.TINY_VOCAB_SIZE, help="ids below it")
    ap.add_argument("--leases", type=int, default=2, help="leases asked for per TaskRequest")
    ap.add_argument("--group-delay-s", type=float, default=0.0, help="'generation' time a group")
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
