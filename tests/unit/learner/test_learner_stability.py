"""Stability controls of the learner on the tiny model: the entropy bonus, lr warm-up (and its
resume from a checkpoint), per-role entropy diagnostics, the ActFocus monitor and the
action-entropy alert as `Trainer.step` reports them."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.batch import collate
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.monitor import actfocus_monitor
from learner.tiny_model import build_tiny_model
from learner.train import Trainer, stability_settings
from shared.config import AlertConfig, CorrectionConfig, LearnerConfig
from shared.protocol import Role, pack
from shared.synthetic import synthetic_batch

LR = 1e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _trainer(model_dir: Path, opt=torch.optim.AdamW, lc: LearnerConfig | None = None, **kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir).double()
    o = opt(model.parameters(), lr=LR)
    return Trainer(model, o, **(stability_settings(lc, o) if lc is not None else {}), **kw)


def _params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


@torch.no_grad()
def _token_stats(trainer: Trainer, trajs) -> tuple[torch.Tensor, torch.Tensor, object]:
    b = collate(trajs, np.zeros(len(trajs)))
    logp, ent = trainer.token_logprobs(b.input_ids, b.attention_mask, b.row, b.pos)
    return logp, ent, b


def _with_reasoning(trajs):
    """The first half of each trajectory's trained tokens become reasoning tokens."""
    out = []
    for t in trajs:
        trained = np.flatnonzero(t.array("loss_mask"))
        role = t.array("role").copy()
        role[trained[: trained.size // 2]] = Role.REASONING
        out.append(msgspec.structs.replace(t, role=pack(role, "role")))
    return out


def test_entropy_bonus_raises_action_entropy(model_dir: Path) -> None:
    trajs = synthetic_batch(2, 4, 24, seed=5)
    entropy, first = {}, {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        trainer = _trainer(model_dir, entropy_coef=coef)
        for _ in range(4):
            diag, _ = trainer.step(trajs)
            first.setdefault(coef, diag)
        _, ent, _ = _token_stats(trainer, trajs)  # every trained token is an action here
        entropy[coef] = float(ent.mean())
    assert entropy[1.0] > entropy[0.0] + 0.01
    # One update at the fetched weights: the bonus is coef x the mean action-token entropy,
    # and the loss is the policy loss minus it.
    d0, d1 = first[0.0], first[1.0]
    assert d0["entropy_bonus"] == 0 and d1["entropy_bonus"] == pytest.approx(d1["entropy_action"])
    assert d1["loss"] == pytest.approx(d0["loss"] - d1["entropy_bonus"], rel=1e-9)


def test_entropy_bonus_only_on_its_roles(model_dir: Path) -> None:
    """With entropy_roles = [reasoning] and no reasoning tokens the bonus is 0 and the update
    is the plain one."""
    trajs = synthetic_batch(2, 2, 16, seed=6)
    sgd = torch.optim.SGD
    plain = _trainer(model_dir, sgd)
    only_reasoning = _trainer(model_dir, sgd, entropy_coef=1.0, entropy_roles=["reasoning"])
    d, _ = only_reasoning.step(trajs)
    plain.step(trajs)
    assert d["entropy_bonus"] == 0
    torch.testing.assert_close(_params(plain), _params(only_reasoning), rtol=0, atol=0)


def test_warmup_lr_per_optimiser_step(model_dir: Path) -> None:
    trajs = synthetic_batch(2, 2, 16, seed=7)
    sgd = torch.optim.SGD
    warm = _trainer(model_dir, sgd, lc=LearnerConfig(lr=LR, warmup_steps=4))
    plain = _trainer(model_dir, sgd)
    before = _params(plain)
    lrs = []
    for k in range(5):
        diag, _ = warm.step(trajs)
        lrs.append(diag["lr"])
        if k == 0:
            # The first optimiser step took lr / warmup_steps: SGD moved a quarter as far.
            plain.step(trajs)
            moved_plain, moved_warm = _params(plain) - before, _params(warm) - before
            torch.testing.assert_close(moved_warm, moved_plain / 4, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(lrs, [LR / 4, LR / 2, 3 * LR / 4, LR, LR], rtol=1e-12)
    assert warm.optimizer.param_groups[0]["lr"] == pytest.approx(LR)

    # Two updates per batch: the schedule counts optimiser steps, not batches.
    two = _trainer(model_dir, sgd, lc=LearnerConfig(lr=LR, warmup_steps=4), minibatches=2)
    assert two.step(trajs)[0]["lr"] == pytest.approx(LR / 2)  # the second update's
    assert two.step(trajs)[0]["lr"] == pytest.approx(LR)
    assert _trainer(model_dir, sgd, lc=LearnerConfig(lr=LR)).scheduler is None  # 0: off


def _run(trainer: Trainer, steps: range) -> list[float]:
    lrs = []
    for s in steps:
        diag, _ = trainer.step(synthetic_batch(2, 2, 16, seed=s, policy_version=s), None, s)
        lrs.append(diag["lr"])
    return lrs


def test_warmup_resumes_from_a_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    lc = LearnerConfig(lr=LR, warmup_steps=6)
    a = _trainer(model_dir, lc=lc)
    _run(a, range(2))
    path = save_checkpoint(
        tmp_path, 2, a.model, a.optimizer, policy_version=2, scheduler=a.scheduler
    )
    expected = _run(a, range(2, 5))
    np.testing.assert_allclose(expected, [3 * LR / 6, 4 * LR / 6, 5 * LR / 6], rtol=1e-12)

    b = _trainer(model_dir, lc=lc)
    load_checkpoint(path, b.model, b.optimizer, scheduler=b.scheduler)
    assert _run(b, range(2, 5)) == expected
    torch.testing.assert_close(_params(a), _params(b), rtol=0, atol=0)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()

    # Without the schedule's state the optimiser's lr is right once, then the warm-up restarts.
    c = _trainer(model_dir, lc=lc)
    load_checkpoint(path, c.model, c.optimizer)
    assert _run(c, range(2, 5)) != expected


def test_role_entropy_and_monitor_match_a_direct_computation(model_dir: Path) -> None:
    trajs = _with_reasoning(synthetic_batch(3, 4, 24, seed=8))
    trainer = _trainer(model_dir)
    logp, ent, b = _token_stats(trainer, trajs)  # the proximal policy: weights as fetched
    diag, _ = trainer.step(trajs)
    action, reasoning = b.role == Role.ACTION, b.role == Role.REASONING
    assert diag["entropy_action"] == pytest.approx(float(ent[action].mean()), rel=1e-9)
    assert diag["entropy_reasoning"] == pytest.approx(float(ent[reasoning].mean()), rel=1e-9)
    assert diag["entropy_reasoning"] != pytest.approx(diag["entropy_action"], rel=1e-6)

    def mean_logp(sel: torch.Tensor) -> np.ndarray:
        return np.array([float(logp[sel & (b.row == i)].mean()) for i in range(len(trajs))])

    by_role = {"action": mean_logp(action), "reasoning": mean_logp(reasoning)}
    groups, rewards = [t.group_id for t in trajs], [t.outcome_reward for t in trajs]
    direct = actfocus_monitor(groups, rewards, by_role)
    assert diag["monitor_groups"] == direct["monitor_groups"] == 3
    for role in ("action", "reasoning"):
        assert np.isfinite(direct[f"monitor_corr_{role}"])
        assert diag[f"monitor_corr_{role}"] == pytest.approx(direct[f"monitor_corr_{role}"])


def test_no_reasoning_tokens_leaves_reasoning_entropy_out(model_dir: Path) -> None:
    diag, _ = _trainer(model_dir).step(synthetic_batch(1, 2, 16, seed=9))
    assert "entropy_reasoning" not in diag and np.isnan(diag["monitor_corr_reasoning"])
    assert np.isfinite(diag["entropy_action"]) and diag["monitor_groups"] == 1


def test_action_entropy_alert_in_a_step(model_dir: Path) -> None:
    trajs = synthetic_batch(1, 2, 16, seed=10)
    quiet = AlertConfig(min_ess=0.0, max_kl_behaviour=0.0, max_masked_fraction=0.0)
    # The tiny random model is near uniform (about log 256 nats): far above the default bound.
    diag, _ = _trainer(model_dir, correction=CorrectionConfig(alert=quiet)).step(trajs)
    assert diag["alerts"] == 0 and "alert_entropy_action" not in diag
    high = msgspec.structs.replace(quiet, min_action_entropy=100.0)
    diag, _ = _trainer(model_dir, correction=CorrectionConfig(alert=high)).step(trajs)
    assert diag["alerts"] == 1 and diag["alert_entropy_action"] == 1


def test_cosine_decay_after_warmup_ends_at_min_lr_ratio() -> None:
    from learner.train import lr_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = lr_scheduler(opt, warmup_steps=2, decay="cosine", decay_steps=10, min_lr_ratio=0.1)
    assert sched is not None
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # never rises again
    assert lrs[9] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    assert lr_scheduler(opt, 0, "constant", 10) is None
