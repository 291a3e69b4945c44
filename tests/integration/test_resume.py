"""A learner started against a new broker next to an old run's checkpoints: refused, then
`--fresh` trains (real broker and learner processes, a synthetic actor, the tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Proc, free_port, wait_for, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_a_checkpoint_of_another_run_is_refused_and_fresh_starts_over(tmp_path, tiny_model):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        broker={"port": port, "metrics_port": 0},
        learner={"weights_port": free_port(), "metrics_port": 0, "steps": 1},
    )
    # What an earlier run left in the default checkpoint dir: it reached its step limit.
    ckpt = tmp_path / "learner"
    old = ckpt / "step_000030"
    old.mkdir(parents=True)
    state = {
        "step": 30,
        "extra": {"run": {"run_id": "20260101-000000-0ld0ld", "config_digest": "x"}},
    }
    (old / "state.json").write_text(json.dumps(state))
    learner = [sys.executable, "-m", "learner", "--config", str(cfg), "--broker", endpoint]
    learner += ["--checkpoint-dir", str(ckpt), "--no-progress"]
    learner += ["--set", "learner.checkpoint_every=1"]
    env = {"PYTHONPATH": str(REPO)}
    procs = [
        Proc(
            "broker", ["broker", "--config", str(cfg), "--data-dir", str(tmp_path / "b")], tmp_path
        ),
        Proc(
            "stub",
            ["tests.synthetic_actor", "--broker", endpoint, "--acked", str(tmp_path / "acked")]
            + ["--n-tokens", "32"],
            tmp_path,
            env=env,
        ),
    ]
    try:
        res = subprocess.run(learner, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"headrace-learner: checkpoint {old} is not this run's"), last
        assert "20260101-000000-0ld0ld" in last and "--resume" in last and "--fresh" in last
        assert (old / "state.json").is_file()  # left as it was

        res = subprocess.run([*learner, "--fresh"], capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        (aside,) = tmp_path.glob("learner.aside-*")
        assert (aside / "step_000030" / "state.json").is_file()
        assert str(aside) in res.stderr
        new = json.loads((ckpt / "step_000001" / "state.json").read_text())
        run_id = new["extra"]["run"]["run_id"]
        assert run_id not in ("", "20260101-000000-0ld0ld")
        assert f"broker {run_id} listening" in procs[0].tail(200)  # the broker's run id
    finally:
        for p in procs:
            p.stop(timeout=15)
    wait_for(lambda: not any(p.alive() for p in procs), 30, "the roles to stop")
