"""benchmarks/async_vs_sync.py without running the pipeline: its configs and its figures."""

from __future__ import annotations

import pytest

from benchmarks import async_vs_sync as B
from benchmarks.harness import dump_toml


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_each_mode_is_a_valid_config_with_the_long_tailed_delay(tmp_path, mode: str) -> None:
    from shared.config import load_config

    args = B.parse_args(["--quick", "--model", "tiny"])
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(B.run_config(mode, 0, args.steps, args)))
    cfg = load_config(p)
    assert cfg.env.symbols.step_delay_dist == "lognormal"
    assert cfg.actor.sync is (mode == "sync")
    assert cfg.broker.max_staleness == (0 if mode == "sync" else 4)


def _run(wait: float, train: float, other: float, episode_s: float) -> dict:
    entries = [{"time": 10.0 * k, "wait_seconds": wait, "step_seconds": train} for k in range(1, 5)]
    ph = B.phases(entries)
    assert ph["W"] == wait and ph["T"] == train and ph["O"] == pytest.approx(other)
    return {"phases": ph, "episode_s": episode_s, "batch": 64, "concurrency": 128}


def test_ideal_speedup_is_the_sync_step_over_the_slower_overlapped_phase() -> None:
    # W 6 + T 3.5 + O 0.5 = 10 s a step; generation bound 64 x 2 s / 128 = 1 s < T + O = 4 s
    bound = B.ideal([_run(6.0, 3.5, 0.5, 2.0)])
    assert bound["G"] == pytest.approx(1.0)
    assert bound["ideal_speedup"] == pytest.approx(10.0 / 4.0)
    assert bound["ideal_overlap"] == pytest.approx(10.0 / 6.0, abs=1e-3)
    # generation-bound: G = 64 x 10 s / 128 = 5 s > T + O
    assert B.ideal([_run(6.0, 3.5, 0.5, 10.0)])["ideal_speedup"] == pytest.approx(10.0 / 5.0)


def test_rewards_agree_only_within_noise() -> None:
    same = {"async": [{"reward": [0.3, 0.4, 0.35, 0.45]}], "sync": [{"reward": [0.4, 0.3]}]}
    r = B.reward_agreement(same)
    assert r["agrees"] and r["async"] == 0.375 and r["sync"] == 0.35
    apart = {"async": [{"reward": [0.8, 0.81, 0.79, 0.8]}], "sync": [{"reward": [0.3, 0.31]}]}
    assert not B.reward_agreement(apart)["agrees"]


def test_pinning_gives_each_role_its_own_cores_in_both_modes(monkeypatch) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    pinned = B.parse_args(["--quick", "--model", "tiny"])
    assert pinned.pin
    for mode in ("async", "sync"):
        cfg = B.run_config(mode, 0, pinned.steps, pinned)
        assert cfg["actor"]["cpus"] == [0, 1] and cfg["learner"]["cpus"] == [2, 3]
    shared = B.parse_args(["--quick", "--model", "tiny", "--no-pin"])
    cfg = B.run_config("async", 0, shared.steps, shared)
    assert "cpus" not in cfg["actor"] and "cpus" not in cfg["learner"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert B.role_cpus(True) == {}  # one core: nothing to split


def test_max_staleness_bounds_async_only() -> None:
    args = B.parse_args(["--quick", "--model", "tiny", "--max-staleness", "2"])
    assert B.run_config("async", 0, args.steps, args)["broker"]["max_staleness"] == 2
    assert B.run_config("sync", 0, args.steps, args)["broker"]["max_staleness"] == 0
    default = B.parse_args(["--quick", "--model", "tiny"])
    assert B.run_config("async", 0, default.steps, default)["broker"]["max_staleness"] == 4
