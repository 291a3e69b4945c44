"""benchmarks/ingest_report.py: the ratios and the cores the raw-ZeroMQ goal would need."""

from __future__ import annotations

from benchmarks.ingest_report import GOALS, Result, cores_for_raw_goal, summary


def results() -> dict[str, dict[int, Result]]:
    return {
        # N=2 is raw's best run: 40,000 traj/s
        "raw_zmq": {1: Result(30_000, 990.0, cpu_us_per_traj=14.0), 2: Result(40_000, 1320.0)},
        # memory's best run is N=1: 80 us broker + 30 us senders per trajectory
        "memory": {
            1: Result(15_000, 495.0, cpu_us_per_traj=80.0, sender_cpu_us_per_traj=30.0),
            2: Result(14_000, 462.0, cpu_us_per_traj=85.0, sender_cpu_us_per_traj=35.0),
        },
        "redis": {1: Result(6_000, 198.0)},
    }


def test_cores_needed_is_the_goal_rate_times_cpu_per_trajectory_of_the_best_runs():
    # 0.8 x 40,000 traj/s x 110 us = 3.52 cores
    assert cores_for_raw_goal(results()) == round(GOALS["ratio_vs_raw_zmq"] * 40_000 * 110e-6, 2)
    assert cores_for_raw_goal(results()) == 3.52


def test_cores_needed_is_none_without_both_sides_or_a_cpu_figure():
    r = results()
    assert cores_for_raw_goal({"memory": r["memory"]}) is None
    assert cores_for_raw_goal({"raw_zmq": r["raw_zmq"]}) is None
    assert cores_for_raw_goal({**r, "memory": {1: Result(15_000, 495.0)}}) is None


def test_summary_reports_ratios_cpu_and_cores():
    out = summary(results(), traj_bytes=33_000, cores=2)
    assert out["ratio_vs_raw_zmq"] == round(495 / 1320, 3)
    assert out["ratio_vs_redis"] == round(495 / 198, 3)
    assert out["ratio_vs_disk"] is None  # neither durable nor disk was measured
    assert out["broker_cpu_us_per_traj"] == {"memory": 80.0}
    assert out["sender_cpu_us_per_traj"] == {"memory": 30.0}
    assert out["cores"] == 2 and out["cores_needed_for_raw_goal"] == 3.52
