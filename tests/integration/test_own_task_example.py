"""README "Train on your own task", run as written: `headrace run --config
examples/my_task/config.toml --steps 3` from the checkout trains on the example's dataset
(broker, actor and learner processes, the tiny model). Only ports, the run directory and the
model folder are set from here, with `--set`, so the test shares nothing with other runs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.curriculum.factory import make_bank
from broker.store.schema import DB_NAME
from shared.config import load_config
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

CONFIG = "examples/my_task/config.toml"


def test_the_readme_example_trains(tmp_path: Path, tiny_model: Path, repo_root: Path) -> None:
    run_dir, summary = tmp_path / "run", tmp_path / "summary.json"
    sets = {
        "model.path": str(tiny_model),
        "broker.port": free_port(),
        "broker.metrics_port": 0,
        "actor.metrics_port": 0,
        "learner.metrics_port": 0,
        "learner.weights_port": 0,
    }
    argv = [sys.executable, "-m", "shared.cli", "run", "--config", CONFIG, "--steps", "3"]
    argv += ["--run-dir", str(run_dir), "--summary-json", str(summary)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    res = subprocess.run(argv, cwd=repo_root, capture_output=True, text=True, timeout=360)
    broker_log = (run_dir / "broker.log").read_text(errors="replace")
    assert res.returncode == 0, res.stderr[-3000:] + broker_log[-2000:]

    steps = json.loads(summary.read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(0.0 <= s["reward_mean"] <= 1.0 for s in steps), steps
    assert "bad rows" not in broker_log

    # The episodes were the dataset's rows, scored by task.py (done, not env errors), and no
    # held-out row was trained on.
    bank = make_bank(load_config(repo_root / CONFIG).env)
    held = {t.task_id for ts in bank.heldout(100).values() for t in ts}
    assert held  # eval_fraction = 0.1 of 50 rows
    with sqlite3.connect(run_dir / "broker" / DB_NAME) as db:
        rows = db.execute("SELECT task_id, reward FROM trajectories").fetchall()
    assert rows and all(task_id.startswith("ds-") for task_id, _ in rows)
    assert not {task_id for task_id, _ in rows} & held
    rewards = {round(r, 3) for _, r in rows}
    assert rewards <= {0.0, 0.2, 1.0} and rewards & {0.2, 1.0}, rewards  # score() ran
