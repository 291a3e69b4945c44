"""`[broker]` and its sub-sections: retention, the replay table, the curriculum curator
(assembled into `Config` by shared/config.py; import them from there)."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from shared.config_base import Section as _Section


class RetentionConfig(_Section):
    """`[broker.retention]`: how old data leaves the store so the disk does not fill.

    Consumed (sampled `max_times_sampled` times) and evicted trajectories go first, oldest
    first; unconsumed ones only while a limit is still exceeded. 0 means unlimited.
    """

    max_age_s: float = 0.0  # delete trajectories stored longer ago than this
    max_trajectories: int = 0  # keep at most this many trajectories
    max_bytes: int = 0  # keep the store's used pages under this many bytes
    interval_s: float = 30.0  # how often the policy runs

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 0 (0 = unlimited)"
            for name in ("max_age_s", "max_trajectories", "max_bytes")
            if getattr(self, name) < 0
        ]
        if self.interval_s <= 0:
            problems.append("interval_s must be > 0")
        if problems:
            raise ValueError("; ".join(problems))


class ReplayConfig(_Section):
    """`[broker.replay]`: the replay table's sampler and rate limiter (Reverb's nouns).

    The removers are `[broker]`'s `replay_capacity`, `max_times_sampled` and `max_staleness`;
    the rate limiters' `min_size_to_sample` is `[broker]`'s too. Counts are in trajectories.
    """

    # "prioritized": whole groups in proportion to priority ** alpha (a sum tree)
    sampler: Literal["fifo", "uniform", "prioritized"] = "fifo"
    alpha: float = 0.6  # prioritized: P(i) ~ priority_i ** alpha
    beta0: float = 0.4  # prioritized: importance-weight exponent at the start ...
    beta_anneal_steps: int = 10000  # ... rising linearly to 1 over this many samples (batches)
    priority_eps: float = 0.0  # added to every priority (> 0: no group becomes unsampleable)
    # group priority from its trajectories' updates
    priority_reduce: Literal["max", "mean"] = "max"
    # "sample_to_insert": Reverb's SampleToInsertRatio
    rate_limiter: Literal["min_size", "sample_to_insert"] = "min_size"
    samples_per_insert: float = 1.0  # sample_to_insert: target samples / inserts
    # sample_to_insert: tolerated drift (trajectories) from the ratio either way; must cover a
    # learner batch plus a group (max_diff - min_diff = 2 * error_buffer) or both sides block
    error_buffer: float = 64.0
    seed: int = 0  # RNG of the uniform and prioritized samplers

    def __post_init__(self) -> None:
        # Only the chosen sampler's and rate limiter's settings count: the others are unused.
        if self.sampler == "prioritized" and not (
            self.alpha >= 0 and 0 <= self.beta0 <= 1 and self.priority_eps >= 0
        ):
            raise ValueError("prioritized sampler: need alpha >= 0, 0 <= beta0 <= 1 and eps >= 0")
        if self.rate_limiter == "sample_to_insert":
            spi = self.samples_per_insert
            if not (spi > 0 and math.isfinite(spi)):
                raise ValueError(f"samples_per_insert must be > 0, got {spi}")
            # Reverb's own bound: max_diff - min_diff = 2 * error_buffer >= 2 * max(1, spi)
            if not self.error_buffer >= max(1.0, spi):
                raise ValueError(
                    f"error_buffer too small: {self.error_buffer:g} < max(1, samples_per_insert)"
                    f" = {max(1.0, spi):g} (max_diff - min_diff = 2 * error_buffer)"
                )


class CuratorConfig(_Section):
    """`[broker.curriculum]`: which task the broker leases next (broker/curriculum/curator.py):
    uniform, or an ACTOR-CURATOR-style bandit.

    Scores are log-weights: an arm's pick probability within a candidate pool is
    (1 - floor) * softmax(score / tau) + floor / pool. Score = prior_scale * scorer(features)
    + the arm's own exponentiated-gradient evidence, which decays back toward 0 by `decay`
    per update. See broker/curriculum/curator.py for the whole algorithm.
    """

    # "uniform": every candidate equally likely (stats are still kept, so switching is warm);
    # "curator": learned probabilities.
    mode: Literal["uniform", "curator"] = "uniform"
    # a bandit arm is one "task" (task_id) or one "family" of tasks
    arm_by: Literal["task", "family"] = "task"
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
    signal: Literal["learnability", "abs_advantage", "pass_rate_delta"] = "learnability"
    # Divide the signal by the group's cost relative to the running mean cost: "none" |
    # "tokens" (generated tokens) | "seconds" (wall time); the signal keeps its units.
    cost: Literal["none", "tokens", "seconds"] = "none"
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


class BrokerConfig(_Section):
    port: int = 5555
    bind_host: str = "127.0.0.1"
    metrics_port: int = 9101
    data_dir: str = "runs/broker"
    durability: Literal["sqlite", "none"] = "sqlite"  # "sqlite": ack after commit
    group_size: int = 8
    lease_deadline_s: float = 120.0
    heartbeat_timeout_s: float = 20.0
    # A lease's episodes must be done this long after its grant, heartbeats or not (0: no
    # limit). Heartbeats prove the actor lives, not that an episode moves: a hung tool call
    # would otherwise keep its lease (and its task) forever. The actor stops such episodes.
    episode_timeout_s: float = 900.0
    max_staleness: int = 4  # policy versions; older trajectories are evicted unsampled
    replay_capacity: int = 4096
    max_times_sampled: int = 1
    min_size_to_sample: int = 1
    max_frame_bytes: int = 64 * 1024 * 1024
    commit_interval_s: float = 0.0  # min spacing of group commits (0: back to back)
    # Trajectory bytes received but not yet committed. A batch that would go past it is not
    # acked (its sender resends it later): memory stays bounded under a slow disk or a flood.
    max_ingest_bytes: int = 256 * 1024 * 1024
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    replay: ReplayConfig = msgspec.field(default_factory=ReplayConfig)
    curriculum: CuratorConfig = msgspec.field(default_factory=CuratorConfig)
    # Groups whose rewards are all equal carry no GRPO signal. true: they never enter replay
    # (counted as evicted "zero_variance"; batches keep their size, the learner waits for
    # other groups); false: they are trained on like any other (advantage 0).
    exclude_zero_variance: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} {getattr(self, name)} is not a port")
        for name in (
            "group_size",
            "replay_capacity",
            "max_times_sampled",
            "max_frame_bytes",
            "max_ingest_bytes",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("lease_deadline_s", "heartbeat_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.episode_timeout_s < 0:
            problems.append("episode_timeout_s must be >= 0 (0 = no limit)")
        if self.commit_interval_s < 0:
            problems.append("commit_interval_s must be >= 0")
        if self.replay_capacity < self.group_size:
            problems.append("replay_capacity must hold at least one group (>= group_size)")
        if problems:
            raise ValueError("; ".join(problems))
