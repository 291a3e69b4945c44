"""Critic-free, group-relative advantages over trajectories of the same task.

Every estimator compares a trajectory with the other samples of its group (the `group_size`
rollouts an actor ran for one lease), so no value network is needed. A group whose rewards are
all equal carries no signal and gets advantage 0 exactly (never eps-amplified noise), which is
also what lets the broker de-prioritise such groups.

Episode level: `grpo` (group mean and std) and `rloo` (leave-one-out mean), one advantage per
trajectory from `outcome_reward`. Turn level: `turn_level` (TRLOO) and `gigpo` give each turn
its own advantage from the per-turn rewards; a token gets the advantage of its turn
(`turn_idx`). `compute_advantages` picks one by `[learner.advantage]`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.config import AdvantageConfig
from shared.protocol import Termination, Trajectory


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


# ---------------------------------------------------------------- turn level


def turn_returns(rewards: Sequence[float], gamma: float = 1.0) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k-t) r_k: the return from each turn to the episode's end."""
    out = np.zeros(len(rewards), dtype=np.float64)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


def turn_level_advantages(
    returns: Sequence[np.ndarray], group_ids: Sequence[Hashable], eps: float = 1e-9
) -> list[np.ndarray]:
    """TRLOO: A_{i,t} = G_{i,t} - mean of G_{j,t} over the other members j of i's group that
    reached turn t. A turn no other member reached has no baseline and gets 0, as does a
    (group, turn) whose returns are all equal."""
    if len(returns) != len(group_ids):
        raise ValueError(f"{len(returns)} return arrays but {len(group_ids)} group ids")
    cells: dict[tuple[Hashable, int], list[tuple[int, float]]] = defaultdict(list)
    for i, (g, ret) in enumerate(zip(group_ids, returns, strict=True)):
        for t, value in enumerate(ret):
            cells[(g, t)].append((i, float(value)))
    out = [np.zeros(len(r), dtype=np.float64) for r in returns]
    for (_, t), members in cells.items():
        values = np.array([v for _, v in members])
        if len(values) < 2 or np.ptp(values) <= eps:
            continue
        others = (values.sum() - values) / (len(values) - 1)
        for (i, _), a in zip(members, values - others, strict=True):
            out[i][t] = a
    return out


def gigpo_advantages(
    outcome_rewards: Sequence[float] | np.ndarray,
    returns: Sequence[np.ndarray],
    state_keys: Sequence[Sequence[str]],
    group_ids: Sequence[Hashable],
    step_weight: float = 1.0,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> list[np.ndarray]:
    """GiGPO: A_{i,t} = A_episode_i + w * A_step_{i,t}.

    A_episode is GRPO over the outcome rewards. A_step compares the return-from-step G_{i,t}
    with the other steps of the same group taken from the same state (equal non-empty
    `state_key`, at any turn index): (G - mean) / std over that anchor-state group. A step whose
    state no other step of its group shares, or with an empty key, gets A_step = 0.
    """
    n = len(returns)
    if not (len(outcome_rewards) == len(state_keys) == len(group_ids) == n):
        raise ValueError("outcome_rewards, returns, state_keys and group_ids differ in length")
    episode = np.asarray(grpo_advantages(outcome_rewards, group_ids, eps, scale_by_std))
    anchors: dict[tuple[Hashable, str], list[tuple[int, int]]] = defaultdict(list)
    for i, (g, keys) in enumerate(zip(group_ids, state_keys, strict=True)):
        for t, key in enumerate(keys[: len(returns[i])]):
            if key:
                anchors[(g, key)].append((i, t))
    step = [np.zeros(len(r), dtype=np.float64) for r in returns]
    for members in anchors.values():
        if len(members) < 2:
            continue
        values = np.array([returns[i][t] for i, t in members], dtype=np.float64)
        adv = np.asarray(grpo_advantages(values, [0] * len(values), eps, scale_by_std))
        for (i, t), a in zip(members, adv, strict=True):
            step[i][t] = a
    return [episode[i] + step_weight * step[i] for i in range(n)]


# ---------------------------------------------------------------- from trajectories


@dataclass
class Advantages:
    """Per trajectory: the advantage of each turn (indexed by `turn_idx`, clamped to the last
    turn; episode-level estimators give one value) and whether it is trained at all."""

    per_turn: list[np.ndarray]
    keep: np.ndarray  # bool; False: truncated and masked (`mask_truncated`)

    def per_token(self, i: int, turn_idx: np.ndarray) -> np.ndarray:
        a = self.per_turn[i]
        return a[np.clip(turn_idx, 0, len(a) - 1)].astype(np.float32)


def _turn_rewards(t: Trajectory) -> list[float]:
    # Per-turn rewards as the environment gave them; an episode without turn records (or an
    # environment that only scores the outcome) is one turn worth the outcome reward.
    return [x.reward for x in t.turns] if t.turns else [t.outcome_reward]


def compute_advantages(trajs: Sequence[Trajectory], cfg: AdvantageConfig) -> Advantages:
    """The `[learner.advantage]` estimator over a batch of whole groups.

    With `mask_truncated`, episodes cut by the turn or token limit leave the batch before the
    baselines are formed (their outcome is unknown, not a failure) and get advantage 0 and
    loss mask 0 (Mini-o3's over-turn masking).
    """
    cut = (Termination.MAX_TURNS, Termination.MAX_TOKENS)
    keep = np.array([not (cfg.mask_truncated and t.termination in cut) for t in trajs], dtype=bool)
    idx = np.flatnonzero(keep)
    kept = [trajs[i] for i in idx]
    groups = [t.group_id for t in kept]
    rewards = np.array([t.outcome_reward for t in kept], dtype=np.float64)
    est = cfg.estimator
    if est in ("grpo", "rloo"):
        fn = grpo_advantages if est == "grpo" else rloo_advantages
        kwargs = {"scale_by_std": cfg.scale_by_std} if est == "grpo" else {}
        adv = np.asarray(fn(rewards, groups, **kwargs), dtype=np.float64)
        values = [np.array([a]) for a in adv]
    else:
        rets = [turn_returns(_turn_rewards(t), cfg.gamma) for t in kept]
        if est == "turn_level":
            values = turn_level_advantages(rets, groups)
        elif est == "gigpo":
            keys = [[x.state_key for x in t.turns] for t in kept]
            values = gigpo_advantages(
                rewards, rets, keys, groups, cfg.step_weight, cfg.scale_by_std
            )
        else:
            raise ValueError(f"unknown advantage estimator {est!r}")
    per_turn = [np.zeros(1) for _ in trajs]
    for i, v in zip(idx, values, strict=True):
        per_turn[i] = v
    return Advantages(per_turn=per_turn, keep=keep)
