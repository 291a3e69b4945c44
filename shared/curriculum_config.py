"""`[broker.curator]`: the curriculum curator's settings (broker/curriculum/curator.py).

Kept apart from shared/config.py until it is wired in there; it imports nothing from it so
that shared/config.py can import it without a cycle. Like every section, unknown keys and
out-of-range values are errors (`ValueError` here; msgspec turns it into a ValidationError
while decoding, and `load_config` into a one-line `ConfigError`).
"""

from __future__ import annotations

import msgspec


class CuratorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Which task the broker leases next: uniform, or an ACTOR-CURATOR-style bandit.

    Scores are log-weights: an arm's pick probability within a candidate pool is
    (1 - floor) * softmax(score / tau) + floor / pool. Score = prior_scale * scorer(features)
    + the arm's own exponentiated-gradient evidence, which decays back toward 0 by `decay`
    per update. See broker/curriculum/curator.py for the whole algorithm.
    """

    # "uniform": every candidate equally likely (stats are still kept, so switching is warm);
    # "curator": learned probabilities.
    mode: str = "uniform"
    arm_by: str = "task"  # a bandit arm is one "task" (task_id) or one "family" of tasks
    # Candidate tasks drawn uniformly from the bank per pick call; a bank no larger than this
    # is taken whole, which makes the logged probabilities the bank-wide ones.
    pool_size: int = 1024
    tau: float = 1.0  # softmax temperature over scores
    floor: float = 0.1  # u: share of probability spread uniformly over the pool (p >= u / N)
    # EG / OSMD step: score += eta * g / p for the updated arm. g/p is about g * pool_size
    # for an average arm, so eta should shrink as pools grow (0.05 * 0.25 * 64 = 0.8 per
    # visit of a maximally learnable arm in a 64-arm pool).
    eta: float = 0.05
    max_step: float = 2.0  # |eta * g / p| is clipped here: a rare pick (tiny p) cannot jump
    # Per update, every arm's own evidence (score above the scorer's prior, decayed visit
    # count, pass-rate sums) shrinks by this factor toward the prior: 1/decay updates is
    # the memory of the bandit, so a policy that learns a task lets it fade.
    decay: float = 0.005
    # Progress signal of a finished group: "learnability" p(1-p) of its pass rate,
    # "abs_advantage" the learner's mean |A|, "pass_rate_delta" |change| since the last visit.
    signal: str = "learnability"
    # Divide the signal by the group's cost relative to the running mean cost: "none" |
    # "tokens" (generated tokens) | "seconds" (wall time); the signal keeps its units.
    cost: str = "none"
    # Scorer: a linear model over task features trained online (normalised LMS) to predict
    # the signal; its prediction times prior_scale is the score of an arm with no evidence
    # (16: a predicted learnability of 0.25 weighs e^4 ~ 55 times a predicted 0).
    prior_scale: float = 16.0
    scorer_lr: float = 0.1  # normalised LMS step, stable for any feature scale below 2
    scorer_l2: float = 1e-4  # weight decay of the scorer (keeps collinear features bounded)
    family_buckets: int = 16  # families are hashed into this many one-hot features
    summary_ema: float = 0.05  # rate of the per-family pass-rate and pick-share averages
    top_arms: int = 10  # arms listed by `summary()`
    seed: int = 0  # the curator's RNG (candidate pools and picks)

    def __post_init__(self) -> None:
        choices = {
            "mode": ("uniform", "curator"),
            "arm_by": ("task", "family"),
            "signal": ("learnability", "abs_advantage", "pass_rate_delta"),
            "cost": ("none", "tokens", "seconds"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")
        if self.pool_size < 1 or self.family_buckets < 1 or self.top_arms < 0:
            raise ValueError("pool_size and family_buckets must be >= 1, top_arms >= 0")
        if self.tau <= 0 or self.max_step <= 0:
            raise ValueError("tau and max_step must be > 0")
        if not 0.0 <= self.floor <= 1.0 or not 0.0 <= self.decay < 1.0:
            raise ValueError("floor must lie in [0, 1] and decay in [0, 1)")
        if self.eta < 0 or self.prior_scale < 0 or self.scorer_l2 < 0:
            raise ValueError("eta, prior_scale and scorer_l2 must be >= 0")
        if not 0.0 <= self.scorer_lr < 2.0 or not 0.0 < self.summary_ema <= 1.0:
            raise ValueError("scorer_lr must lie in [0, 2) and summary_ema in (0, 1]")
