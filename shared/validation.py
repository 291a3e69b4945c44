"""What makes a trajectory trainable, checked where it enters the broker.

Decoding (`protocol.decode_view`) proves only the shape of the msgpack; a trajectory that
decodes can still crash the learner (a token id outside the vocabulary indexes past the
embedding), stall it (a NaN logprob or reward makes every step it is in non-finite), or
mislead it (a policy version from the future makes it look fresh). `check_trajectory` finds
each such defect and names it, so the broker can refuse that one trajectory, count it by
`reason`, and still ack the good trajectories sent with it.

Works on a `protocol.Trajectory` and on the broker's zero-copy `TrajectoryView` alike: the
per-token arrays are read with `np.frombuffer`, nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared import protocol as P

# Sampled logprobs are <= 0; float32 rounding of a probability of 1 may land just above.
LOGPROB_SLACK = 1e-4
VALID_ROLES = np.array(sorted(int(r) for r in P.Role), dtype=np.uint8)
# Every reason check_trajectory can give, for metrics that export each label from the start.
REASONS = (
    "ids",
    "shape",
    "too_long",
    "token_id",
    "role",
    "loss_mask",
    "logprob",
    "policy_version",
    "reward",
    "sample_prob",
    "feedback",
    "lease",  # the broker's lease book: another actor's lease, or not the lease's task
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the receiving side knows: 0 / None leave that bound unchecked."""

    vocab_size: int = 0  # token ids must be < this
    max_tokens: int = 0  # at most this many tokens ([actor] max_model_len)
    policy_version: int | None = None  # the newest policy published so far


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str  # one of REASONS
    detail: str  # one line naming the trajectory and the offending value


def array(t: P.Trajectory | P.TrajectoryView, name: str) -> np.ndarray:
    return np.frombuffer(getattr(t, name), dtype=P.TOKEN_ARRAYS[name])


def check_trajectory(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> Invalid | None:
    """The first defect that keeps `t` from being trained, or None."""
    if not t.traj_id or not t.group_id:
        return Invalid("ids", "empty traj_id or group_id")
    n = len(t.token_ids) // P.TOKEN_ARRAYS["token_ids"].itemsize
    for name, dtype in P.TOKEN_ARRAYS.items():
        if len(getattr(t, name)) != n * dtype.itemsize:
            got = len(getattr(t, name))
            return Invalid("shape", f"{t.traj_id}: {name} has {got} bytes for {n} tokens")
    if limits.max_tokens and n > limits.max_tokens:
        return Invalid("too_long", f"{t.traj_id}: {n} tokens > max_model_len {limits.max_tokens}")
    return _check_tokens(t, limits) or _check_episode(t)


def _check_tokens(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> Invalid | None:
    ids = array(t, "token_ids")
    if ids.size and (ids.min() < 0 or (limits.vocab_size and ids.max() >= limits.vocab_size)):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        return Invalid("token_id", f"{t.traj_id}: token id {bad} outside [0, {limits.vocab_size})")
    role = array(t, "role")
    if not np.isin(role, VALID_ROLES).all():
        bad = int(role[~np.isin(role, VALID_ROLES)][0])
        return Invalid("role", f"{t.traj_id}: role {bad} is not a protocol.Role")
    mask = array(t, "loss_mask")
    if mask.size and mask.max() > 1:
        return Invalid("loss_mask", f"{t.traj_id}: loss_mask {int(mask.max())} is not 0 or 1")
    lp = array(t, "behav_logprob")
    if not np.isfinite(lp).all() or (lp.size and lp.max() > LOGPROB_SLACK):
        bad = lp[~np.isfinite(lp)][0] if not np.isfinite(lp).all() else lp.max()
        return Invalid("logprob", f"{t.traj_id}: behaviour logprob {float(bad)} (finite, <= 0)")
    return _check_versions(t, limits)


def _check_versions(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> Invalid | None:
    v = array(t, "policy_version")
    if not v.size:
        return None
    # Non-decreasing: an actor only moves to newer weights. `protocol.min_policy_version`
    # reads a trajectory's oldest trained version off its first loss token, relying on it.
    if v.min() < 0 or (np.diff(v) < 0).any():
        return Invalid("policy_version", f"{t.traj_id}: versions negative or decreasing")
    if limits.policy_version is not None and v.max() > limits.policy_version:
        newest = limits.policy_version
        return Invalid("policy_version", f"{t.traj_id}: version {int(v.max())} > newest {newest}")
    return None


def _check_episode(t: P.Trajectory | P.TrajectoryView) -> Invalid | None:
    rewards = [t.outcome_reward, *(turn.reward for turn in t.turns)]
    if not np.isfinite(rewards).all():
        return Invalid("reward", f"{t.traj_id}: non-finite reward")
    if not 0.0 < t.sample_prob <= 1.0:  # NaN fails too
        return Invalid("sample_prob", f"{t.traj_id}: sample_prob {t.sample_prob} not in (0, 1]")
    return None


def check_feedback(fb: P.TaskFeedback) -> Invalid | None:
    """A learner's per-task feedback the curator can use: finite, pass rate in [0, 1]. (One
    NaN here made every arm's score NaN, and no lease was granted again.)"""
    if not (np.isfinite(fb.mean_abs_advantage) and fb.mean_abs_advantage >= 0):
        return Invalid("feedback", f"{fb.task_id}: mean_abs_advantage {fb.mean_abs_advantage}")
    if not 0.0 <= fb.pass_rate <= 1.0:  # NaN fails too
        return Invalid("feedback", f"{fb.task_id}: pass_rate {fb.pass_rate} not in [0, 1]")
    return None
