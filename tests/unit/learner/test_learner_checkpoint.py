"""Checkpoint save -> load restores params, optimizer state, RNG and counters; pruning works;
training resumed from a checkpoint continues bit-identically."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.checkpoint import latest, load_checkpoint, save_checkpoint
from learner.tiny_model import build_tiny_model
from learner.train import Trainer
from learner.util import seed_everything
from shared.synthetic import synthetic_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _train_a_bit(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    ids = torch.randint(0, 256, (2, 9))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_roundtrip_restores_everything(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    _train_a_bit(model, opt)

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(
        tmp_path, 7, model, opt, policy_version=7, broker_cursor=123, copy_from=model_dir
    )
    assert path.name == "step_000007" and latest(tmp_path) == path
    assert (path / "tokenizer.json").is_file() and (path / "trainer/optimizer.json").is_file()
    assert not list(path.glob("trainer/*.pkl")) and not list(path.glob("*.bin"))
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    # A fresh model + optimizer that diverged, and scrambled RNGs.
    model2 = AutoModelForCausalLM.from_pretrained(model_dir)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    st = load_checkpoint(path, model2, opt2)
    assert (st.step, st.policy_version, st.broker_cursor) == (7, 7, 123)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert isinstance(s2["param_groups"][0]["betas"], tuple)
    for i, st1 in s1["state"].items():
        for name, t in st1.items():
            assert torch.equal(t, s2["state"][i][name]), (i, name)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws

    # Training continues identically from the restored pair.
    torch.manual_seed(1)
    _train_a_bit(model, opt, 1)
    torch.manual_seed(1)
    _train_a_bit(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_latest_ignores_incomplete_and_keeps_three(model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, None, policy_version=step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_000003", "step_000004", "step_000005"]
    (tmp_path / "step_000009").mkdir()  # a crash left a dir with no state.json
    (tmp_path / ".tmp-step_000010-x").mkdir()
    assert latest(tmp_path) == tmp_path / "step_000005"
    # Re-saving an existing step replaces it atomically.
    save_checkpoint(tmp_path, 5, model, None, policy_version=6)
    assert json.loads((tmp_path / "step_000005/state.json").read_text())["policy_version"] == 6
    assert latest(tmp_path / "nope") is None


def _resume_parts(model_dir: Path) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    # Linear warm-up over 4 steps, so the resumed run must also pick up the LR schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    # Two minibatches: each step draws a permutation from the torch RNG.
    return Trainer(model, opt, minibatches=2), sched


def _train_steps(trainer: Any, sched: Any, steps: range) -> None:
    for s in steps:
        trajs = synthetic_batch(n_groups=2, group_size=3, n_tokens=20, seed=s, policy_version=s)
        trainer.step(trajs, None, s)
        sched.step()


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_resume_is_exact(model_dir: Path, tmp_path: Path) -> None:
    """N steps, checkpoint, M steps == N steps, checkpoint, fresh objects from it, M steps."""
    n, m = 2, 2
    seed_everything(3)
    trainer, sched = _resume_parts(model_dir)
    _train_steps(trainer, sched, range(n))
    path = save_checkpoint(
        tmp_path,
        n,
        trainer.model,
        trainer.optimizer,
        policy_version=n,
        broker_cursor=41,
        scheduler=sched,
    )
    _train_steps(trainer, sched, range(n, n + m))
    draws = _draws()

    seed_everything(99)  # a new process: other RNG streams, fresh model and optimizer
    trainer2, sched2 = _resume_parts(model_dir)
    st = load_checkpoint(path, trainer2.model, trainer2.optimizer, scheduler=sched2)
    assert (st.step, st.policy_version, st.broker_cursor) == (n, n, 41)
    _train_steps(trainer2, sched2, range(st.step, st.step + m))

    a, b = trainer.model.state_dict(), trainer2.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = trainer.optimizer.state_dict(), trainer2.optimizer.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st1 in s1["state"].items():
        for name, t in st1.items():
            assert torch.equal(t, s2["state"][i][name]), (i, name)
    assert sched.state_dict() == sched2.state_dict()
    assert _draws() == draws  # and both runs leave the RNG streams in the same state
