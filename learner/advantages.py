"""Critic-free, group-relative advantages over trajectories of the same task (one per episode).

Both estimators compare each trajectory's reward with the other samples of its group (the
`group_size` rollouts an actor ran for one lease), so no value network is needed. A group whose
rewards are all equal carries no signal and gets advantage 0 exactly (never eps-amplified
noise), which is also what lets the broker de-prioritise such groups.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch


def _group_index(group_ids: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    """Dense integer ids 0..G-1 for arbitrary hashable group ids (strings on the wire)."""
    index: dict[Hashable, int] = {}
    dense = np.fromiter((index.setdefault(g, len(index)) for g in group_ids), dtype=np.int64)
    return dense, len(index)


def _as_numpy(rewards: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().cpu().double().numpy()
    return np.asarray(rewards, dtype=np.float64)


def _like(result: np.ndarray, rewards: object) -> np.ndarray | torch.Tensor:
    if isinstance(rewards, torch.Tensor):
        return torch.as_tensor(result, dtype=torch.float32, device=rewards.device)
    return result.astype(np.float32)


def _group_stats(r: np.ndarray, g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample group size, group mean and group std (population, ddof=0)."""
    count = np.maximum(np.bincount(g, minlength=n).astype(np.float64), 1)
    mean = np.bincount(g, weights=r, minlength=n) / count
    var = np.bincount(g, weights=(r - mean[g]) ** 2, minlength=n) / count
    return count[g], mean[g], np.sqrt(var)[g]


def grpo_advantages(
    rewards: np.ndarray | torch.Tensor | Sequence[float],
    group_ids: Sequence[Hashable],
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> np.ndarray | torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), std over the group (population, ddof=0).

    `scale_by_std=False` gives the Dr. GRPO variant (no division), which avoids up-weighting
    groups that are nearly all-correct or all-wrong. Groups with std <= eps get 0.
    Returns float32, as numpy or torch to match `rewards`.
    """
    r = _as_numpy(rewards)
    if len(group_ids) != r.shape[0]:
        raise ValueError(f"{r.shape[0]} rewards but {len(group_ids)} group ids")
    g, n = _group_index(group_ids)
    _, mean, std = _group_stats(r, g, n)
    centered = r - mean
    flat = std <= eps
    # Divide only where the group has spread, so eps=0 never produces 0/0 warnings.
    adv = centered / np.where(flat, 1.0, std + eps) if scale_by_std else centered
    adv = np.where(flat, 0.0, adv)
    return _like(adv, rewards)


def rloo_advantages(
    rewards: np.ndarray | torch.Tensor | Sequence[float],
    group_ids: Sequence[Hashable],
    eps: float = 1e-6,
) -> np.ndarray | torch.Tensor:
    """Leave-one-out baseline: A_i = r_i - mean_{j != i in group} r_j = G/(G-1) (r_i - mean_g).

    Unbiased, unlike GRPO's baseline that includes the sample itself. A group of one has no
    baseline and gets 0, as do zero-variance groups.
    """
    r = _as_numpy(rewards)
    if len(group_ids) != r.shape[0]:
        raise ValueError(f"{r.shape[0]} rewards but {len(group_ids)} group ids")
    g, n = _group_index(group_ids)
    count, mean, std = _group_stats(r, g, n)
    adv = np.where(count > 1, (r - mean) * count / np.maximum(count - 1, 1), 0.0)
    adv = np.where(std <= eps, 0.0, adv)
    return _like(adv, rewards)
