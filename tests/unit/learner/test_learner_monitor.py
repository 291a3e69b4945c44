"""The ActFocus monitor and per-role entropy (learner/monitor.py) on hand-made batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.monitor import (
    actfocus_monitor,
    pearson,
    role_diagnostics,
    role_entropy,
    trajectory_role_means,
)
from shared.protocol import Role

NAN = float("nan")


def test_pearson() -> None:
    x, y = np.array([1.0, 0.0, 1.0, 0.0]), np.array([-0.5, -2.0, -1.0, -1.5])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(x, y) == pytest.approx(1 / math.sqrt(1.25))
    assert math.isnan(pearson(x, np.ones(4)))  # constant: undefined
    assert math.isnan(pearson(np.array([1.0]), np.array([2.0])))


def test_monitor_on_hand_made_groups() -> None:
    groups = ["a"] * 4 + ["b"] * 2 + ["c"] * 2 + ["d"]
    rewards = [1, 0, 1, 0] + [1, 0] + [1, 1] + [0]
    action = np.array([-0.5, -2.0, -1.0, -1.5] + [-2.0, -1.0] + [-1.0, -3.0] + [-1.0])
    # group a: trajectory 3 wrote no reasoning; group b: equal reasoning logprobs
    reasoning = np.array([-1.0, -1.2, -1.1, NAN] + [-1.0, -1.0] + [-1.0, -2.0] + [-1.0])
    out = actfocus_monitor(groups, rewards, {"action": action, "reasoning": reasoning})
    # c (equal rewards) and d (one trajectory) have no reward variance: not counted
    assert out["monitor_groups"] == 2
    # a: corr([1,0,1,0], action) = 1/sqrt(1.25); b: rewards 1, 0 vs logp -2, -1: -1
    assert out["monitor_corr_action"] == pytest.approx((1 / math.sqrt(1.25) - 1) / 2)
    # a without trajectory 3: corr([1,0,1], [-1,-1.2,-1.1]) = sqrt(3)/2; b undefined, left out
    assert out["monitor_corr_reasoning"] == pytest.approx(math.sqrt(3) / 2)


def test_monitor_without_signal_is_nan() -> None:
    out = actfocus_monitor(["a", "a"], [1.0, 1.0], {"action": np.array([-1.0, -2.0])})
    assert out["monitor_groups"] == 0 and math.isnan(out["monitor_corr_action"])
    out = actfocus_monitor([], [], {"action": np.zeros(0)})
    assert out["monitor_groups"] == 0 and math.isnan(out["monitor_corr_action"])


def test_role_means_and_entropy() -> None:
    A, R, P = int(Role.ACTION), int(Role.REASONING), int(Role.PROMPT)
    row = torch.tensor([0, 0, 0, 1, 1, 2])
    role = torch.tensor([R, A, A, A, P, P])
    vals = torch.tensor([-1.0, -2.0, -4.0, -0.5, -9.0, -9.0], dtype=torch.float64)
    means = {r: trajectory_role_means(row, role, vals, 3, r) for r in ("action", "reasoning")}
    np.testing.assert_allclose(means["action"], [-3, -0.5, NAN])
    np.testing.assert_allclose(means["reasoning"], [-1, NAN, NAN])
    ent = torch.tensor([3.0, 1.0, 2.0, 0.0, 7.0, 7.0])
    assert role_entropy(role, ent) == {"entropy_action": 1.0, "entropy_reasoning": 3.0}
    assert role_entropy(torch.tensor([P, P]), torch.ones(2)) == {}  # no such tokens: left out


def test_role_diagnostics_combines_both() -> None:
    A, R = int(Role.ACTION), int(Role.REASONING)
    row = torch.tensor([0, 0, 1, 1])
    role = torch.tensor([R, A, R, A])
    logp = torch.tensor([-1.0, -0.5, -2.0, -3.0], dtype=torch.float64)
    ent = torch.tensor([2.0, 0.2, 4.0, 0.4], dtype=torch.float64)
    d = role_diagnostics(role, row, logp, ent, ["g", "g"], [1.0, 0.0])
    assert d["entropy_action"] == pytest.approx(0.3) and d["entropy_reasoning"] == pytest.approx(3)
    assert d["monitor_groups"] == 1
    assert d["monitor_corr_action"] == pytest.approx(1.0)  # two points: +-1
    assert d["monitor_corr_reasoning"] == pytest.approx(1.0)
