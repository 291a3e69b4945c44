"""GRPO and RLOO advantages against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.advantages import grpo_advantages, rloo_advantages

# Group "a" is interleaved with others to check the id -> group mapping.
REWARDS = [1.0, 2.0, 0.0, 3.0, 1.0, 2.0, 0.0]
GROUPS = ["a", "b", "a", "c", "a", "b", "a"]


def test_grpo_hand_computed() -> None:
    adv = grpo_advantages(REWARDS, GROUPS, eps=0.0)
    # a: mean 0.5, population std 0.5 -> +-1; b: zero variance -> 0; c: single -> 0
    np.testing.assert_allclose(adv, [1, 0, -1, 0, 1, 0, -1], atol=1e-7)
    assert adv.dtype == np.float32


def test_grpo_eps_and_no_std_scaling() -> None:
    adv = grpo_advantages([2.0, 0.0], ["g", "g"], eps=1e-6)
    np.testing.assert_allclose(adv, [1 / (1 + 1e-6), -1 / (1 + 1e-6)], rtol=1e-6)
    adv = grpo_advantages([2.0, 0.0, 5.0], ["g", "g", "h"], scale_by_std=False)
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0])


def test_rloo_hand_computed() -> None:
    adv = rloo_advantages(REWARDS, GROUPS)
    # r_i - mean of the other three in group a: 1 - 1/3 and 0 - 2/3
    np.testing.assert_allclose(adv, [2 / 3, 0, -2 / 3, 0, 2 / 3, 0, -2 / 3], atol=1e-7)


def test_zero_variance_is_exactly_zero_and_torch_in_torch_out() -> None:
    r = torch.tensor([0.1, 0.1, 0.1, 0.7])
    adv = grpo_advantages(r, [0, 0, 0, 1])
    assert isinstance(adv, torch.Tensor) and torch.all(adv == 0)
    assert torch.all(rloo_advantages(r, [0, 0, 0, 1]) == 0)


def test_length_mismatch() -> None:
    with pytest.raises(ValueError):
        grpo_advantages([1.0, 2.0], ["a"])
