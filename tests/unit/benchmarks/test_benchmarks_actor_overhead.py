"""benchmarks/actor_overhead.py's measuring helpers: tokens/s over whole waves of
completions, CPU seconds of a set of processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.actor_overhead import cpu_seconds, rate


def test_rate_counts_whole_waves_not_a_fixed_window():
    # 64 episodes of 32 tokens finishing together every 14 s (a slow model): a fixed 20 s
    # window holds one or two waves depending on where it starts; rate() spans whole ones
    waves = [(0.0, 0.0), (3.0, 2048.0), (17.0, 4096.0), (31.0, 6144.0)]
    assert rate(waves) == 2048 / 14
    # a steady stream observed five times a second, the count moving at each look
    steady = [(k / 5, 100.0 * k) for k in range(51)]
    assert abs(rate(steady) - 500.0) < 1e-9
    # repeated observations of an unchanged count do not stretch the span
    assert rate([(0.0, 0.0), (1.0, 10.0), (1.5, 10.0), (2.0, 20.0), (9.0, 20.0)]) == 10.0
    assert rate([(0.0, 5.0), (1.0, 5.0)]) == 0.0  # nothing finished


def test_cpu_seconds_grow_with_work_and_a_gone_process_counts_zero():
    before = cpu_seconds([os.getpid()])
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert cpu_seconds([os.getpid()]) - before >= 0.15
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds([gone.pid]) == 0.0
