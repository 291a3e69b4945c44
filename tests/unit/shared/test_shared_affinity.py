"""`[actor] cpus` / `[learner] cpus` (shared/affinity.py): the config refuses malformed lists,
a process pins itself only to cores it may use, and vLLM's bind string is derived from the
list."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.affinity import cpu_list, omp_threads_bind, pin_process
from shared.config import ConfigError, load_config

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform"
)


def test_default_is_unpinned():
    cfg = load_config(None)
    assert cfg.actor.cpus == [] and cfg.learner.cpus == []


def test_lists_load_in_their_order(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[actor]\ncpus = [0]\n[learner]\ncpus = [3, 1, 2]\n")
    cfg = load_config(p)
    assert cfg.actor.cpus == [0] and cfg.learner.cpus == [3, 1, 2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor.cpus=[0,1,0]", r"\[actor\] cpus: core ids listed more than once: \[0\]"),
        ("learner.cpus=[2,2]", r"\[learner\] cpus: core ids listed more than once: \[2\]"),
        ("learner.cpus=[0,-1]", r"\[learner\] cpus: core ids must be >= 0, got \[-1\]"),
        ("actor.cpus=[-3]", r"\[actor\] cpus: core ids must be >= 0"),
        ('actor.cpus=["0"]', r"Expected `int`.*actor\.cpus"),
        ("learner.cpus=0", r"Expected `array`.*learner\.cpus"),
    ],
)
def test_malformed_lists_are_refused_at_decode(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_fewer_actor_cores_than_engine_workers_is_refused():
    with pytest.raises(ConfigError, match=r"2 cores for tensor_parallel_size = 4"):
        load_config(None, ["actor.cpus=[0,1]", "actor.tensor_parallel_size=4"])
    cfg = load_config(None, ["actor.cpus=[0,1,2,3]", "actor.tensor_parallel_size=4"])
    assert cfg.actor.cpus == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("cpus", "want"),
    [([0], "0"), ([1, 0], "0-1"), ([0, 2, 3], "0,2-3"), ([7, 0, 1, 2, 5], "0-2,5,7")],
)
def test_cpu_list_writes_ranges(cpus, want):
    assert cpu_list(cpus) == want


@pytest.mark.parametrize(
    ("cpus", "ranks", "want"),
    [
        ([], 1, "nobind"),
        ([0], 1, "0"),
        ([0, 2, 3], 1, "0,2-3"),
        ([0, 1, 2, 3], 2, "0-1|2-3"),
        ([4, 0, 1, 2, 3], 2, "0-2|3-4"),  # the first share takes the odd core
    ],
)
def test_omp_threads_bind_is_vllms_format(cpus, ranks, want):
    assert omp_threads_bind(cpus, ranks) == want


def test_omp_threads_bind_wants_a_core_per_rank():
    with pytest.raises(ValueError, match="1 cores for 2 engine workers"):
        omp_threads_bind([0], 2)


def test_empty_list_leaves_the_affinity_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda *a: calls.append(a), raising=False)
    pin_process([], "[learner] cpus")
    assert calls == []


@needs_affinity
def test_a_core_not_available_here_is_refused_before_pinning(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sched_setaffinity", lambda *a: calls.append(a))
    with pytest.raises(ValueError, match=r"\[actor\] cpus: cores \[5\] are not available"):
        pin_process([1, 5], "[actor] cpus")
    assert calls == []
    pin_process([1], "[actor] cpus")
    assert calls == [(0, {1})]


@needs_affinity
def test_pinning_is_real_and_inherited_by_children():
    """In a child interpreter (pinning this test process would pin the rest of the suite):
    pinned to one of its cores, it and a process it starts run only there."""
    core = max(os.sched_getaffinity(0))
    code = (
        "import os, subprocess, sys\n"
        "from shared.affinity import pin_process\n"
        f"pin_process([{core}], 'k')\n"
        "print(sorted(os.sched_getaffinity(0)))\n"
        "sys.stdout.flush()\n"
        "subprocess.run([sys.executable, '-c', "
        "'import os; print(sorted(os.sched_getaffinity(0)))'], check=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [f"[{core}]", f"[{core}]"]
