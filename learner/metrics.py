"""Prometheus metrics the learner exports (names: headrace_learner_<what>_<unit>)."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("headrace_learner_steps", "Optimiser steps taken")  # exported as *_total
POLICY_VERSION = Gauge("headrace_learner_policy_version", "Current policy version")
REWARD_MEAN = Gauge("headrace_learner_reward_mean", "Mean outcome reward of the last batch")
STEP_SECONDS = Histogram(
    "headrace_learner_step_seconds",
    "Wall time of one optimiser step (forward, backward, update)",
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
)
LOSS = Gauge(
    "headrace_learner_loss", "Loss of the last step (the policy loss minus the entropy bonus)"
)
ENTROPY_BONUS = Gauge(
    "headrace_learner_entropy_bonus", "Entropy bonus term subtracted from the last step's loss"
)
LR = Gauge("headrace_learner_lr", "Learning rate of the last optimiser step (after warm-up)")
ENTROPY = Gauge(
    "headrace_learner_entropy",
    "Mean proximal-policy entropy (nats) of the last batch's trained tokens of a role",
    ["role"],  # action | reasoning
)
ACTFOCUS_CORR = Gauge(
    "headrace_learner_actfocus_corr",
    "ActFocus monitor: correlation of outcome reward with the mean proximal logprob of a "
    "trajectory's tokens of a role, averaged over the last batch's groups with reward variance",
    ["role"],  # action | reasoning
)
ACTFOCUS_GROUPS = Gauge(
    "headrace_learner_actfocus_groups", "Groups (reward variance > 0) the ActFocus monitor used"
)
CLIP_FRACTION = Gauge("headrace_learner_clip_fraction", "Fraction of tokens clipped")
ESS = Gauge("headrace_learner_ess", "Normalised effective sample size of the IS weights")
KL_BEHAVIOUR = Gauge("headrace_learner_kl_behaviour", "k3 estimate of KL(behaviour || current)")
MASKED_FRACTION = Gauge(
    "headrace_learner_masked_fraction", "Fraction of tokens the off-policy correction dropped"
)
IS_CAP_FRACTION = Gauge(
    "headrace_learner_is_cap_fraction", "Fraction of tokens whose IS weight was truncated"
)
TOKEN_STALENESS = Gauge(
    "headrace_learner_token_staleness_versions",
    "Policy versions between the learner and the sampler of a trained token",
    ["stat"],  # mean | max
)
ALERTS = Counter(
    "headrace_learner_off_policy_alerts",
    "Steps on which a diagnostic (off-policy, or the action-token entropy) crossed its "
    "[learner.correction.alert] bound",
    ["diagnostic"],
)
TRAJECTORIES = Counter("headrace_learner_trajectories_trained", "Trajectories trained on")
TOKENS = Counter("headrace_learner_tokens_trained", "Loss tokens trained on")
WAIT_SECONDS = Counter("headrace_learner_wait_seconds", "Seconds spent waiting for batches")


def observe_diagnostics(diag: dict[str, float]) -> None:
    """Set the loss, off-policy, entropy and ActFocus-monitor gauges from one step's
    diagnostics (`Trainer.step`); one the step did not have (no tokens of a role, no group
    with reward variance) is set to NaN rather than left at an older step's value."""
    LOSS.set(diag["loss"])
    ENTROPY_BONUS.set(diag.get("entropy_bonus", 0.0))
    if "lr" in diag:
        LR.set(diag["lr"])
    for role in ("action", "reasoning"):
        ENTROPY.labels(role=role).set(_number(diag.get(f"entropy_{role}")))
        ACTFOCUS_CORR.labels(role=role).set(_number(diag.get(f"monitor_corr_{role}")))
    ACTFOCUS_GROUPS.set(diag.get("monitor_groups", 0.0))
    CLIP_FRACTION.set(diag["clip_fraction"])
    ESS.set(diag["ess"])
    KL_BEHAVIOUR.set(diag["kl_behaviour"])
    MASKED_FRACTION.set(diag["masked_fraction"])
    IS_CAP_FRACTION.set(diag["is_cap_fraction"])
    TOKEN_STALENESS.labels(stat="mean").set(diag["token_staleness_mean"])
    TOKEN_STALENESS.labels(stat="max").set(diag["token_staleness_max"])
    for key in diag:
        if key.startswith("alert_"):
            ALERTS.labels(diagnostic=key.removeprefix("alert_")).inc()


def _number(v: float | None) -> float:
    return math.nan if v is None else float(v)
