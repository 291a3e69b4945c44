"""Ingest throughput of the broker against its baselines, measured in the same run.

N sender processes (default 1, 2, 4) push realistic trajectories - 2,048 tokens with every
per-token array filled, ~32 KiB each, 16 per TrajectoryBatch (one GRPO group, like an actor's
outbox batch) - through a real `python -m broker` process and count the trajectories acked
within a fixed window. Two broker modes:

- durable: `durability = "sqlite"`, the ack comes after the SQLite (WAL, synchronous=FULL)
  group commit;
- memory: `durability = "none"`, throwaway runs.

Baselines on the same bytes, same machine, same run:

- raw_zmq: the same frames over ZeroMQ PUSH/PULL (no decode, no store, no acks);
- disk: the filesystem holding the broker's data dir, sustained `write` + one `fdatasync` per
  batch, the batch being the mean size of the broker's group commits in its best durable run
  (the same bytes with the same batching; 4 MiB if durable mode was not run);
- redis: Redis streams, XADD (pipelined per batch) -> XREADGROUP + XACK by one consumer, against
  Debian's `redis-server` started here on loopback with persistence off. Skipped (and said so)
  when `redis-server` or the `redis` Python package is missing; `--install-redis` (as root)
  installs the server with apt-get first.

Prints a table, then as its last line one JSON object: `traj_per_s` (mode -> trajectories/s at
the best N), `mb_per_s`, `ratio_vs_raw_zmq` and `ratio_vs_redis` (memory-mode MB/s / baseline
MB/s), `ratio_vs_disk` (durable MB/s / fdatasync'd disk MB/s). `--quick` runs shorter windows
with N in (1, 2).

    python benchmarks/ingest.py [--quick] [--senders 1,2,4] [--duration 3] [--data-dir DIR]

HEADRACE_EVENT_LOOP=asyncio runs the broker on the standard event loop instead of uvloop
(shared/transport.py `run`); HEADRACE_BENCH_PROFILE=DIR samples each broker with py-spy
(where installed) into DIR for the length of its window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import free_port  # noqa: E402
from benchmarks.ingest_report import Result, Results, print_table, summary  # noqa: E402
from shared import protocol as P  # noqa: E402
from shared import synthetic  # noqa: E402

GROUP = 16  # trajectories per TrajectoryBatch frame (one group)
MIN_DISK_BATCH = 1 << 20
ACKED = "headrace_broker_trajectories_acked_total"
COMMIT_BYTES: dict[int, float] = {}  # N -> mean bytes per group commit of the durable run


# ---------------------------------------------------------------- payload


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


# ---------------------------------------------------------------- child processes


@dataclass
class Window:
    begin: float  # wall clock: senders start sending
    start: float  # counting starts (after warm-up)
    end: float  # counting and sending stop


def _await_go(ready: mp.Queue, go: mp.Queue) -> Window:
    ready.put(os.getpid())
    return go.get()


def broker_sender(endpoint: str, idx: int, n_tokens: int, window: int, ready, go, out) -> None:
    """Like an actor's outbox: up to `window` unacked batches in flight, acks counted."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, f"bench-sender-{idx}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    gen = trajectory_batches(idx, n_tokens)
    P.encode(P.TrajectoryBatch(items=next(gen)))  # warm up
    w = _await_go(ready, go)
    while time.time() < w.begin:
        time.sleep(0.001)
    inflight = acked = errors = 0
    while True:
        now = time.time()
        if now >= w.end:
            break
        while inflight < window:
            sock.send(P.encode(P.TrajectoryBatch(items=next(gen))), copy=False)
            inflight += 1
        if sock.poll(50):
            msg = P.decode(sock.recv())
            if isinstance(msg, P.Ack):
                inflight -= 1
                if w.start <= time.time() < w.end:
                    acked += len(msg.traj_ids)
            elif isinstance(msg, P.Error):
                errors += 1
                inflight -= 1
    deadline = time.time() + 20  # collect the rest, so the broker is idle for the next run
    while inflight and time.time() < deadline:
        if sock.poll(100) and isinstance(P.decode(sock.recv()), P.Ack | P.Error):
            inflight -= 1
    out.put({"acked": acked, "errors": errors, "unacked": inflight})
    sock.close()
    ctx.term()


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
    w = _await_go(ready, go)
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

    w = _await_go(ready, go)
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
    w = _await_go(ready, go)
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
    w = _await_go(ready, go)
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


# ---------------------------------------------------------------- orchestration


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


def profile(pid: int, mode: str, seconds: float) -> subprocess.Popen | None:
    """HEADRACE_BENCH_PROFILE=DIR (benchmark only): sample the broker process `pid` with
    py-spy for `seconds` (all threads), into DIR/broker-MODE-PID.txt (collapsed stacks)."""
    out = os.environ.get("HEADRACE_BENCH_PROFILE")
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not out or not spy:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    dest = Path(out) / f"broker-{mode}-{pid}.txt"
    argv = [spy, "record", "--threads", "-r", "200", "-f", "raw", "-o", str(dest)]
    argv += ["--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class BrokerProc:
    def __init__(self, work: Path, mode: str, n_tokens: int) -> None:
        self.dir = work / f"broker-{mode}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port, self.metrics_port = free_port(), free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        cfg = self.dir / "broker.toml"
        # A replay table big enough that no capacity eviction runs: this measures ingest.
        cfg.write_text(
            f"[broker]\ngroup_size = {GROUP}\nreplay_capacity = 100000000\nmax_staleness = -1\n"
            # trajectories of a 151k-token vocabulary, longer than the default max_model_len
            f'[model]\npath = "{self.dir / "no-model"}"\n[actor]\nmax_model_len = {n_tokens}\n'
        )
        argv = [sys.executable, "-m", "broker", "--config", str(cfg), "--log-level", "WARNING"]
        argv += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        argv += ["--data-dir", str(self.dir / "data")]
        argv += ["--durability", "sqlite" if mode == "durable" else "none"]
        self.log = self.dir / "broker.log"
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"listening on" not in self.log.read_bytes():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_broker(mode: str, n: int, a: argparse.Namespace, work: Path, tb: int) -> Result:
    import psutil

    broker = BrokerProc(work, mode, a.n_tokens)
    try:
        proc = psutil.Process(broker.p.pid)
        cpu0, acked0 = sum(proc.cpu_times()[:4]), broker.metrics()[ACKED]
        targets = [(broker_sender, (broker.endpoint, i, a.n_tokens, a.window)) for i in range(n)]
        spy = profile(broker.p.pid, mode, a.duration + a.warmup + 1)
        res = run_children(targets, a.duration, a.warmup)
        if spy is not None:
            spy.wait(30)
        m = broker.metrics()
        # CPU per trajectory does not depend on what else the machine runs, unlike traj/s.
        cpu = sum(proc.cpu_times()[:4]) - cpu0
        cpu_us = cpu / max(1.0, m[ACKED] - acked0) * 1e6
    finally:
        broker.stop()
    acked = sum(r["acked"] for r in res)
    commits = m.get("headrace_broker_commit_seconds_count", 0.0)
    note = ""
    if commits:
        per_commit = m["headrace_broker_commit_batches_sum"] * GROUP / commits
        note = f"{per_commit:.0f} traj/commit"
        if mode == "durable":
            COMMIT_BYTES[n] = per_commit * tb
    note += f", broker CPU {cpu_us:.0f} us/traj"
    if any(r["errors"] for r in res):
        note += f" errors={sum(r['errors'] for r in res)}"
    return Result(acked / a.duration, acked * tb / a.duration / 1e6, note, cpu_us)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows, N in (1, 2)")
    ap.add_argument("--senders", default=None, help="comma-separated N (default 1,2,4)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--n-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=16, help="unacked batches per sender")
    ap.add_argument("--data-dir", default=None, help="where the broker's store goes (a tmp dir)")
    ap.add_argument("--modes", default="raw_zmq,memory,durable,redis,disk")
    ap.add_argument("--install-redis", action="store_true")
    a = ap.parse_args(argv)
    a.duration = a.duration or (1.0 if a.quick else 3.0)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if a.quick else 0.5)
    return a


def run_modes(
    a: argparse.Namespace, ns: list[int], modes: list[str], work: Path, tb: int
) -> tuple[Results, dict[str, str]]:
    """Every requested mode at every N; the disk baseline last, batched like the best
    durable run."""
    results: Results = {}
    skipped: dict[str, str] = {}

    def record(mode: str, n: int, r: Result) -> None:
        results.setdefault(mode, {})[n] = r
        extra = f"  ({r.note})" if r.note else ""
        print(f"  {mode:8s} N={n}: {r.traj_per_s:9.0f} traj/s {r.mb_per_s:8.1f} MB/s{extra}")

    for n in ns:
        if "raw_zmq" in modes:
            record("raw_zmq", n, bench_zmq(n, a, tb))
        for mode in ("memory", "durable"):
            if mode in modes:
                record(mode, n, bench_broker(mode, n, a, work, tb))
    if "redis" in modes:
        proc, port, why = start_redis(a)
        if proc is None:
            skipped["redis"] = why
            print(f"  redis baseline skipped: {why}")
        else:
            try:
                for n in ns:
                    record("redis", n, bench_redis(n, a, tb, port))
            finally:
                proc.terminate()
                proc.wait(10)
    if "disk" in modes:
        # the same batching as the broker's best durable run: its mean bytes per commit
        durable = results.get("durable", {})
        best_n = max(durable, key=lambda n: durable[n].mb_per_s) if durable else 0
        batch = max(MIN_DISK_BATCH, int(COMMIT_BYTES.get(best_n, 0)) or 4 << 20)
        mbps = disk_bandwidth(work, batch, max(1.0, a.duration))
        results["disk"] = {0: Result(mbps * 1e6 / tb, mbps, f"{batch / 2**20:.1f} MiB/fsync")}
        print(f"  disk     fdatasync per {batch / 2**20:.1f} MiB batch: {mbps:8.1f} MB/s")
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ns = [int(x) for x in (a.senders or ("1,2" if a.quick else "1,2,4")).split(",")]
    work = Path(a.data_dir or tempfile.mkdtemp(prefix="headrace-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    tb = traj_bytes(a.n_tokens)
    print(
        f"ingest benchmark: {a.n_tokens} tokens = {tb / 1024:.1f} KiB per trajectory, "
        f"{GROUP} per batch, {a.window} batches in flight per sender, {a.duration:.1f} s windows,"
        f" {os.cpu_count()} cores, data dir {work}",
        flush=True,
    )
    t_start = time.monotonic()
    try:
        results, skipped = run_modes(a, ns, a.modes.split(","), work, tb)
    finally:
        if a.data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, ns)
    out = summary(results, tb)
    out["seconds"] = round(time.monotonic() - t_start, 1)
    if skipped:
        out["skipped"] = skipped
    print()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
