"""Synthetic trajectories for tests and benchmarks of the learner without actors or a broker."""

from __future__ import annotations

import numpy as np

from shared.protocol import Role, Trajectory, pack


def synthetic_trajectory(
    traj_id: str,
    group_id: str,
    reward: float,
    n_tokens: int,
    rng: np.random.Generator,
    vocab_size: int = 256,
    policy_version: int = 0,
    behav_logprob: float | None = None,
) -> Trajectory:
    """Random token ids; the first quarter is prompt, the rest are loss-masked action tokens."""
    ids = rng.integers(4, vocab_size, n_tokens)  # skip the special tokens
    mask = np.zeros(n_tokens, dtype=np.uint8)
    mask[n_tokens // 4 :] = 1
    lp = -np.log(vocab_size) if behav_logprob is None else behav_logprob
    return Trajectory(
        traj_id=traj_id,
        group_id=group_id,
        task_id=f"task-{group_id}",
        env="synthetic",
        actor_id="synthetic",
        lease_id=f"lease-{group_id}",
        token_ids=pack(ids, "token_ids"),
        role=pack(np.where(mask, Role.ACTION, Role.PROMPT), "role"),
        loss_mask=pack(mask, "loss_mask"),
        behav_logprob=pack(np.full(n_tokens, lp), "behav_logprob"),
        policy_version=pack(np.full(n_tokens, policy_version), "policy_version"),
        turn_idx=pack(np.zeros(n_tokens), "turn_idx"),
        turns=[],
        outcome_reward=reward,
        success=reward > 0,
        termination="done",
        n_turns=1,
    )


def synthetic_batch(
    n_groups: int,
    group_size: int,
    n_tokens: int,
    seed: int = 0,
    vocab_size: int = 256,
    policy_version: int = 0,
    prefix: str = "",
) -> list[Trajectory]:
    """Groups with alternating 0/1 rewards and ragged lengths in (3/4 n_tokens, n_tokens]."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        for k in range(group_size):
            length = n_tokens - int(rng.integers(0, max(1, n_tokens // 4)))
            out.append(
                synthetic_trajectory(
                    f"{prefix}t{len(out)}",
                    f"{prefix}g{g}",
                    float(k % 2),
                    length,
                    rng,
                    vocab_size,
                    policy_version,
                )
            )
    return out
