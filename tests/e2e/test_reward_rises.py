"""`headrace run` end to end: with fixed seeds, mean reward rises clearly within a few minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import free_port, write_config

pytestmark = pytest.mark.e2e

STEPS = 60
WINDOW = 10


def test_headrace_run_raises_reward(tmp_path, tiny_model):
    cfg = write_config(
        tmp_path / "e2e.toml",
        tiny_model,
        env={
            "levels": [1],
            "tasks_per_level": 32,
            "n_turns": 2,
            "reasoning_tokens": 2,
            "seed": 0,
        },
        broker={"port": free_port(), "metrics_port": free_port(), "group_size": 8},
        actor={"metrics_port": free_port(), "max_concurrent_episodes": 32, "seed": 0},
        learner={
            "steps": STEPS,
            "batch_groups": 4,
            "lr": 1e-2,
            "seed": 0,
            "weights_port": free_port(),
            "metrics_port": free_port(),
        },
    )
    summary = tmp_path / "summary.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "run",
            "--config",
            str(cfg),
            "--summary-json",
            str(summary),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads(summary.read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["policy_version"] == STEPS
    rewards = [s["reward_mean"] for s in steps]
    first = sum(rewards[:WINDOW]) / WINDOW
    last = sum(rewards[-WINDOW:]) / WINDOW
    print(f"reward first {WINDOW} steps {first:.3f}, last {WINDOW} steps {last:.3f}")
    assert last > first + 0.15, (first, last, rewards)
