"""The ingest benchmark's report (benchmarks/ingest.py): its table and its last-line JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Result:
    traj_per_s: float
    mb_per_s: float
    note: str = ""
    cpu_us_per_traj: float | None = None  # the broker process's CPU time per acked trajectory
    sender_cpu_us_per_traj: float | None = None  # the senders' CPU time, likewise


Results = dict[str, dict[int, Result]]  # mode -> N senders -> result (disk: N = 0)
GOALS = {"ratio_vs_raw_zmq": 0.8, "ratio_vs_redis": 3.0, "ratio_vs_disk": 0.6}


def best(results: Results, mode: str) -> Result | None:
    rs = results.get(mode)
    return max(rs.values(), key=lambda r: r.mb_per_s) if rs else None


def ratio(results: Results, x: str, y: str) -> float | None:
    rx, ry = best(results, x), best(results, y)
    return round(rx.mb_per_s / ry.mb_per_s, 3) if rx and ry and ry.mb_per_s else None


def print_table(results: Results, ns: list[int]) -> None:
    print()
    print(f"{'mode':10s}" + "".join(f"{'N=' + str(n):>22s}" for n in ns) + f"{'best MB/s':>12s}")
    for mode in ("memory", "durable", "raw_zmq", "redis", "disk"):
        rs = results.get(mode)
        if not rs:
            continue
        cells = "".join(
            f"{rs[n].traj_per_s:8.0f} t/s {rs[n].mb_per_s:7.1f} MB/s" if n in rs else " " * 22
            for n in ns
        )
        if mode == "disk":
            cells = f"{rs[0].note:>22s}" + " " * 22 * (len(ns) - 1)
        b = best(results, mode)
        print(f"{mode:10s}{cells}{b.mb_per_s if b else 0:12.1f}")


def cores_for_raw_goal(results: Results) -> float | None:
    """How many cores memory-mode ingest at the raw-ZeroMQ goal (GOALS x the best raw
    traj/s) would keep busy, at the CPU per trajectory its best run measured, broker and
    senders together: a lower bound (perfect parallelism, no extra hop). More than the
    machine has means no split of the same work across processes can reach the goal here."""
    raw, mem = best(results, "raw_zmq"), best(results, "memory")
    if raw is None or mem is None or mem.cpu_us_per_traj is None:
        return None
    per_traj = mem.cpu_us_per_traj + (mem.sender_cpu_us_per_traj or 0.0)
    return round(GOALS["ratio_vs_raw_zmq"] * raw.traj_per_s * per_traj / 1e6, 2)


def summary(results: Results, traj_bytes: int, cores: int) -> dict[str, Any]:
    """The last line's keys; `ratio_vs_*` are None when a side was not measured."""
    bests = {m: b for m in results if (b := best(results, m)) is not None}
    raw = results.get("raw_zmq")
    return {
        "traj_per_s": {
            m: round(bests[m].traj_per_s, 1) for m in ("durable", "memory") if m in bests
        },
        "mb_per_s": {m: round(b.mb_per_s, 1) for m, b in bests.items()},
        "ratio_vs_raw_zmq": ratio(results, "memory", "raw_zmq"),
        "ratio_vs_redis": ratio(results, "memory", "redis"),
        "ratio_vs_disk": ratio(results, "durable", "disk"),
        "best_n": {
            m: max(rs, key=lambda n: rs[n].mb_per_s) for m, rs in results.items() if m != "disk"
        },
        "goals": GOALS,
        "broker_cpu_us_per_traj": {
            m: round(min(r.cpu_us_per_traj for r in results[m].values()), 1)  # type: ignore
            for m in ("durable", "memory")
            if m in results
        },
        "raw_zmq_receiver_cpu_us_per_traj": round(
            min(r.cpu_us_per_traj or 0.0 for r in raw.values()), 1
        )
        if raw
        else None,
        "sender_cpu_us_per_traj": {
            m: round(b.sender_cpu_us_per_traj, 1)
            for m in ("durable", "memory")
            if (b := bests.get(m)) is not None and b.sender_cpu_us_per_traj is not None
        },
        "cores": cores,
        "cores_needed_for_raw_goal": cores_for_raw_goal(results),
        "traj_bytes": traj_bytes,
    }
