"""Ingest throughput of the broker against its baselines, measured in the same run.

N sender processes (default 1, 2, 4) push realistic trajectories - 2,048 tokens with every
per-token array filled, ~32 KiB each, 16 per TrajectoryBatch (one GRPO group, like an actor's
outbox batch) - through a real `python -m broker` process and count the trajectories acked
within a fixed window. Two broker modes:

- durable: `durability = "sqlite"`, the ack comes after the group commit: its segment records
  fdatasync'ed, then its rows committed in SQLite (WAL, synchronous=NORMAL: see
  broker/store/store.py);
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
MB/s), `ratio_vs_disk` (durable MB/s / fdatasync'd disk MB/s), the CPU per trajectory of the
broker and of the senders, and `cores_needed_for_raw_goal`: the cores memory mode at 0.8x raw
ZeroMQ would keep busy at the CPU per trajectory measured (broker and senders, perfectly
parallel), against `cores`. `--quick` runs shorter windows with N in (1, 2).

    python benchmarks/ingest.py [--quick] [--senders 1,2,4] [--duration 3] [--data-dir DIR]

HEADRACE_EVENT_LOOP=asyncio runs the broker on the standard event loop instead of uvloop
(shared/transport.py `run`); HEADRACE_BENCH_PROFILE=DIR samples each broker with py-spy
(where installed) into DIR for the length of its window.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import free_port, scrape  # noqa: E402
from benchmarks.ingest_baselines import bench_redis, bench_zmq, disk_bandwidth, start_redis  # noqa: E402
from benchmarks.ingest_load import GROUP, await_go, run_children, traj_bytes, trajectory_batches  # noqa: E402
from benchmarks.ingest_report import Result, Results, print_table, summary  # noqa: E402
from shared import protocol as P  # noqa: E402

MIN_DISK_BATCH = 1 << 20
ACKED = "headrace_broker_trajectories_acked_total"
COMMIT_BYTES: dict[int, float] = {}  # N -> mean bytes per group commit of the durable run


# ---------------------------------------------------------------- the broker's sender


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
    w = await_go(ready, go)
    while time.time() < w.begin:
        time.sleep(0.001)
    inflight = acked = errors = 0
    cpu0 = cpu1 = None  # this process's CPU seconds at the window's edges
    while True:
        now = time.time()
        if cpu0 is None and now >= w.start:
            cpu0 = time.process_time()
        if now >= w.end:
            cpu1 = time.process_time()
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
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else 0.0
    out.put({"acked": acked, "errors": errors, "unacked": inflight, "cpu_s": cpu})
    sock.close()
    ctx.term()


# ---------------------------------------------------------------- orchestration


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
        return scrape(self.metrics_port)

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
    sender_us = sum(r["cpu_s"] for r in res) / max(1, acked) * 1e6
    note += f", broker CPU {cpu_us:.0f} us/traj, senders {sender_us:.0f}"
    if any(r["errors"] for r in res):
        note += f" errors={sum(r['errors'] for r in res)}"
    return Result(acked / a.duration, acked * tb / a.duration / 1e6, note, cpu_us, sender_us)


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
    out = summary(results, tb, os.cpu_count() or 1)
    out["seconds"] = round(time.monotonic() - t_start, 1)
    if skipped:
        out["skipped"] = skipped
    print()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
