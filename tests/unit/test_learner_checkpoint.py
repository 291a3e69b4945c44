"""Checkpoint save -> load restores params, optimizer state, RNG and counters; pruning works."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.checkpoint import latest, load_checkpoint, save_checkpoint
from learner.tiny_model import build_tiny_model


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
