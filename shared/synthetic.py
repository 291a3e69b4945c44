"""Synthetic trajectories: what tests and benchmarks use in place of an actor's episodes.

The one factory behind the broker tests, the learner tests, the stand-in actor
(tests/synthetic_actor.py) and the ingest benchmark, so that every stand-in is a trajectory the
broker stores and the learner trains: token ids inside the tiny test model's vocabulary (past
its special tokens), roles / loss mask / logprobs / versions / turns that
`shared.validation.check_trajectory` accepts. Numpy only: shared/ imports no role and no
heavy stack, and tests, benchmarks and learner code all import it.

Deterministic: the same arguments give byte-identical trajectories (the token ids are drawn from
a generator seeded by the traj_id unless one is passed), as an outbox's resend would be.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from shared import protocol as P

# learner/tiny_model.py's vocabulary: its four special tokens (<pad> <s> </s> <unk>), then
# words. shared/ may not import the learner, so the numbers live here too; a unit test keeps
# them equal.
TINY_VOCAB_SIZE = 256
N_SPECIAL = 4


# Keyword-only overrides with defaults: a test names the one field it is about.
def trajectory(  # noqa: PLR0913
    traj_id: str,
    group_id: str,
    *,
    n_tokens: int = 16,
    n_prompt: int | None = None,
    n_turns: int = 1,
    n_observation: int = 0,
    reasoning: bool = False,
    reward: float = 0.0,
    turn_rewards: Sequence[float] | None = None,
    turns: list[P.TurnInfo] | None = None,
    policy_version: int | ArrayLike = 0,
    behav_logprob: float | ArrayLike | None = None,
    vocab_size: int = TINY_VOCAB_SIZE,
    rng: np.random.Generator | int | None = None,
    task_id: str | None = None,
    env: str = "synthetic",
    actor_id: str = "synthetic",
    lease_id: str | None = None,
    termination: str = P.Termination.DONE,
    success: bool | None = None,
    sampling: dict[str, float] | None = None,
    timings: dict[str, float] | None = None,
) -> P.Trajectory:
    """One episode of `n_turns` turns over `n_tokens` tokens, laid out as the actor lays one.

    The tokens split evenly into turns (`turn_idx`). Turn 0 opens with `n_prompt` prompt tokens
    (default a quarter of the episode), every later turn with `n_observation` observation
    tokens; the rest of each turn is generated and loss-masked: action tokens, or with
    `reasoning` a first half of reasoning tokens before them. Token ids are uniform in
    [N_SPECIAL, vocab_size); `behav_logprob` defaults to the uniform policy's, -log(vocab_size).
    `policy_version` and `behav_logprob` take a scalar or one value per token. Each turn gets a
    `TurnInfo`: reward 0 but the last, worth `reward`, unless `turn_rewards` or `turns` say
    otherwise.
    """
    n = n_tokens
    gen = (
        rng
        if isinstance(rng, np.random.Generator)
        else np.random.default_rng(zlib.crc32(traj_id.encode()) if rng is None else rng)
    )
    ids = gen.integers(N_SPECIAL, vocab_size, n)
    turn = np.arange(n) * n_turns // max(n, 1)
    role = np.full(n, P.Role.ACTION, dtype=np.uint8)
    for t in range(n_turns):
        idx = np.flatnonzero(turn == t)
        head = (n // 4 if n_prompt is None else n_prompt) if t == 0 else n_observation
        role[idx[:head]] = P.Role.PROMPT if t == 0 else P.Role.OBSERVATION
        if reasoning:
            generated = idx[head:]
            role[generated[: generated.size // 2]] = P.Role.REASONING
    mask = ((role == P.Role.ACTION) | (role == P.Role.REASONING)).astype(np.uint8)
    lp = -np.log(vocab_size) if behav_logprob is None else behav_logprob
    if turns is None:
        if turn_rewards is None:
            turn_rewards = [0.0] * (n_turns - 1) + [reward]
        last = len(turn_rewards) - 1
        done = termination == P.Termination.DONE
        turns = [
            P.TurnInfo(reward=r, done=done and t == last, truncated=False, action_valid=True)
            for t, r in enumerate(turn_rewards)
        ]
    return P.Trajectory(
        traj_id=traj_id,
        group_id=group_id,
        task_id=f"task-{group_id}" if task_id is None else task_id,
        env=env,
        actor_id=actor_id,
        lease_id=group_id if lease_id is None else lease_id,
        token_ids=P.pack(ids, "token_ids"),
        role=P.pack(role, "role"),
        loss_mask=P.pack(mask, "loss_mask"),
        behav_logprob=P.pack(np.broadcast_to(np.asarray(lp), n), "behav_logprob"),
        policy_version=P.pack(np.broadcast_to(np.asarray(policy_version), n), "policy_version"),
        turn_idx=P.pack(turn, "turn_idx"),
        turns=turns,
        outcome_reward=reward,
        success=reward > 0 if success is None else success,
        termination=termination,
        n_turns=len(turns),
        sampling=sampling or {},
        timings=timings or {},
    )


def lease_group(lease: P.Lease, actor_id: str, policy_version: int = 0, **kw) -> list[P.Trajectory]:
    """The `group_size` episodes of `lease` as a stand-in actor sends them: traj ids
    `<lease_id>-<k>`, and reward k % 2, so that every group has a spread of rewards to learn
    from. `kw` goes to `trajectory`."""
    return [
        trajectory(
            f"{lease.lease_id}-{k}",
            lease.lease_id,
            task_id=lease.task.task_id,
            env=lease.task.env,
            actor_id=actor_id,
            lease_id=lease.lease_id,
            reward=float(k % 2),
            policy_version=policy_version,
            **kw,
        )
        for k in range(lease.group_size)
    ]


def synthetic_batch(
    n_groups: int,
    group_size: int,
    n_tokens: int,
    seed: int = 0,
    vocab_size: int = TINY_VOCAB_SIZE,
    policy_version: int = 0,
    prefix: str = "",
) -> list[P.Trajectory]:
    """A learner batch: groups with alternating 0/1 rewards and ragged lengths in
    (3/4 n_tokens, n_tokens], every trajectory drawn from one generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    out: list[P.Trajectory] = []
    for g in range(n_groups):
        for k in range(group_size):
            length = n_tokens - int(rng.integers(0, max(1, n_tokens // 4)))
            out.append(
                trajectory(
                    f"{prefix}t{len(out)}",
                    f"{prefix}g{g}",
                    n_tokens=length,
                    reward=float(k % 2),
                    rng=rng,
                    vocab_size=vocab_size,
                    policy_version=policy_version,
                )
            )
    return out
