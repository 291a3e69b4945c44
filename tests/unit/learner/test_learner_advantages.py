"""GRPO, RLOO, turn-level (TRLOO) and GiGPO advantages against hand-computed values."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from learner.advantages import (
    compute_advantages,
    gigpo_advantages,
    grpo_advantages,
    rloo_advantages,
    turn_level_advantages,
    turn_returns,
)
from shared import synthetic
from shared.config import AdvantageConfig
from shared.protocol import TurnInfo

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


def test_turn_returns() -> None:
    np.testing.assert_allclose(turn_returns([1.0, 0.0, 1.0]), [2, 1, 1])
    np.testing.assert_allclose(turn_returns([1.0, 0.0, 1.0], gamma=0.5), [1.25, 0.5, 1])


def test_trloo_hand_computed() -> None:
    # group a: turn rewards [1,0,1], [0,1], [0,0,0] -> returns [2,1,1], [1,1], [0,0,0]
    #   turn 0: G = 2, 1, 0 -> 2 - 1/2, 1 - 2/2, 0 - 3/2
    #   turn 1: G = 1, 1, 0 -> 1 - 1/2, 1 - 1/2, 0 - 1
    #   turn 2: only trajectories 0 and 2 reached it: 1 - 0, 0 - 1
    # group b: one trajectory, no baseline -> 0
    rets = [turn_returns(r) for r in ([1, 0, 1], [0, 1], [0, 0, 0], [1, 1])]
    adv = turn_level_advantages(rets, ["a", "a", "a", "b"])
    np.testing.assert_allclose(adv[0], [1.5, 0.5, 1.0])
    np.testing.assert_allclose(adv[1], [0.0, 0.5])
    np.testing.assert_allclose(adv[2], [-1.5, -1.0, -1.0])
    np.testing.assert_allclose(adv[3], [0.0, 0.0])


def test_gigpo_hand_computed() -> None:
    # Episode level (GRPO over outcomes 1, 0, 1, 0): +1, -1, +1, -1.
    # Step level, returns from each step:
    #   t0 [1, 0, 1, 0] all from state s0 -> +1, -1, +1, -1
    #   s1 at t1 of trajectories 0, 2, 3 with returns 1, 1, 0: mean 2/3, std sqrt(2)/3
    #      -> +1/sqrt(2), +1/sqrt(2), -sqrt(2)
    #   s2 (trajectory 1 only) and "" (no key) are singletons -> 0
    rets = [np.array([1.0, 1.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([0.0, 0])]
    keys = [["s0", "s1"], ["s0", "s2"], ["s0", "s1"], ["s0", "s1"]]
    adv = gigpo_advantages([1, 0, 1, 0], rets, keys, ["g"] * 4, step_weight=0.5, eps=0.0)
    h = 1 / np.sqrt(2)
    np.testing.assert_allclose(adv[0], [1.5, 1 + 0.5 * h])
    np.testing.assert_allclose(adv[1], [-1.5, -1.0])
    np.testing.assert_allclose(adv[2], [1.5, 1 + 0.5 * h])
    np.testing.assert_allclose(adv[3], [-1.5, -1 - 0.5 * np.sqrt(2)])
    keys[1][1] = keys[3][1] = ""  # empty keys never form a group
    adv = gigpo_advantages([1, 0, 1, 0], rets, keys, ["g"] * 4, step_weight=0.5, eps=0.0)
    np.testing.assert_allclose(adv[3], [-1.5, -1.0])
    np.testing.assert_allclose(adv[0], [1.5, 1.0])  # s1 now holds two equal returns


def _traj(i: int, group: str, rewards: list[float], termination: str = "done"):
    t = synthetic.trajectory(f"t{i}", group, n_tokens=8, reward=sum(rewards), rng=i)
    turns = [TurnInfo(reward=r, done=False, truncated=False, action_valid=True) for r in rewards]
    return msgspec.structs.replace(t, turns=turns, termination=termination)


def test_compute_advantages_estimators_and_mask_truncated() -> None:
    trajs = [_traj(0, "g", [1, 1]), _traj(1, "g", [0, 1]), _traj(2, "g", [0, 0], "max_turns")]
    grpo = compute_advantages(trajs, AdvantageConfig())
    assert grpo.keep.all() and len(grpo.per_turn[0]) == 1
    assert grpo.per_turn[2][0] < 0  # trained as a failure by default
    masked = compute_advantages(trajs, AdvantageConfig(mask_truncated=True))
    assert masked.keep.tolist() == [True, True, False]
    # the truncated rollout left the baseline: the other two are +-1 between themselves
    np.testing.assert_allclose([masked.per_turn[0][0], masked.per_turn[1][0]], [1, -1], atol=1e-5)
    assert masked.per_turn[2].tolist() == [0.0]
    turn = compute_advantages(trajs, AdvantageConfig(estimator="turn_level"))
    # returns [2, 1], [1, 1], [0, 0]: turn 0 -> 2 - 1/2, 1 - 1, 0 - 3/2; turn 1 -> .5, .5, -1
    np.testing.assert_allclose(turn.per_turn[0], [1.5, 0.5])
    np.testing.assert_allclose(turn.per_token(2, np.array([0, 1, 1, 5])), [-1.5, -1, -1, -1])
    rloo = compute_advantages(trajs, AdvantageConfig(estimator="rloo"))
    np.testing.assert_allclose(rloo.per_turn[0], [2 - 0.5])
