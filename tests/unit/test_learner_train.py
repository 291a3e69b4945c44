"""One learner step on a synthetic batch (no broker): weights move the right way."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.synthetic import synthetic_batch as make_batch
from learner.tiny_model import build_tiny_model
from learner.train import Trainer, collate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _logp_by_sign(trainer: Trainer, trajs, adv: np.ndarray) -> tuple[float, float]:
    b = collate(trajs, adv)
    with torch.no_grad():
        lp, _ = trainer.token_logprobs(b.input_ids, b.attention_mask, b.row, b.pos)
    return float(lp[b.advantages > 0].mean()), float(lp[b.advantages < 0].mean())


def test_collate_shifts_and_masks() -> None:
    trajs = make_batch(1, 2, 12)
    b = collate(trajs, np.array([1.0, -1.0]))
    assert b.input_ids.shape[0] == 2 and torch.all(b.pos >= 1)
    t0 = trajs[0]
    first = b.row == 0
    start = max(1, t0.n_tokens // 4)
    np.testing.assert_array_equal(b.targets[first].numpy(), t0.array("token_ids")[start:])
    assert torch.all(b.advantages[first] == 1) and torch.all(b.advantages[~first] == -1)


def test_one_step_raises_logprob_of_positive_advantage_tokens(model_dir: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model, opt, temperature=1.0)
    trajs = make_batch(2, 4, 32)
    before = copy.deepcopy(model.state_dict())

    diag, adv = trainer.step(trajs)
    np.testing.assert_allclose(adv, [-1, 1, -1, 1] * 2, atol=1e-5)
    assert diag["n_tokens"] > 0 and np.isfinite(diag["loss"]) and diag["skipped"] == 0
    assert diag["reward_mean"] == pytest.approx(0.5) and diag["pass_rate"] == pytest.approx(0.5)
    assert diag["clip_fraction"] == 0  # ratio is exactly 1 on the single update
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and len(changed) > 10

    model_before = AutoModelForCausalLM.from_pretrained(model_dir)
    pos_before, neg_before = _logp_by_sign(Trainer(model_before, opt), trajs, adv)
    pos_after, neg_after = _logp_by_sign(trainer, trajs, adv)
    assert pos_after > pos_before and neg_after < neg_before
    # The loss evaluated at the new weights (same prox/behaviour) went down.
    diag2, _ = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0)).step(trajs)
    assert diag2["loss"] < diag["loss"]


def test_micro_batching_matches_full_batch(model_dir: Path) -> None:
    trajs = make_batch(2, 4, 24, seed=3)
    params = []
    for micro in (10_000, 40):
        model = AutoModelForCausalLM.from_pretrained(model_dir).double()
        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=1.0), micro_batch_tokens=micro
        )
        diag, _ = trainer.step(trajs)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-9, atol=1e-12)


def test_step_timing_32x64(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    trajs = make_batch(4, 8, 64)
    trainer.step(trajs)  # warm-up
    t0 = time.perf_counter()
    trainer.step(trajs)
    elapsed = time.perf_counter() - t0
    print(f"one step, 32 trajectories x <=64 tokens, tiny model: {elapsed * 1000:.1f} ms")
    assert elapsed < 10
