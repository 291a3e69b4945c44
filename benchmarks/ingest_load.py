"""The ingest benchmark's load (benchmarks/ingest.py): the trajectories every sender sends,
and the child processes' shared start and measuring window."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from shared import protocol as P
from shared import synthetic

GROUP = 16  # trajectories per TrajectoryBatch frame (one group)


def template(n_tokens: int, seed: int = 0) -> P.Trajectory:
    """A realistic multi-turn trajectory: every per-token array filled with plausible values,
    ids of a 151k-token vocabulary (a Qwen-sized model's)."""
    rng = np.random.default_rng(seed)
    n, n_turns = n_tokens, 8
    return synthetic.trajectory(
        "",
        "",
        n_tokens=n,
        n_prompt=256,
        n_turns=n_turns,
        n_observation=n // n_turns // 4,
        reasoning=True,
        vocab_size=151_000,
        rng=rng,
        behav_logprob=-rng.exponential(0.7, n),
        policy_version=np.full(n, 41) + (np.arange(n) > n // 2),  # weights swapped mid-episode
        turns=[
            P.TurnInfo(
                reward=0.1 * t,
                done=t == n_turns - 1,
                truncated=False,
                action_valid=True,
                state_key=f"s{t:03d}",
                action=f"move {t % 4}",
            )  # fmt: skip
            for t in range(n_turns)
        ],
        reward=0.7,
        task_id="reasoning_gym/arc_1d-000417",
        env="reasoning_gym",
        actor_id="bench-actor",
        lease_id="",
        sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 512.0},
        timings={"generate_s": 3.2, "env_s": 0.05, "queue_s": 0.01},
    )


def trajectory_batches(sender: int, n_tokens: int) -> Iterator[list[P.Trajectory]]:
    """Endless groups of GROUP unique trajectories (the traj_ids are the dedupe key)."""
    base = template(n_tokens, seed=sender)
    k = 0
    while True:
        gid = f"{sender:02d}{k:014x}"
        yield [
            msgspec.structs.replace(base, traj_id=f"{gid}-{i}", group_id=gid, lease_id=gid)
            for i in range(GROUP)
        ]
        k += 1


def traj_bytes(n_tokens: int) -> int:
    t = next(trajectory_batches(0, n_tokens))[0]
    return len(P.encode(t))


@dataclass
class Window:
    begin: float  # wall clock: senders start sending
    start: float  # counting starts (after warm-up)
    end: float  # counting and sending stop


def await_go(ready: mp.Queue, go: mp.Queue) -> Window:
    ready.put(os.getpid())
    return go.get()


def run_children(
    targets: list[tuple[Callable, tuple]], duration: float, warmup: float
) -> list[dict]:
    """Start the children, wait until all are ready, then give them one shared window."""
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=f, args=(*a, ready, go, out), daemon=True) for f, a in targets]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    begin = time.time() + 0.2
    w = Window(begin, begin + warmup, begin + warmup + duration)
    for _ in procs:
        go.put(w)
    results = []
    for _ in procs:
        try:
            results.append(out.get(timeout=duration + warmup + 60))
        except queue.Empty:
            break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    if len(results) != len(procs):
        raise RuntimeError(f"{len(procs) - len(results)} benchmark processes gave no result")
    return results
