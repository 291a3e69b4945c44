"""Soak: legitimate actors and a learner keep working while hostile peers flood the broker and
the weight endpoint; memory stays bounded.

One broker process (durable, on a temp data dir) and one weight-endpoint process (a
`WeightPublisher` serving a 16 MiB policy, as the learner's does), then, in this process:
- `--actors` (64) legitimate actors: each takes leases and sends their groups of synthetic
  trajectories (acked), again and again;
- a learner: samples, acknowledges each batch (`BatchTrained`) and checkpoints (`Checkpointed`)
  every 5 batches;
- hostile peers: heartbeats of 100k stats (oversized: dropped), task feedback for random task
  ids (refused), and weight-chunk requests pipelined 256 deep without reading the replies
  from one peer (what the endpoint may hold in replies per peer is bounded in bytes:
  `learner.publish.peer_pin_bytes`, 68 MiB of 4 MiB chunks).
Every 2 s the broker's and the endpoint's RSS are sampled. Last line, JSON: `minutes`,
`actors`, `acked`, `acked_per_min` (per minute of the run, so a stall shows as a zero),
`batches`, `broker_rss_mb` and `endpoint_rss_mb` (`start`, `max`), `endpoint_peer_pin_mb`
(that per-peer bound, as the endpoint computed it), `bound_mb`, `ok` (both maxima under
`--bound-mb` and acks in every minute). Exit 1 if not ok.

What `--bound-mb` can be defended at: the endpoint holds the interpreter and torch, the
policy's state dict (16 MiB) and its `keep + 1` = 3 blob buffers (48 MiB), and on top of that
`endpoint_peer_pin_mb` for the one greedy peer plus the reply being encoded (4 MiB); the
broker's own figure (below 100 MB in every run so far) is far under that.

    python benchmarks/soak.py [--minutes 10] [--actors 64] [--bound-mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq
import zmq.asyncio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import protocol as P  # noqa: E402
from shared import synthetic  # noqa: E402
from shared.transport import Client, PeerUnreachable  # noqa: E402
from tests.helpers import free_port  # noqa: E402

ENDPOINT = """
import asyncio, sys, torch
from learner.publish import WeightPublisher

async def main():
    pub = WeightPublisher(f"tcp://127.0.0.1:{sys.argv[1]}")
    pub.start()
    state = {f"w{i}": torch.randn(512, 512) for i in range(16)}  # 16 MiB
    manifest = pub.publish(1, state)
    print(manifest.total_bytes, len(manifest.chunk_digests), pub.peer_pin_bytes, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def actor(endpoint: str, i: int, stop: asyncio.Event, acked: list[float]) -> None:
    c = Client(endpoint, f"soak-actor-{i}")
    c.start()
    try:
        hello = P.Hello(
            role="actor", peer_id=f"soak-actor-{i}", protocol_version=P.PROTOCOL_VERSION
        )
        await c.request(hello, P.Welcome, timeout=10, retries=5)
        while not stop.is_set():
            try:
                grant = await c.request(P.TaskRequest(n=1), P.TaskGrant, timeout=10, retries=0)
                for lease in grant.leases:
                    items = synthetic.lease_group(
                        lease, f"soak-actor-{i}", n_tokens=128, n_turns=4, reasoning=True
                    )
                    ack = await c.request(
                        P.TrajectoryBatch(items=items), P.Ack, timeout=30, retries=3
                    )
                    acked.extend([time.monotonic()] * len(ack.traj_ids))
                if not grant.leases:
                    await asyncio.sleep(grant.retry_after_s or 0.5)
            except (PeerUnreachable, P.ProtocolError):
                await asyncio.sleep(0.5)
    finally:
        c.close()


async def learner(
    endpoint: str, stop: asyncio.Event, batches: list[int], ready: asyncio.Event
) -> None:
    c = Client(endpoint, "soak-learner")
    c.start()
    hello = P.Hello(role="learner", peer_id="soak-learner", protocol_version=P.PROTOCOL_VERSION)
    await c.request(hello, P.Welcome, timeout=10, retries=5)
    ready.set()  # the active learner now: the flood cannot take that over
    step = 0
    try:
        while not stop.is_set():
            try:
                r = await c.request(
                    P.SampleRequest(batch_size=32), (P.Batch, P.NotReady), timeout=30, retries=0
                )
            except PeerUnreachable:
                continue
            if isinstance(r, P.NotReady):
                await asyncio.sleep(max(0.05, r.retry_after_s))
                continue
            step += 1
            await c.send(P.BatchTrained(batch_id=r.batch_id, step=step))
            if step % 5 == 0:
                await c.send(P.Checkpointed(step=step))
            batches.append(step)
    finally:
        c.close()


async def hostile(broker: str, weights: str, n_chunks: int, stop: asyncio.Event) -> None:
    rng = random.Random(0)
    flood = Client(broker, "soak-flood")
    flood.start()
    # A raw DEALER that never reads: what it is sent piles up in ZeroMQ's queues (bounded by
    # the endpoint's per-peer credit), not in this process's Python objects.
    greedy = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    greedy.setsockopt(zmq.LINGER, 0)
    greedy.setsockopt(zmq.RCVHWM, 16)
    greedy.connect(weights)
    try:
        while not stop.is_set():
            stats = {f"k{j}": float(j) for j in range(100_000)}
            await flood.send(P.Heartbeat(peer_id="soak-flood", stats=stats))
            for _ in range(50):
                task = f"nope-{rng.getrandbits(64):016x}"
                await flood.send(P.TaskFeedback(task_id=task, pass_rate=0.5))
            for _ in range(256):  # pipelined, never read
                req = P.WeightRequest(version=1, chunk=rng.randrange(n_chunks))
                try:
                    await asyncio.wait_for(greedy.send(P.encode(req)), 0.05)
                except TimeoutError:
                    break  # its send queue is full: the endpoint stopped reading from it
            await asyncio.sleep(0.2)
    finally:
        flood.close()
        greedy.close(linger=0)


def rss_mb(p: psutil.Process) -> float:
    return p.memory_info().rss / 2**20


async def soak(
    args: argparse.Namespace,
    broker: psutil.Process,
    weights: str,
    n_chunks: int,
    endpoint: str,
    pub: psutil.Process,
    peer_pin: int,
) -> dict:
    stop = asyncio.Event()
    acked: list[float] = []
    batches: list[int] = []
    t0 = time.monotonic()
    tasks = [asyncio.create_task(actor(endpoint, i, stop, acked)) for i in range(args.actors)]
    ready = asyncio.Event()
    tasks.append(asyncio.create_task(learner(endpoint, stop, batches, ready)))
    await asyncio.wait_for(ready.wait(), 60)
    tasks.append(asyncio.create_task(hostile(endpoint, weights, n_chunks, stop)))
    b_rss, w_rss = [rss_mb(broker)], [rss_mb(pub)]
    end = t0 + args.minutes * 60
    while time.monotonic() < end:
        await asyncio.sleep(2.0)
        b_rss.append(rss_mb(broker))
        w_rss.append(rss_mb(pub))
        assert broker.is_running() and pub.is_running(), "a server died"
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    minutes = max(1, round(args.minutes))
    per_min = [0] * minutes
    for t in acked:
        per_min[min(minutes - 1, int((t - t0) / 60))] += 1
    ok = max(b_rss) < args.bound_mb and max(w_rss) < args.bound_mb and all(per_min)
    return {
        "minutes": args.minutes,
        "actors": args.actors,
        "acked": len(acked),
        "acked_per_min": per_min,
        "batches": len(batches),
        "broker_rss_mb": {"start": round(b_rss[0], 1), "max": round(max(b_rss), 1)},
        "endpoint_rss_mb": {"start": round(w_rss[0], 1), "max": round(max(w_rss), 1)},
        "endpoint_peer_pin_mb": round(peer_pin / 2**20, 1),
        "bound_mb": args.bound_mb,
        "ok": ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--actors", type=int, default=64)
    ap.add_argument("--bound-mb", type=float, default=1024.0)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="headrace-soak-") as tmp:
        port, wport = free_port(), free_port()
        cfg = Path(tmp) / "soak.toml"
        cfg.write_text(
            f'[broker]\ngroup_size = 4\nmax_staleness = -1\n[model]\npath = "{tmp}/none"\n'
        )
        b = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "--config",
                str(cfg),
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--data-dir",
                f"{tmp}/data",
            ],
            env=env,
            cwd=tmp,
            stdout=open(f"{tmp}/broker.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        w = subprocess.Popen(
            [sys.executable, "-c", ENDPOINT, str(wport)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert w.stdout is not None
            _, n_chunks, peer_pin = (int(x) for x in w.stdout.readline().split())
            endpoint = f"tcp://127.0.0.1:{port}"
            result = asyncio.run(
                soak(
                    args,
                    psutil.Process(b.pid),
                    f"tcp://127.0.0.1:{wport}",
                    n_chunks,
                    endpoint,
                    psutil.Process(w.pid),
                    peer_pin,
                )
            )
        finally:
            for p in (b, w):
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
