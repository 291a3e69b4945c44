"""The ingest benchmark's baselines (benchmarks/ingest.py), on the same frames: a bare ZeroMQ
PUSH/PULL receiver, Redis streams, and fdatasync'd appends to the data dir's disk."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.harness import free_port
from benchmarks.ingest_load import GROUP, await_go, run_children, trajectory_batches
from benchmarks.ingest_report import Result
from shared import protocol as P


def zmq_sender(endpoint: str, idx: int, n_tokens: int, window: int, ready, go, out) -> None:
    """The same frames (built the same way), PUSHed with no acks."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, window)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    gen = trajectory_batches(idx, n_tokens)
    P.encode(P.TrajectoryBatch(items=next(gen)))
    w = await_go(ready, go)
    while time.time() < w.begin:
        time.sleep(0.001)
    sent = 0
    while time.time() < w.end:
        frame = P.encode(P.TrajectoryBatch(items=next(gen)))
        try:
            sock.send(frame, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            if sock.poll(50, zmq.POLLOUT):
                sock.send(frame, copy=False)
            else:
                continue
        sent += 1
    out.put({"sent": sent})
    sock.close()
    ctx.term()


def zmq_receiver(endpoint: str, n_senders: int, ready, go, out) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    import resource

    w = await_go(ready, go)
    frames = nbytes = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        now = time.time()
        if now >= w.end:
            break
        if sock.poll(50):
            f = sock.recv(copy=False)
            if w.start <= time.time() < w.end:
                frames += 1
                nbytes += len(f.buffer)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime  # over warm-up + window
    total = frames * (w.end - w.begin) / max(1e-9, w.end - w.start)
    out.put(
        {"frames": frames, "bytes": nbytes, "cpu_us_per_traj": cpu / max(1, total * GROUP) * 1e6}
    )
    sock.close()
    ctx.term()


def redis_sender(port: int, idx: int, n_tokens: int, window: int, ready, go, out) -> None:
    import redis

    r = redis.Redis(port=port)
    gen = trajectory_batches(idx, n_tokens)
    w = await_go(ready, go)
    while time.time() < w.begin:
        time.sleep(0.001)
    sent = 0
    while time.time() < w.end:
        pipe = r.pipeline(transaction=False)
        for t in next(gen):
            pipe.xadd("trajectories", {"t": P.encode(t)}, maxlen=20_000, approximate=True)
        pipe.execute()
        sent += GROUP
    out.put({"sent": sent})


def redis_consumer(port: int, ready, go, out) -> None:
    import redis

    r = redis.Redis(port=port)
    w = await_go(ready, go)
    acked = 0
    while time.time() < w.end:
        resp = r.xreadgroup("bench", "c1", {"trajectories": ">"}, count=GROUP, block=50)
        if not resp:
            continue
        ids = [eid for _, entries in resp for eid, _ in entries]
        if ids:
            r.xack("trajectories", "bench", *ids)
            if w.start <= time.time() < w.end:
                acked += len(ids)
    out.put({"acked": acked})


def bench_zmq(n: int, a: argparse.Namespace, tb: int) -> Result:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    targets: list[tuple[Callable, tuple]] = [(zmq_receiver, (endpoint, n))]
    targets += [(zmq_sender, (endpoint, i, a.n_tokens, a.window)) for i in range(n)]
    res = run_children(targets, a.duration, a.warmup)
    frames = res_of(res, "frames")
    trajs = frames * GROUP
    cpu_us = next(r["cpu_us_per_traj"] for r in res if "cpu_us_per_traj" in r)
    note = f"receiver CPU {cpu_us:.0f} us/traj"
    return Result(trajs / a.duration, trajs * tb / a.duration / 1e6, note, cpu_us)


def res_of(results: list[dict], key: str) -> int:
    return sum(r.get(key, 0) for r in results)


def bench_redis(n: int, a: argparse.Namespace, tb: int, port: int) -> Result:
    import redis

    r = redis.Redis(port=port)
    r.delete("trajectories")
    r.xgroup_create("trajectories", "bench", id="$", mkstream=True)
    targets: list[tuple[Callable, tuple]] = [(redis_consumer, (port,))]
    targets += [(redis_sender, (port, i, a.n_tokens, a.window)) for i in range(n)]
    res = run_children(targets, a.duration, a.warmup)
    acked = res_of(res, "acked")
    r.delete("trajectories")
    return Result(acked / a.duration, acked * tb / a.duration / 1e6)


def start_redis(a: argparse.Namespace) -> tuple[subprocess.Popen | None, int, str]:
    """A throwaway redis-server on loopback, persistence off; (proc, port, why-not)."""
    try:
        import redis
    except ImportError:
        return None, 0, "the `redis` Python package is not installed (pip install redis)"
    exe = shutil.which("redis-server")
    if exe is None and a.install_redis:
        if os.geteuid() != 0:
            return None, 0, "redis-server missing and --install-redis needs root"
        print("installing redis-server with apt-get ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False)
        exe = shutil.which("redis-server")
    if exe is None:
        return None, 0, "redis-server is not installed (run as root with --install-redis)"
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--daemonize", "no", "--loglevel", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, port, ""
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                return None, 0, "redis-server did not start"
            time.sleep(0.05)


def disk_bandwidth(directory: Path, batch_bytes: int, duration: float) -> float:
    """MB/s of sustained appends with one fdatasync per `batch_bytes` batch."""
    buf = np.random.default_rng(1).integers(0, 256, batch_bytes, dtype=np.uint8).tobytes()
    path = directory / f"disk-bench-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t_warm = time.perf_counter() + min(0.5, duration / 4)
        while time.perf_counter() < t_warm:
            os.write(fd, buf)
            os.fdatasync(fd)
        n = 0
        t0 = time.perf_counter()
        while (dt := time.perf_counter() - t0) < duration:
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
            n += batch_bytes
        return n / dt / 1e6
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
