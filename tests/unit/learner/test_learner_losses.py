"""The clipped, IS-corrected token loss and its diagnostics on a hand-computed 4-token case."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import clipped_pg_loss


def _case():
    # token 0: ratio 1.5, w 1,  A +1 -> clipped at 1.2          -> loss_t -1.2
    # token 1: ratio 0.5, w 3 -> capped 2, A -1 -> clipped at 0.8 -> loss_t +1.6
    # token 2: ratio 1,   w 0.5, A +2 -> unclipped               -> loss_t -1.0
    # token 3: masked out (huge ratio and advantage must not matter)
    prox = torch.tensor([-1.0, -2.0, -0.5, -1.0], dtype=torch.float64)
    logp = prox + torch.log(torch.tensor([1.5, 0.5, 1.0, 10.0], dtype=torch.float64))
    logp.requires_grad_(True)
    behav = prox - torch.log(torch.tensor([1.0, 3.0, 0.5, 1.0], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, 2.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0])
    return logp, prox, behav, adv, mask


def test_loss_value_and_diagnostics() -> None:
    logp, prox, behav, adv, mask = _case()
    loss, d = clipped_pg_loss(logp, prox, behav, adv, mask, clip_eps=0.2, is_cap=2.0)
    assert loss.item() == pytest.approx((-1.2 + 1.6 - 1.0) / 3)
    assert d["clip_fraction"] == pytest.approx(2 / 3)
    assert d["ess"] == pytest.approx(3.5**2 / (3 * (1 + 4 + 0.25)))
    assert d["ratio_mean"] == pytest.approx(1.0)
    assert d["ratio_p50"] == pytest.approx(1.0)
    assert d["is_cap_fraction"] == pytest.approx(1 / 3)
    assert d["w_mean"] == pytest.approx(3.5 / 3)
    # k3 with r = pi/mu: tokens 0 and 1 have r = 1.5, token 2 has r = 0.5
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    assert d["kl_behaviour"] == pytest.approx((2 * k3(1.5) + k3(0.5)) / 3)
    assert d["n_tokens"] == 3


def test_gradient_only_through_unclipped_tokens() -> None:
    logp, prox, behav, adv, mask = _case()
    loss, _ = clipped_pg_loss(logp, prox, behav, adv, mask, clip_eps=0.2, is_cap=2.0)
    (g,) = torch.autograd.grad(loss, (logp,))
    # d/dlogp of -w A ratio / N at ratio 1: -0.5 * 2 / 3; clipped and masked tokens get 0
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, -1 / 3, 0.0], dtype=torch.float64))


def test_on_policy_reduces_to_token_mean_pg() -> None:
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(3)
    loss, d = clipped_pg_loss(logp, logp.detach(), logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1 - 2 + 0.5) / 3)
    assert d["clip_fraction"] == 0 and d["ess"] == pytest.approx(1.0)
    assert d["kl_behaviour"] == pytest.approx(0.0)
    (g,) = torch.autograd.grad(loss, (logp,))
    torch.testing.assert_close(g, -adv / 3)


def test_token_weights_and_empty_mask() -> None:
    logp, prox, behav, adv, mask = _case()
    tw = torch.tensor([0.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    loss, _ = clipped_pg_loss(logp, prox, behav, adv, mask, token_weights=tw)
    assert loss.item() == pytest.approx(-2.0 / 3)
    loss, d = clipped_pg_loss(logp, prox, behav, adv, torch.zeros(4))
    assert loss.item() == 0.0 and d["n_tokens"] == 0


def test_asymmetric_clip_bounds() -> None:
    """clip_low 0.1 / clip_high 0.3 (DAPO's clip-higher): the ratio is clamped to [0.9, 1.3]."""
    ratio = torch.tensor([1.25, 1.35, 0.85, 0.95, 0.5, 1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    prox = torch.linspace(-3.0, -0.5, 6, dtype=torch.float64)
    logp = (prox + torch.log(ratio)).requires_grad_(True)
    args = (logp, prox, prox, adv, torch.ones(6))
    loss, d = clipped_pg_loss(*args, clip_eps=0.2, mode="none", clip_low=0.1, clip_high=0.3)
    # 1.25 A+ inside (the symmetric 0.2 clip would cut it); 1.35 A+ clamped at 1.3; 0.85 A-
    # clamped at 0.9 (inside the symmetric clip); 0.95 A- inside; 0.5 A+ and 1.5 A- are on
    # the pessimistic side of min(), never clipped.
    terms = torch.tensor([1.25, 1.3, -0.9, -0.95, 0.5, -1.5], dtype=torch.float64)
    assert loss.item() == pytest.approx(float(-terms.sum() / 6))
    assert d["clip_fraction"] == pytest.approx(2 / 6)
    (g,) = torch.autograd.grad(loss, (logp,))
    inside = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(g, -ratio * adv / 6 * inside)
    # Left unset, both bounds are clip_eps: now 1.25 is cut and 0.85 is not.
    loss, d = clipped_pg_loss(*args, clip_eps=0.2, mode="none")
    (g,) = torch.autograd.grad(loss, (logp,))
    assert (g != 0).tolist() == [False, False, True, True, True, True]
    assert d["clip_fraction"] == pytest.approx(2 / 6)
