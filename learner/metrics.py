"""Prometheus metrics the learner exports (names: headrace_learner_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("headrace_learner_steps", "Optimiser steps taken")  # exported as *_total
POLICY_VERSION = Gauge("headrace_learner_policy_version", "Current policy version")
REWARD_MEAN = Gauge("headrace_learner_reward_mean", "Mean outcome reward of the last batch")
STEP_SECONDS = Histogram(
    "headrace_learner_step_seconds",
    "Wall time of one optimiser step (forward, backward, update)",
    buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
)
LOSS = Gauge("headrace_learner_loss", "Policy loss of the last step")
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
    "Steps on which an off-policy diagnostic crossed its [learner.correction.alert] bound",
    ["diagnostic"],
)
TRAJECTORIES = Counter("headrace_learner_trajectories_trained", "Trajectories trained on")
TOKENS = Counter("headrace_learner_tokens_trained", "Loss tokens trained on")
WAIT_SECONDS = Counter("headrace_learner_wait_seconds", "Seconds spent waiting for batches")


def observe_diagnostics(diag: dict[str, float]) -> None:
    """Set the loss and off-policy gauges from one step's diagnostics (`Trainer.step`)."""
    LOSS.set(diag["loss"])
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
