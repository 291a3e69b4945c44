"""What makes a trajectory trainable, checked where it enters the broker.

Decoding (`protocol.decode_view`) proves only the shape of the msgpack; a trajectory that
decodes can still crash the learner (a token id outside the vocabulary indexes past the
embedding), stall it (a NaN logprob or reward makes every step it is in non-finite), or
mislead it (a policy version from the future makes it look fresh). `check_trajectory` finds
each such defect and names it, so the broker can refuse that one trajectory, count it by
`reason`, and still ack the good trajectories sent with it. `check_batch` gives the same
answers for a whole batch at a fraction of the cost (the broker's hot path).

Works on a `protocol.Trajectory` and on the broker's zero-copy `TrajectoryView` alike: the
per-token arrays are read with `np.frombuffer`, nothing is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


# The hot path (every trajectory the broker receives, ~2k tokens each) costs a few ufunc
# reductions called directly (no numpy Python wrappers, no temporaries but one): each check
# first asks a yes/no question of the whole array, and only a trajectory that fails it pays
# for finding and naming the offending value.
_MAX, _MIN, _ANY = np.maximum.reduce, np.minimum.reduce, np.logical_or.reduce
_SHAPES = tuple((name, dtype.itemsize) for name, dtype in P.TOKEN_ARRAYS.items())
_ID_BYTES = P.TOKEN_ARRAYS["token_ids"].itemsize
_IDS_UNSIGNED = np.dtype("<u4")  # a negative int32 id reads as >= 2**31: one bound for both
_ROLE_OK = np.zeros(256, dtype=bool)
_ROLE_OK[VALID_ROLES] = True
_ROLES_DENSE = VALID_ROLES.tolist() == list(range(len(VALID_ROLES)))  # 0..k: a max suffices


def check_trajectory(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> Invalid | None:
    """The first defect that keeps `t` from being trained, or None."""
    bad = _check_shape(t, limits)
    if bad is None and len(t.token_ids) and not _tokens_ok(t, limits):
        bad = _check_tokens(t, limits)  # names the defect
    return bad or _check_episode(t)


def _check_shape(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> Invalid | None:
    """ids, array shapes, length: what must hold before the arrays are read."""
    if not t.traj_id or not t.group_id:
        return Invalid("ids", "empty traj_id or group_id")
    n = len(t.token_ids) // _ID_BYTES
    for name, itemsize in _SHAPES:
        got = len(getattr(t, name))
        if got != n * itemsize:
            return Invalid("shape", f"{t.traj_id}: {name} has {got} bytes for {n} tokens")
    if limits.max_tokens and n > limits.max_tokens:
        return Invalid("too_long", f"{t.traj_id}: {n} tokens > max_model_len {limits.max_tokens}")
    return None


def _tokens_ok(t: P.Trajectory | P.TrajectoryView, limits: Limits) -> bool:
    """Whether `_check_tokens` finds nothing, for a trajectory of at least one token."""
    ids = np.frombuffer(t.token_ids, dtype=_IDS_UNSIGNED)
    if _MAX(ids) >= (limits.vocab_size or 1 << 31):
        return False
    role = np.frombuffer(t.role, dtype=np.uint8)
    if (_MAX(role) > VALID_ROLES[-1]) if _ROLES_DENSE else not _ROLE_OK[role].all():
        return False
    if _MAX(np.frombuffer(t.loss_mask, dtype=np.uint8)) > 1:
        return False
    lp = array(t, "behav_logprob")
    # NaN propagates through both reductions and fails both comparisons
    if not (_MAX(lp) <= LOGPROB_SLACK and _MIN(lp) > -np.inf):
        return False
    v = array(t, "policy_version")
    # non-decreasing, so v[0] is the oldest and v[-1] the newest
    if v[0] < 0 or (len(v) > 1 and _ANY(v[1:] < v[:-1])):
        return False
    return limits.policy_version is None or v[-1] <= limits.policy_version


def check_batch(
    trajs: Sequence[P.Trajectory | P.TrajectoryView], limits: Limits
) -> list[Invalid | None]:
    """`check_trajectory` of each of `trajs`, with the per-token checks of all of them done
    at once on their arrays laid end to end: a handful of numpy calls per batch instead of
    per trajectory. When that finds a defect somewhere, each trajectory is checked alone to
    name it (the same answers as `check_trajectory`, only slower, and only for a bad batch)."""
    out = [_check_shape(t, limits) for t in trajs]
    ok = [t for t, bad in zip(trajs, out, strict=True) if bad is None]
    if ok and not _tokens_ok_together(ok, limits):
        return [check_trajectory(t, limits) for t in trajs]
    return [bad or _check_episode(t) for t, bad in zip(trajs, out, strict=True)]


def _joined(
    trajs: Sequence[P.Trajectory | P.TrajectoryView], name: str, dtype: np.dtype[Any] | type
) -> np.ndarray:
    return np.frombuffer(b"".join([getattr(t, name) for t in trajs]), dtype=dtype)


def _tokens_ok_together(trajs: Sequence[P.Trajectory | P.TrajectoryView], limits: Limits) -> bool:
    """Whether `_check_tokens` finds nothing in any of `trajs` (passed by `_check_shape`:
    their arrays have consistent shapes)."""
    ids = _joined(trajs, "token_ids", _IDS_UNSIGNED)
    if not ids.size:
        return True
    if _MAX(ids) >= (limits.vocab_size or 1 << 31):
        return False
    role = _joined(trajs, "role", np.uint8)
    if (_MAX(role) > VALID_ROLES[-1]) if _ROLES_DENSE else not _ROLE_OK[role].all():
        return False
    if _MAX(_joined(trajs, "loss_mask", np.uint8)) > 1:
        return False
    lp = _joined(trajs, "behav_logprob", P.TOKEN_ARRAYS["behav_logprob"])
    if not (_MAX(lp) <= LOGPROB_SLACK and _MIN(lp) > -np.inf):  # NaN fails both
        return False
    v = _joined(trajs, "policy_version", P.TOKEN_ARRAYS["policy_version"])
    if _MIN(v) < 0:
        return False
    if limits.policy_version is not None and _MAX(v) > limits.policy_version:
        return False
    # non-decreasing within each trajectory: a step down across a boundary does not count
    down = v[1:] < v[:-1]
    ends = np.cumsum([len(t.token_ids) // _ID_BYTES for t in trajs])
    down[ends[(ends > 0) & (ends < len(v))] - 1] = False
    return not _ANY(down)


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
    finite = math.isfinite
    if not (finite(t.outcome_reward) and all(finite(turn.reward) for turn in t.turns)):
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
