"""Packed micro-batches (`[learner] packing`): trajectories concatenated per row with positions
restarting at 0 give the losses, logprobs and gradients of the right-padded rows (float32,
1e-5), for full fine-tuning, LoRA and the (single-process) ShardedTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner import distributed as D
from learner.batch import collate, pack_rows, plan_micro_batches
from learner.lora import apply_lora
from learner.tiny_model import build_tiny_model
from learner.train import Trainer
from learner.util import seed_everything
from shared.lora_config import LoraConfig
from shared.synthetic import synthetic_batch, trajectory

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _skewed(n: int = 12, longest: int = 96, seed: int = 0) -> list:
    """Long-tailed lengths (most short, one at `longest`), GRPO groups of 4."""
    rng = np.random.default_rng(seed)
    lengths = np.clip((rng.pareto(1.5, n) * longest / 8 + 6).astype(int), 6, longest)
    lengths[0] = longest
    return [
        trajectory(
            f"t{i}",
            f"g{i // 4}",
            n_tokens=int(n_tok),
            reward=float(i % 2),
            behav_logprob=-1.0 - 0.01 * i,
            rng=seed * 1000 + i,
        )
        for i, n_tok in enumerate(lengths)
    ]


def test_pack_rows_first_fit_decreasing() -> None:
    lengths = [5, 9, 2, 7, 3, 1]
    bins = pack_rows(lengths, range(6), 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert bins[0] == [1, 5] and len(bins) == 3  # 9+1, 7+3, 5+2
    assert pack_rows([12, 3], [0, 1], 10) == [[0], [1]]  # too long: a row of its own


def test_packed_micro_batch_layout() -> None:
    trajs = _skewed(8, 40)
    b = collate(trajs, np.zeros(len(trajs)))
    lengths = b.attention_mask.sum(1)
    micros = plan_micro_batches(b, 80, packing=True)
    seen = torch.cat([m.sel for m in micros])
    assert torch.equal(seen.sort().values, torch.arange(b.n_tokens))  # every token once
    for m in micros:
        assert m.position_ids is not None and m.input_ids.numel() <= 80
        assert torch.equal(m.input_ids[m.row, m.pos], b.targets[m.sel])
        # the predicting position is in the same sequence: one step back in position
        assert torch.equal(m.position_ids[m.row, m.pos - 1] + 1, m.position_ids[m.row, m.pos])
        assert int(m.attention_mask.sum()) == int(lengths[b.row[m.sel].unique()].sum())
        restarts = (m.position_ids == 0).sum(1)
        assert int(restarts.sum()) >= int(b.row[m.sel].unique().numel())
    padded = plan_micro_batches(b, 10_000, packing=False)[0]
    packed = plan_micro_batches(b, 10_000, packing=True)[0]
    assert packed.input_ids.numel() < padded.input_ids.numel()
    one = plan_micro_batches(b, 10_000, packing=True, one_row=True)
    assert len(one) == 1 and one[0].input_ids.shape == (1, int(lengths.sum()))


def test_restarting_positions_are_what_separates_the_sequences(model_dir: Path) -> None:
    """Control: the same packed rows with positions that never restart let attention cross
    trajectories, and the logprobs change; with the restarts they equal the padded ones."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    b = collate(_skewed(8, 40), np.zeros(8))
    packed = plan_micro_batches(b, 10_000, packing=True)[0]
    padded = plan_micro_batches(b, 10_000, packing=False)[0]
    assert int((packed.position_ids == 0).sum()) > packed.input_ids.shape[0]  # rows are shared
    with torch.no_grad():
        args = (packed.input_ids, packed.attention_mask, packed.row, packed.pos)
        lp, _ = trainer.token_logprobs(*args, packed.position_ids)
        flat = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        crossed, _ = trainer.token_logprobs(*args, flat)
        ref, _ = trainer.token_logprobs(
            padded.input_ids, padded.attention_mask, padded.row, padded.pos
        )
    torch.testing.assert_close(lp, ref, rtol=0, atol=TOL)
    assert float((crossed - ref).abs().max()) > 1e-3


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(trainer: Trainer, trajs: list, packing: bool) -> tuple[Any, ...]:
    """Token logprobs, the step's loss and the gradient of its first update (lr 0: the
    weights stay, `_optimiser_step` zeroes the grads after clipping; capture them before)."""
    trainer.packing = packing
    b = collate(trajs, np.linspace(-1, 1, len(trajs)))
    logps = []
    for m in plan_micro_batches(b, 256, packing=packing):
        lp, _ = trainer.token_logprobs(m.input_ids, m.attention_mask, m.row, m.pos, m.position_ids)
        logps.append((m.sel, lp.detach()))
    logp = torch.zeros(b.n_tokens)
    for sel, lp in logps:
        logp[sel] = lp
    captured: dict[str, torch.Tensor] = {}
    step = trainer._optimiser_step

    def capture() -> tuple[float, bool]:
        captured.update(_grads(trainer.model))
        return step()

    trainer._optimiser_step = capture  # type: ignore[method-assign]
    try:
        diag, _ = trainer.step(trajs)
    finally:
        del trainer._optimiser_step
    return logp, diag["loss"], captured


def _compare(make_trainer, trajs: list) -> None:
    padded = _loss_and_grads(make_trainer(), trajs, packing=False)
    packed = _loss_and_grads(make_trainer(), trajs, packing=True)
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=TOL)
    assert abs(packed[1] - padded[1]) <= TOL
    assert padded[2].keys() == packed[2].keys() and padded[2]
    for name, g in padded[2].items():
        torch.testing.assert_close(packed[2][name], g, rtol=0, atol=TOL, msg=name)


def _full(model_dir: Path, cls: type[Trainer] = Trainer, **kw: Any):
    def make() -> Trainer:
        seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return cls(model, opt, micro_batch_tokens=256, **kw)

    return make


def test_packed_losses_and_gradients_equal_padded(model_dir: Path) -> None:
    _compare(_full(model_dir), _skewed())


def test_packed_equal_padded_with_minibatches_and_epochs(model_dir: Path) -> None:
    _compare(_full(model_dir, ppo_epochs=2, minibatches=2, entropy_coef=0.01), _skewed(seed=1))


def test_packed_equal_padded_under_lora(model_dir: Path) -> None:
    def make() -> Trainer:
        seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = apply_lora(model, LoraConfig(rank=4))
        with torch.no_grad():  # B = 0 at init: move it so the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        params = [p for p in model.parameters() if p.requires_grad]
        return Trainer(model, torch.optim.SGD(params, lr=0.0), micro_batch_tokens=256)

    _compare(make, _skewed(seed=2))


def test_sharded_trainer_packs_like_trainer(model_dir: Path) -> None:
    _compare(_full(model_dir, cls=D.ShardedTrainer), _skewed(seed=3))


def test_packing_is_the_default_and_step_runs(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert trainer.packing and not trainer.one_row  # sdpa: several rows per pass
    diag, _ = trainer.step(synthetic_batch(2, 4, 24, seed=5))
    assert np.isfinite(diag["loss"]) and diag["skipped"] == 0
