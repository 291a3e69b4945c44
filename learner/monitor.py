"""Per-role diagnostics of a learner step: token entropy by role and the ActFocus monitor.

ActFocus's "Action Bottleneck" says the outcome of an agentic episode is decided by its few
action tokens rather than by its reasoning. The monitor measures that on the training data
itself: within each GRPO group (trajectories of one task, sharing `group_id`) whose rewards
differ, the Pearson correlation across its trajectories of the outcome reward with the
trajectory's mean proximal logprob of its action tokens, and likewise of its reasoning tokens.
Averaged over such groups, a clearly larger action correlation says the reward follows how
confidently the policy writes its actions, not its reasoning.

Everything here is a pure function of per-token or per-trajectory arrays (numpy / torch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from shared.protocol import Role

MONITOR_ROLES = ("action", "reasoning")


def role_entropy(
    role: Tensor, ent: Tensor, roles: Sequence[str] = MONITOR_ROLES
) -> dict[str, float]:
    """`entropy_<role>`: the mean of `ent` over the tokens of each role; a role with no token
    in the batch is left out (nothing to average)."""
    out = {}
    for name in roles:
        sel = role == int(Role[name.upper()])
        if bool(sel.any()):
            out[f"entropy_{name}"] = float(ent[sel].double().mean())
    return out


def trajectory_role_means(
    row: Tensor, role: Tensor, values: Tensor, n_rows: int, name: str
) -> np.ndarray:
    """[n_rows] mean of `values` over each row's tokens of role `name` (nan: it has none)."""
    sel = (role == int(Role[name.upper()])).cpu().numpy()
    rows = row.cpu().numpy()[sel]
    vals = values.detach().double().cpu().numpy()[sel]
    total = np.bincount(rows, weights=vals, minlength=n_rows)
    count = np.bincount(rows, minlength=n_rows)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length arrays; nan if either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float((dx**2).sum()), float((dy**2).sum())
    if sxx == 0 or syy == 0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / np.sqrt(sxx * syy), -1.0, 1.0))


def actfocus_monitor(
    group_ids: Sequence[str], rewards: Sequence[float], logp_by_role: dict[str, np.ndarray]
) -> dict[str, float]:
    """The ActFocus monitor over one batch of trajectories.

    `group_ids[i]` and `rewards[i]` (outcome reward) belong to trajectory i, and
    `logp_by_role[role][i]` is its mean proximal logprob over its tokens of that role (nan if
    it has none). Returns `monitor_groups`, the number of groups with reward variance > 0,
    and for each role `monitor_corr_<role>`, the mean over those groups of the correlation of
    reward with that mean logprob. Within a group only trajectories with tokens of the role
    count, and a group whose correlation is undefined for a role (fewer than two such
    trajectories, or constant rewards or logprobs among them) is left out of that role's mean;
    nan when no group is left.
    """
    r = np.asarray(rewards, dtype=np.float64)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    groups = [np.asarray(m) for m in members.values() if len(m) > 1 and np.ptp(r[m]) > 0]
    out: dict[str, float] = {"monitor_groups": float(len(groups))}
    for name, logp in logp_by_role.items():
        lp = np.asarray(logp, dtype=np.float64)
        corrs = []
        for m in groups:
            keep = m[np.isfinite(lp[m])]
            c = pearson(r[keep], lp[keep]) if keep.size > 1 else float("nan")
            if np.isfinite(c):
                corrs.append(c)
        out[f"monitor_corr_{name}"] = float(np.mean(corrs)) if corrs else float("nan")
    return out


@torch.no_grad()
def role_diagnostics(
    role: Tensor,
    row: Tensor,
    logp: Tensor,
    ent: Tensor,
    group_ids: Sequence[str],
    rewards: Sequence[float],
) -> dict[str, float]:
    """Per-role entropy and the ActFocus monitor of one step.

    Per trained token: `role`, `row` (its trajectory, 0..len(group_ids)-1), the proximal
    `logp` and `ent`; per trajectory: `group_ids` and outcome `rewards`."""
    n = len(group_ids)
    logp_by_role = {name: trajectory_role_means(row, role, logp, n, name) for name in MONITOR_ROLES}
    return {**role_entropy(role, ent), **actfocus_monitor(group_ids, rewards, logp_by_role)}
