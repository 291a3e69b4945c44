"""`[learner]` and its sub-sections: the off-policy correction and its alerts, the advantage
estimator, per-token weighting, LoRA (assembled into `Config` by shared/config.py; import them
from there)."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from shared.affinity import check_cpus
from shared.config_base import RENAMED_VALUES
from shared.config_base import Section as _Section
from shared.lora_config import LoraConfig

# Token roles (learner/weighting.py): what a trained token is part of
Role = Literal["prompt", "observation", "reasoning", "action", "template"]
CorrectionMode = Literal["none", "tis", "mis", "decoupled", "segment_trace"]


class AlertConfig(_Section):
    """`[learner.correction.alert]`: log a WARNING naming the diagnostic that crosses its bound.

    A bound <= 0 is off. While a diagnostic stays out of bounds the warning repeats every
    `repeat_every` steps; its return inside the bounds is logged once.
    """

    min_ess: float = 0.3  # normalised effective sample size of the IS weights, in (0, 1]
    max_kl_behaviour: float = 1.0  # k3 estimate of KL(behaviour || proximal), nats per token
    max_clip_fraction: float = 0.0  # fraction of tokens whose gradient the PPO clip cuts
    max_masked_fraction: float = 0.5  # fraction of tokens the correction drops (mis)
    max_staleness: float = 0.0  # mean policy versions between a token and the learner
    # nats: mean proximal entropy of the step's action tokens; below it the policy has (nearly)
    # stopped exploring its actions (entropy collapse)
    min_action_entropy: float = 0.05
    repeat_every: int = 20

    def __post_init__(self) -> None:
        bounds = ("min_ess", "max_kl_behaviour", "max_clip_fraction", "max_masked_fraction")
        for name in (*bounds, "max_staleness", "min_action_entropy"):
            if math.isnan(getattr(self, name)):
                raise ValueError(f"{name} must be a number (<= 0: off), not nan")


_VTRACE_RENAMED = (
    'mode "vtrace" was renamed to "segment_trace": it is a critic-free, segment-level trace '
    "heuristic (one trace coefficient per policy-version segment, no value function), not "
    "V-trace proper"
)
RENAMED_VALUES[("learner", "correction", "mode")] = {"vtrace": _VTRACE_RENAMED}


class CorrectionConfig(_Section):
    """`[learner.correction]`: how tokens sampled by older / other policies are corrected.

    Modes (see learner/correction.py): "none" | "tis" | "mis" | "decoupled" | "segment_trace".
    """

    mode: CorrectionMode = "decoupled"
    is_cap: float = 2.0  # tis, decoupled: truncation cap c of the importance weight
    mis_threshold: float = 2.0  # mis: keep tokens whose ratio lies in [1/thr, thr]
    # mis: drop single tokens ("token") or whole trajectories ("sequence")
    level: Literal["token", "sequence"] = "token"
    rho_bar: float = 1.0  # segment_trace: cap of the per-token importance weight
    c_bar: float = 1.0  # segment_trace: cap of the per-segment trace coefficient
    # segment_trace: traces of later ("suffix") or earlier ("prefix") segments
    trace: Literal["suffix", "prefix"] = "suffix"
    alert: AlertConfig = msgspec.field(default_factory=AlertConfig)

    def __post_init__(self) -> None:
        if self.mode == "vtrace":  # built in code: decoding refuses it before this runs
            raise ValueError(_VTRACE_RENAMED)
        if self.is_cap <= 0 or self.rho_bar <= 0 or self.c_bar <= 0:
            raise ValueError("is_cap, rho_bar and c_bar must be > 0")
        if self.mis_threshold <= 1:
            raise ValueError("mis_threshold must be > 1")


class AdvantageConfig(_Section):
    """`[learner.advantage]`: the critic-free advantage estimator (learner/advantages.py)."""

    estimator: Literal["grpo", "rloo", "turn_level", "gigpo"] = "grpo"  # turn_level: TRLOO
    scale_by_std: bool = True  # grpo and both gigpo levels: divide by the group std
    gamma: float = 1.0  # turn_level, gigpo: discount of later turns' rewards in a turn's return
    step_weight: float = 1.0  # gigpo: w in A = A_episode + w * A_step
    # Rollouts cut by the turn or token limit get loss mask 0 (and leave the baseline)
    # instead of being trained on as failures.
    mask_truncated: bool = False


def _default_role_weights() -> dict[Role, float]:
    return {"prompt": 0.0, "observation": 0.0, "reasoning": 0.1, "action": 1.0, "template": 0.0}


class WeightingConfig(_Section):
    """`[learner.weighting]`: per-token loss weights by role (learner/weighting.py).

    "uniform": every trained token 1. "roles": `role_weights` by token role. "actfocus": role
    weights, then each turn's action-token weight is redistributed towards uncertain tokens.
    """

    mode: Literal["uniform", "roles", "actfocus"] = "uniform"
    # Roles left out keep these defaults; set reasoning > action to test HICRA's hypothesis.
    role_weights: dict[Role, float] = msgspec.field(default_factory=_default_role_weights)
    energy: Literal["entropy", "neg_logprob"] = "entropy"  # actfocus: of the proximal policy
    tau: float = 1.0  # actfocus: softmax temperature over energies (inf: uniform)
    w_max: float = 3.0  # actfocus: cap of an action token's weight relative to the turn mean

    def __post_init__(self) -> None:
        self.role_weights = {**_default_role_weights(), **self.role_weights}
        if any(w < 0 for w in self.role_weights.values()):
            raise ValueError("role_weights must be >= 0")
        if self.tau <= 0 or self.w_max < 1:
            raise ValueError("tau must be > 0 and w_max >= 1")


class LearnerConfig(_Section):
    broker: str = "tcp://127.0.0.1:5555"
    metrics_port: int = 9102
    weights_host: str = "127.0.0.1"  # address actors use to reach the weight endpoint
    weights_port: int = 5556
    steps: int = 30
    batch_groups: int = 4  # GRPO groups per step
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    # DAPO's clip-higher: the ratio is clamped to [1 - clip_eps_low, 1 + clip_eps_high];
    # a negative value takes clip_eps (the symmetric PPO clip)
    clip_eps_low: float = -1.0
    clip_eps_high: float = -1.0
    # Entropy bonus: loss -= entropy_coef * the weighted mean entropy (current policy) of the
    # trained tokens whose role is in entropy_roles (0: off)
    entropy_coef: float = 0.0
    entropy_roles: list[Role] = msgspec.field(default_factory=lambda: ["action"])
    # Linear lr warm-up: optimiser step k (1-based) uses lr * min(1, k / warmup_steps); 0: off
    warmup_steps: int = 0
    # After the warm-up: "constant" lr, or "cosine" decay to lr * min_lr_ratio at the run's
    # last optimiser step (steps x ppo_epochs x minibatches)
    lr_decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    ppo_epochs: int = 1  # passes over each batch; > 1 makes the clip around the proximal bite
    minibatches: int = 1  # optimiser steps per pass (the batch split by trajectory)
    publish_every: int = 1
    # Gradient accumulation by token budget: each forward/backward pass takes at most this
    # many (padded) tokens; an optimiser step still covers the whole (mini)batch
    micro_batch_tokens: int = 16384
    # Pack each micro-batch's trajectories into rows without padding: positions restart at 0
    # per trajectory and attention stops at its boundaries (learner/batch.py); the same losses
    # and gradients as the right-padded rows of `false`, fewer tokens through the decoder
    packing: bool = True
    # Recompute each decoder layer's activations in the backward pass (HF gradient
    # checkpointing): memory for time, for models whose activations do not fit
    activation_checkpointing: bool = False
    checkpoint_every: int = 10
    checkpoint_dir: str = "runs/learner"
    # Complete checkpoints kept: older ones are deleted once a newer one is on disk (0: all)
    keep_checkpoints: int = 3
    # Held-out evaluation every this many steps (0: never) and after the last step: the
    # broker hands `eval_tasks` held-out tasks per family x `eval_samples` episodes to the
    # actors (broker/evaluation.py); the learner waits up to `eval_timeout_s` for the last
    eval_every: int = 0
    eval_tasks: int = 16
    eval_samples: int = 4
    eval_timeout_s: float = 600.0
    connect_timeout_s: float = 60.0
    seed: int = 0
    # CPU core ids the learner process runs on (shared/affinity.py); with `--torch-threads 0`
    # (auto) torch then uses one thread per core listed. [] (default): unpinned, and on a CPU
    # torch uses half the machine's cores
    cpus: list[int] = msgspec.field(default_factory=list)
    correction: CorrectionConfig = msgspec.field(default_factory=CorrectionConfig)
    advantage: AdvantageConfig = msgspec.field(default_factory=AdvantageConfig)
    weighting: WeightingConfig = msgspec.field(default_factory=WeightingConfig)
    # LoRA adapters instead of full fine-tuning; actors then load only the adapter
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check_cpus(self.cpus, "[learner] cpus")
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ValueError("ppo_epochs and minibatches must be >= 1")
        low, high = self.clip_bounds()
        if not 0 <= low < 1 or not 0 <= high < math.inf:
            raise ValueError(
                "want 0 <= eps_low < 1 and 0 <= eps_high < inf (clip_eps_low / clip_eps_high, "
                f"clip_eps where they are negative); got eps_low={low}, eps_high={high}"
            )
        if not 0 <= self.entropy_coef < math.inf:
            raise ValueError("entropy_coef must be >= 0 (0: no entropy bonus)")
        if self.entropy_coef > 0 and not self.entropy_roles:
            raise ValueError("entropy_roles is empty but entropy_coef > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0 (0: no warm-up)")
        if self.keep_checkpoints < 0:
            raise ValueError("keep_checkpoints must be >= 0 (0: keep every checkpoint)")

    def clip_bounds(self) -> tuple[float, float]:
        """(eps_low, eps_high): the ratio is clamped to [1 - eps_low, 1 + eps_high]."""
        low = self.clip_eps if self.clip_eps_low < 0 else self.clip_eps_low
        high = self.clip_eps if self.clip_eps_high < 0 else self.clip_eps_high
        return low, high
