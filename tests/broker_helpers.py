"""The broker tests' trajectories (shared/synthetic.py) and an in-process broker to send them to."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from broker.replay import GroupItem
from broker.server import Broker
from shared import protocol as P
from shared import synthetic
from shared.config import Config
from shared.transport import Client


def make_traj(
    group_id: str,
    i: int,
    version: int = 0,
    n_tokens: int = 8,
    n_prompt: int = 2,
    task_id: str = "symbols-L1-0",
) -> P.Trajectory:
    """Trajectory `i` of group `group_id` (reward i): a prompt, then loss-masked action tokens
    sampled by policy `version`. Deterministic, so a resend is byte-identical (as an outbox's
    would be)."""
    return synthetic.trajectory(
        f"{group_id}-{i}",
        group_id,
        n_tokens=n_tokens,
        n_prompt=n_prompt,
        reward=float(i),
        policy_version=version,
        behav_logprob=-0.5,
        task_id=task_id,
        env="symbols",
        actor_id="actor-1",
    )


@contextlib.asynccontextmanager
async def running(
    cfg: Config, clock: Callable[[], float] = time.monotonic, quota_bytes: int | None = None
) -> AsyncIterator[tuple[Broker, Callable[[str], Client]]]:
    """An in-process broker on a free loopback port, and a factory of connected clients."""
    broker = Broker(cfg, clock=clock)
    broker.store.set_quota_bytes(quota_bytes)
    endpoint = await broker.start("tcp://127.0.0.1:0")
    clients: list[Client] = []

    def client(name: str) -> Client:
        c = Client(endpoint, name)
        c.start()
        clients.append(c)
        return c

    try:
        yield broker, client
    finally:
        for c in clients:
            c.close()
        await broker.stop()


async def take(
    learner: Client, req: P.SampleRequest, reply: type | tuple[type, ...], **kw: float
) -> Any:
    """`learner.request(req, reply)`, acknowledging a Batch as a learner's step does (else
    the broker hands the same batch again on the next request)."""
    got = await learner.request(req, reply, **kw)  # type: ignore[arg-type]
    if isinstance(got, P.Batch):
        await learner.send(P.BatchTrained(batch_id=got.batch_id, step=got.batch_id))
    return got


def group(key: int, size: int = 4, version: int = 0) -> GroupItem:
    """A replay item: group `key` of `size` trajectories (seqs key*10...), oldest version
    `version`."""
    return GroupItem(
        key=key,
        group_id=f"g{key}",
        task_id="t",
        seqs=list(range(key * 10, key * 10 + size)),
        min_version=version,
    )
