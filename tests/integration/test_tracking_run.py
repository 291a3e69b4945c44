"""A short `headrace run` as a person sees it: TensorBoard events and sampled completions in
the run dir, a closing summary with the command that evaluates the final checkpoint, and
`headrace plot` drawing the run's curves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import free_port, write_config

pytestmark = pytest.mark.integration


def test_a_short_run_is_tracked_summarised_and_plotted(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(
        tmp_path / "run.toml",
        tiny_model,
        broker={"port": free_port(), "metrics_port": 0},
        actor={"metrics_port": 0},
        learner={"steps": 3, "weights_port": free_port(), "metrics_port": 0},
        logging={"completions_per_step": 2},
    )
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "shared.cli"]
    argv = [*cli, "run", "--config", str(config), "--run-dir", str(run_dir)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    tb = run_dir / "learner" / "tb"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"train/reward_mean", "train/pass_rate", "entropy/action", "offpolicy/ess"} <= set(
        acc.Tags()["scalars"]
    )
    assert [e.step for e in acc.Scalars("train/reward_mean")] == [1, 2, 3]
    lines = (tb / "completions.jsonl").read_text().splitlines()
    completions = [json.loads(line) for line in lines]
    assert [c["step"] for c in completions] == [1, 1, 2, 2, 3, 3]
    assert all(c["text"].strip() and c["family"] == "L1" for c in completions), completions

    # the closing summary, not a progress bar redrawn per step (stderr is not a TTY here)
    ckpt = run_dir / "learner" / "step_000003"
    assert f"headrace eval --checkpoint {ckpt} --config {config}" in res.stderr
    assert "means of the first and last 1 step" in res.stderr
    assert "published policy" not in res.stderr  # per-step chatter is DEBUG

    plot = subprocess.run([*cli, "plot", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    for name in ("reward.png", "pass_rate.png", "entropy.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
