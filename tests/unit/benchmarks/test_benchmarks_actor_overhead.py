"""benchmarks/actor_overhead.py's measuring helpers: tokens/s over whole waves of
completions, CPU seconds of a set of processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.actor_overhead import cpu_seconds, paired_ratios, per_token, rate


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


def test_each_pipeline_window_is_compared_with_the_bare_windows_either_side():
    # the machine slows down over the run: bare 1000 -> 800 -> 600 tokens/s; a pipeline that
    # is always 90% of bare reads 0.9 in each round, not 900 / (mean of all bare windows)
    assert paired_ratios([810.0, 630.0], [1000.0, 800.0, 600.0]) == [0.9, 0.9]
    with pytest.raises(ValueError, match="want 3 bare"):
        paired_ratios([810.0, 630.0], [1000.0, 800.0])


def test_cpu_per_token_pools_the_windows_of_a_side():
    a = {"cpu": {"driver": 1.0, "engine": 3.0}, "tokens": 1000.0}
    b = {"cpu": {"driver": 2.0, "engine": 6.0}, "tokens": 3000.0}
    assert per_token(a, b) == {"driver": 3.0 / 4000, "engine": 9.0 / 4000}
