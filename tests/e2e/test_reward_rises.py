"""`make demo` end to end: the demo config learns a task that a symbol-blind policy cannot
solve (its blind ceiling is chance, 0.25 reward), through the whole pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from benchmarks.harness import dump_toml, loopback_run, tail
from broker.curriculum.banks import SymbolsBank
from shared.config import EnvConfig

pytestmark = pytest.mark.e2e

DEMO = Path(__file__).resolve().parents[2] / "ops" / "configs" / "demo.toml"
# The demo's goal (README: measured per seed): a mean reward of at least 0.9 over the last 10
# steps, where any symbol-blind policy scores 0.25.
MIN_FINAL_REWARD = 0.9
# ... and a held-out pass@1 (tasks of the same level it never trained on) of at least 0.8 at
# the end, where a symbol-blind policy has 0.25
MIN_HELD_OUT_PASS = 0.8


def test_demo_learns_the_symbols_it_is_shown(tmp_path: Path, tiny_model: Path) -> None:
    base = tomllib.loads(DEMO.read_text())
    steps = int(base["learner"]["steps"])
    cfg = loopback_run(base, seed=0, steps=steps)
    cfg["model"].update(path=str(tiny_model), build_tiny_if_missing=False)
    cfg["broker"]["data_dir"] = str(tmp_path / "broker")
    cfg["learner"]["checkpoint_dir"] = str(tmp_path / "learner")
    (tmp_path / "demo.toml").write_text(dump_toml(cfg))
    ceiling = SymbolsBank(msgspec.convert(cfg["env"], EnvConfig)).blind_ceiling()
    assert ceiling["reward"] == pytest.approx(0.25)

    summary = tmp_path / "summary.json"
    argv = [sys.executable, "-m", "shared.cli", "run", "--config", str(tmp_path / "demo.toml")]
    argv += ["--summary-json", str(summary), "--run-dir", str(tmp_path / "run")]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    entries = json.loads(summary.read_text())["steps"]
    assert [s["step"] for s in entries] == list(range(1, steps + 1))
    rewards = [s["reward_mean"] for s in entries]
    final = tail(rewards)
    print(f"final reward {final:.3f} (blind ceiling {ceiling['reward']:.3f})")
    assert final >= MIN_FINAL_REWARD, rewards
    # it learned the symbols: the action entropy did not collapse to a deterministic guess
    assert entries[-1]["entropy_action"] > 0.01
    # and it reads them on tasks it never trained on: the held-out evaluation rounds
    evals = json.loads(summary.read_text())["evals"]
    every = int(base["learner"]["eval_every"])
    assert [e["step"] for e in evals] == list(range(every, steps + 1, every)), evals
    held_out = evals[-1]["pass_at_1"]
    print(f"held-out pass@1 {[round(e['pass_at_1'], 3) for e in evals]} (blind ceiling 0.25)")
    assert held_out >= MIN_HELD_OUT_PASS, evals[-1]
