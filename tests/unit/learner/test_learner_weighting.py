"""ActFocus / role token weights: role table, conservation, cap, tau -> inf, no gradient."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from learner.weighting import redistribute, role_weights, token_weights
from shared.config import WeightingConfig
from shared.protocol import Role

P, OB, R, A, T = Role.PROMPT, Role.OBSERVATION, Role.REASONING, Role.ACTION, Role.TEMPLATE
F64 = torch.float64


def test_role_weights_default_uniform_and_hicra() -> None:
    role = torch.tensor([P, OB, R, A, T])
    torch.testing.assert_close(role_weights(role, WeightingConfig()), torch.ones(5, dtype=F64))
    w = role_weights(role, WeightingConfig(mode="roles"))
    torch.testing.assert_close(w, torch.tensor([0, 0, 0.1, 1, 0], dtype=F64))
    # HICRA's opposite bias: only the roles named change, the rest keep their defaults.
    hicra = WeightingConfig(mode="roles", role_weights={"reasoning": 2.0, "action": 0.5})
    torch.testing.assert_close(
        role_weights(role, hicra), torch.tensor([0, 0, 2, 0.5, 0.0], dtype=F64)
    )
    with pytest.raises(ValueError, match="answer"):  # roles are a Literal: checked when decoded
        msgspec.convert({"role_weights": {"answer": 1.0}}, WeightingConfig)


def test_redistribute_hand_computed() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4] -> N * p = [0.5, 1.5]
    e = torch.tensor([0.0, math.log(3)], dtype=F64)
    g = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(redistribute(e, g, 1.0, 10.0), torch.tensor([0.5, 1.5], dtype=F64))
    # cap 1.2: the excess 0.3 goes to the other token
    torch.testing.assert_close(redistribute(e, g, 1.0, 1.2), torch.tensor([0.8, 1.2], dtype=F64))


def test_cap_water_filling_and_conservation() -> None:
    # group 0: p = [0.1, 0.1, 0.8] -> [0.3, 0.3, 2.4]; cap 2 -> [0.5, 0.5, 2.0]
    # group 1 (interleaved): one token -> exactly 1
    e = torch.log(torch.tensor([1.0, 1.0, 5.0, 8.0], dtype=F64))
    g = torch.tensor([0, 0, 1, 0])
    w = redistribute(e, g, 1.0, 2.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 1.0, 2.0], dtype=F64))
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(200, generator=gen, dtype=F64) * 3
    g = torch.randint(0, 7, (200,), generator=gen)
    w = redistribute(e, g, 0.5, 2.5)
    for k in range(7):
        assert float(w[g == k].sum()) == pytest.approx(float((g == k).sum()), rel=1e-9)
    assert float(w.max()) <= 2.5 + 1e-9


def test_tau_to_infinity_is_uniform() -> None:
    e = torch.tensor([0.1, 2.0, 5.0], dtype=F64)
    g = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(redistribute(e, g, math.inf, 3.0), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        redistribute(e, g, 1e9, 3.0), torch.ones(3, dtype=F64), rtol=1e-7, atol=1e-7
    )


def test_actfocus_token_weights_per_turn_and_no_grad() -> None:
    # turn 0: reasoning, action (H 0), action (H ln 3); turn 1: reasoning, action
    role = torch.tensor([R, A, A, OB, R, A])
    turn = torch.tensor([0, 0, 0, 1, 1, 1])
    ent = torch.tensor([9.0, 0.0, math.log(3), 9.0, 9.0, 4.0], requires_grad=True)
    cfg = WeightingConfig(mode="actfocus", tau=1.0, w_max=3.0)
    w = token_weights(cfg, role, turn, entropy=ent)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([0.1, 0.5, 1.5, 0.0, 0.1, 1.0], dtype=F64))
    # action weight 2: redistribution keeps the mean action weight at 2
    cfg2 = WeightingConfig(mode="actfocus", role_weights={"action": 2.0})
    w2 = token_weights(cfg2, role, turn, entropy=ent)
    assert float(w2[role == A].mean()) == pytest.approx(2.0)


def test_neg_logprob_energy() -> None:
    role = torch.tensor([A, A])
    logp = torch.tensor([0.0, -math.log(3)])  # -logp = [0, ln 3]
    cfg = WeightingConfig(mode="actfocus", energy="neg_logprob")
    w = token_weights(cfg, role, torch.zeros(2), logp=logp)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5], dtype=F64))
    with pytest.raises(ValueError, match="neg_logprob"):
        token_weights(cfg, role, torch.zeros(2), entropy=logp)
