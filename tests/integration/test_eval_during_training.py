"""`[learner] eval_every` on real processes: the broker hands held-out tasks to the actor as
eval leases while training goes on; their scores reach the learner's summary and the broker's
`headrace_eval_*` metrics, and not one evaluation episode is stored for training."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from broker.curriculum.banks import SymbolsBank
from broker.store.schema import DB_NAME
from shared.config import EnvConfig
from tests.helpers import free_port, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ENV = {"levels": [1, 2], "tasks_per_level": 16, "n_turns": 2, "reasoning_tokens": 2}


def test_periodic_evaluation_scores_held_out_tasks_and_stores_none(
    tmp_path: Path, tiny_model: Path
) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path / "run.toml",
        tiny_model,
        **{"env.symbols": ENV},
        broker={"port": port, "metrics_port": 0},
        actor={"metrics_port": 0},
        learner={
            "steps": 4,
            "metrics_port": 0,
            "weights_port": 0,
            "eval_every": 2,
            "eval_tasks": 3,
            "eval_samples": 2,
            "eval_timeout_s": 240.0,
        },
    )
    summary = tmp_path / "summary.json"
    argv = [sys.executable, "-m", "shared.cli", "run", "--config", str(cfg)]
    argv += ["--summary-json", str(summary), "--run-dir", str(tmp_path / "run")]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=540)
    broker_log = (tmp_path / "run" / "broker.log").read_text(errors="replace")
    assert res.returncode == 0, res.stderr[-3000:] + broker_log[-3000:]

    evals = json.loads(summary.read_text())["evals"]
    # every eval_every steps, and the final policy (step 4, already a multiple: once)
    assert [(e["step"], e["policy_version"]) for e in evals] == [(2, 2), (4, 4)], evals
    for e in evals:
        assert e["n"] == 6 and e["k"] == 2 and e["episodes"] == 12, e  # 3 tasks x 2 families
        assert set(e["families"]) == {"L1", "L2"}, e
        assert 0.0 <= e["pass_at_1"] <= e["pass_at_k"] <= 1.0, e
        # played by the policy it names or a newer one, never an older one
        assert e["policy_version_max"] >= e["policy_version_min"] >= e["policy_version"], e
    assert "evaluation of policy v4 done" in broker_log

    # the held-out tasks were played (outcomes), never stored as training data
    bank = SymbolsBank(msgspec.convert({"symbols": ENV}, EnvConfig))
    held_out = {t.task_id for ts in bank.heldout(3).values() for t in ts}
    with sqlite3.connect(tmp_path / "run" / "broker" / DB_NAME) as db:
        stored = {row[0] for row in db.execute("SELECT task_id FROM trajectories")}
    assert stored, "training trajectories were stored"
    assert not stored & held_out, sorted(stored & held_out)
