"""Per-token loss weights by token role (ActFocus, and its opposite for HICRA-style tests).

ActFocus finds the training signal concentrated on the few action tokens of an agentic
trajectory ("Action Bottleneck"), so it (1) down-weights reasoning tokens and (2) moves
action-token weight towards the more uncertain action tokens. Modes of `[learner.weighting]`:

- "uniform":  every trained token weighs 1 (plain PPO / GRPO).
- "roles":    w_t = role_weights[role_t] (e.g. reasoning 0.1, action 1, the rest 0; or
              reasoning > action to test HICRA's hypothesis that planning tokens matter most).
- "actfocus": role weights, then within each turn the action tokens' weights become
              role_weights["action"] * N * softmax(E / tau) over that turn's N action tokens,
              each capped at w_max times the turn mean with the excess spread over the others.
              The sum over a turn's action tokens is unchanged, so the mean action weight is
              conserved and the loss denominator (the sum of role weights) stays valid.

The energy E_t is the proximal policy's entropy at the token (from the fused kernel, no extra
pass) or -log pi_prox(y_t). Weights are computed once per batch without gradient: they steer
the update, they are not optimised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from shared.config import WeightingConfig
from shared.config_learner import Role as RoleName
from shared.protocol import Role


def role_weight_table(role_weights: Mapping[RoleName, float]) -> Tensor:
    """[n_roles] weight per `Role` value; roles not named weigh 0."""
    table = torch.zeros(max(Role) + 1, dtype=torch.float64)
    for name, w in role_weights.items():
        table[Role[name.upper()]] = float(w)
    return table


def role_weights(role: Tensor, cfg: WeightingConfig) -> Tensor:
    """The per-token weight before any redistribution (1 everywhere in "uniform" mode)."""
    if cfg.mode == "uniform":
        return torch.ones(role.shape, dtype=torch.float64)
    table = role_weight_table(cfg.role_weights)
    r = role.long().cpu()
    known = (r >= 0) & (r < table.numel())
    return torch.where(known, table[r.clamp(0, table.numel() - 1)], 0.0)


@torch.no_grad()
def redistribute(energy: Tensor, group: Tensor, tau: float, w_max: float) -> Tensor:
    """N_g * softmax(E / tau) within each group g (N_g tokens), capped at w_max.

    Capping is water-filling: tokens over the cap are set to it and the mass they lose goes to
    the uncapped tokens of their group in proportion to their softmax, repeated until none is
    over. Each group's sum stays N_g (mean 1) as long as w_max >= 1. tau = inf gives 1 each.
    """
    e = energy.detach().double().cpu()
    g = group.long().cpu()
    if e.numel() == 0:
        return e
    n_groups = int(g.max()) + 1
    z = e / tau if math.isfinite(tau) else torch.zeros_like(e)
    zmax = torch.full((n_groups,), -math.inf, dtype=z.dtype).scatter_reduce(0, g, z, "amax")
    p = torch.exp(z - zmax[g])

    def gsum(x: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=x.dtype).index_add_(0, g, x)

    count = gsum(torch.ones_like(p))
    w = count[g] * p / gsum(p)[g]
    capped = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(e.numel()):  # each round caps at least one more token, or stops
        over = (w > w_max * (1 + 1e-12)) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        free = count - w_max * gsum(capped.double())  # mass left for the uncapped tokens
        p_free = gsum(torch.where(capped, 0.0, p))
        share = torch.where(p_free > 0, free / p_free.clamp_min(1e-300), 0.0)
        w = torch.where(capped, w_max, p * share[g])
    return w


@torch.no_grad()
def token_weights(
    cfg: WeightingConfig,
    role: Tensor,
    group: Tensor,
    entropy: Tensor | None = None,
    logp: Tensor | None = None,
) -> Tensor:
    """Per-token weights (float64, CPU, no grad) for tokens with roles `role`.

    `group` identifies the turn of each token (e.g. a dense id of (trajectory, turn_idx)) and
    `entropy` / `logp` are the proximal policy's, used by "actfocus" only.
    """
    w = role_weights(role, cfg)
    if cfg.mode != "actfocus":
        return w
    act = (role.cpu() == Role.ACTION).nonzero().squeeze(1)
    if act.numel() == 0:
        return w
    source = entropy if cfg.energy == "entropy" else logp
    if source is None:
        raise ValueError(f"actfocus with energy {cfg.energy!r} needs that input")
    energy = source.detach().double().cpu()[act]
    if cfg.energy == "neg_logprob":
        energy = -energy
    _, dense = torch.unique(group.cpu()[act], return_inverse=True)
    w[act] = w[act] * redistribute(energy, dense, cfg.tau, cfg.w_max)
    return w
