"""The diagnostics `Trainer.step` reports, from the step's batch, proximal values and updates.

Besides the off-policy correction's health (learner/correction.py) and the loss, clip and ratio
statistics of the updates: `lr` (of the step's last update), `entropy_bonus` (the bonus term
subtracted from the loss, mean over updates), `entropy_<role>` and the ActFocus monitor
`monitor_*` (learner/monitor.py), and the token weights by role.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from learner import correction as C
from learner.monitor import role_diagnostics
from shared.config import CorrectionConfig
from shared.protocol import Role, Trajectory

if TYPE_CHECKING:
    from learner.batch import Proximal, TrainBatch


def _no_ratios() -> Tensor:
    return torch.zeros(0, dtype=torch.float64)


@dataclass
class UpdateStats:
    """What one optimiser update of `Trainer.step` reports; the defaults are an update that
    had no trained token (no step taken)."""

    lr: float
    loss: float = 0.0
    bonus: float = 0.0  # the entropy bonus subtracted from the loss
    n_clipped: float = 0.0  # tokens whose ratio was clipped
    ratio: Tensor = field(default_factory=_no_ratios)  # pi / pi_prox per trained token
    grad_norm: float = 0.0
    skipped: float = 0.0  # 1.0 when a non-finite gradient skipped the optimiser step


def per_trajectory_advantage(
    n_trajs: int, per_turn: list[np.ndarray], idx: np.ndarray, batch: TrainBatch
) -> np.ndarray:
    """Mean advantage over each trajectory's trained tokens (its turn mean if it has none);
    `idx[r]` is the trajectory of batch row r, the others get 0."""
    out = np.zeros(n_trajs, dtype=np.float64)
    rows = batch.row.numpy()
    count = np.bincount(rows, minlength=len(idx))
    total = np.bincount(rows, weights=batch.advantages.double().numpy(), minlength=len(idx))
    for r, i in enumerate(idx):
        out[i] = total[r] / count[r] if count[r] else float(np.mean(per_turn[i]))
    return out


def step_diagnostics(
    cfg: CorrectionConfig,
    kept: Sequence[Trajectory],
    batch: TrainBatch,
    prox: Proximal,
    updates: list[UpdateStats],
    policy_version: int | None,
    lr: float,
) -> dict[str, float]:
    """`kept`: the trajectories of the batch's rows; `lr`: reported when nothing was updated."""
    n = batch.n_tokens
    if policy_version is None:
        policy_version = int(batch.version.max()) if n else 0
    staleness = policy_version - batch.version.double()
    diag = C.diagnostics(
        cfg, prox.logp, batch.behav_logp.double(), prox.is_w, prox.dropped, staleness
    )
    ratio = torch.cat([u.ratio for u in updates]) if updates else torch.zeros(0)
    p05, p50, p95 = C.quantiles(ratio, (0.05, 0.5, 0.95))
    norms = [u.grad_norm for u in updates if math.isfinite(u.grad_norm)]
    diag.update(
        # Means over the step's updates; with one update, the loss at the fetched weights.
        # The loss is what is minimised: the policy loss minus the entropy bonus.
        loss=float(np.mean([u.loss for u in updates])) if updates else 0.0,
        entropy_bonus=float(np.mean([u.bonus for u in updates])) if updates else 0.0,
        lr=float(updates[-1].lr) if updates else lr,
        clip_fraction=float(sum(u.n_clipped for u in updates) / max(ratio.numel(), 1)),
        ratio_mean=float(ratio.mean()) if ratio.numel() else 1.0,
        ratio_p05=p05,
        ratio_p50=p50,
        ratio_p95=p95,
        grad_norm=float(np.mean(norms)) if norms else float("nan"),
        skipped=float(sum(u.skipped for u in updates)),
        n_updates=float(len(updates)),
        n_tokens=float(n),
        entropy_mean=float(prox.ent.mean()) if n else 0.0,
        logp_mean=float(prox.logp.mean()) if n else 0.0,
    )
    for role in ("reasoning", "action"):
        sel = batch.role == int(getattr(Role, role.upper()))
        if bool(sel.any()):
            diag[f"tok_w_{role}_mean"] = float(prox.tok_w[sel].mean())
            diag[f"tok_w_{role}_max"] = float(prox.tok_w[sel].max())
    groups = [t.group_id for t in kept]
    rewards = [t.outcome_reward for t in kept]
    diag.update(role_diagnostics(batch.role, batch.row, prox.logp, prox.ent, groups, rewards))
    return diag
