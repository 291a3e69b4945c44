"""Typed TOML configuration shared by all roles.

One file configures the whole run; each role reads its own section. Unknown keys and wrong
types are errors (`ConfigError`, one line) rather than silently ignored settings.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path

import msgspec

from shared.config_base import ConfigError
from shared.config_base import Section as _Section
from shared.config_base import check_choice as _check_choice
from shared.curriculum_config import CuratorConfig
from shared.env_config import EnvConfig, SymbolsFamily  # noqa: F401 (re-exported)
from shared.logging_config import LoggingConfig
from shared.lora_config import LoraConfig

# Written by `learner.tiny_model` beside the tiny model's weights: {"seed": N}.
TINY_MARKER = "headrace_tiny.json"


class ModelConfig(_Section):
    """`[model]`: what every role loads (shared/models.py resolves `path`)."""

    # A Hugging Face model directory, or a hub id found in the local HF cache
    path: str = ".cache/models/tiny"
    build_tiny_if_missing: bool = False  # build the tiny random Llama + tokenizer at `path`
    seed: int = 0  # the tiny model's initialisation (when built here)
    # Precision of the actors' engines and of the learner's forward passes (autocast; its
    # weights and optimiser stay float32): "auto" (the checkpoint's own), "float32",
    # "bfloat16", "float16"
    dtype: str = "auto"
    # "auto": the tokenizer's own chat template (raw text prompts when it has none); "none":
    # raw text prompts; or the path of a Jinja template file (actor/chat.py)
    chat_template: str = "auto"
    system_prompt: str = ""  # with a chat template: the system message ("": the template's)

    def __post_init__(self) -> None:
        _check_choice(self, "dtype", ("auto", "float32", "bfloat16", "float16"))

    def check_tiny_seed(self) -> None:
        """Refuse a tiny model at `path` that was built with another seed.

        The tiny model is built once per path; a later run with another `[model] seed` would
        otherwise train the old initialisation without a word (seed sweeps would share it).
        """
        marker = Path(self.path) / TINY_MARKER
        if not (self.build_tiny_if_missing and marker.exists()):
            return
        built = int(msgspec.json.decode(marker.read_bytes()).get("seed", -1))
        if built != self.seed:
            raise ConfigError(
                f"the tiny model at {self.path} was built with seed {built}, but [model] seed "
                f"is {self.seed}: point [model] path at another folder (or delete this one)"
            )


class RetentionConfig(_Section):
    """`[broker.retention]`: how old data leaves the store so the disk does not fill.

    Consumed (sampled `max_times_sampled` times) and evicted trajectories go first, oldest
    first; unconsumed ones only while a limit is still exceeded. 0 means unlimited.
    """

    max_age_s: float = 0.0  # delete trajectories stored longer ago than this
    max_trajectories: int = 0  # keep at most this many trajectories
    max_bytes: int = 0  # keep the store's used pages under this many bytes
    interval_s: float = 30.0  # how often the policy runs


class ReplayConfig(_Section):
    """`[broker.replay]`: the replay table's sampler and rate limiter (Reverb's nouns).

    The removers are `[broker]`'s `replay_capacity`, `max_times_sampled` and `max_staleness`;
    the rate limiters' `min_size_to_sample` is `[broker]`'s too. Counts are in trajectories.
    """

    sampler: str = "fifo"  # "fifo" | "uniform" | "prioritized" (whole groups, sum tree)
    alpha: float = 0.6  # prioritized: P(i) ~ priority_i ** alpha
    beta0: float = 0.4  # prioritized: importance-weight exponent at the start ...
    beta_anneal_steps: int = 10000  # ... rising linearly to 1 over this many samples (batches)
    priority_eps: float = 0.0  # added to every priority (> 0: no group becomes unsampleable)
    priority_reduce: str = "max"  # group priority from its trajectories' updates: max | mean
    rate_limiter: str = "min_size"  # "min_size" | "sample_to_insert" (Reverb's ratio)
    samples_per_insert: float = 1.0  # sample_to_insert: target samples / inserts
    # sample_to_insert: tolerated drift (trajectories) from the ratio either way; must cover a
    # learner batch plus a group (max_diff - min_diff = 2 * error_buffer) or both sides block
    error_buffer: float = 64.0
    seed: int = 0  # RNG of the uniform and prioritized samplers

    def __post_init__(self) -> None:
        choices = {
            "sampler": ("fifo", "uniform", "prioritized"),
            "rate_limiter": ("min_size", "sample_to_insert"),
            "priority_reduce": ("mean", "max"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")


class BrokerConfig(_Section):
    port: int = 5555
    bind_host: str = "127.0.0.1"
    metrics_port: int = 9101
    data_dir: str = "runs/broker"
    durability: str = "sqlite"  # "sqlite": ack after commit; "none": throwaway runs
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


class ActorConfig(_Section):
    broker: str = "tcp://127.0.0.1:5555"
    metrics_port: int = 9103
    max_concurrent_episodes: int = 32
    temperature: float = 1.0
    # Sampling truncation (vLLM's order: top-k, then top-p). The learner recomputes logprobs
    # under the same truncated distribution, so the importance ratio stays unbiased.
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    max_model_len: int = 512
    outbox_batch: int = 16
    outbox_flush_s: float = 0.2
    heartbeat_s: float = 2.0
    connect_timeout_s: float = 60.0  # retry budget to reach the broker
    seed: int = 0
    kv_cache_gib: int = 1
    engine_multiprocessing: bool = False
    # vLLM engine arguments; the defaults suit a CPU (on a GPU: enforce_eager = false and a
    # gpu_memory_utilization that leaves room for whatever else shares the device)
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    # Synchronous RL (generate a batch, train, update weights, repeat), for comparison with
    # the default asynchronous pipeline. true: per policy version the actor takes leases for
    # at most `[learner] batch_groups` groups, then takes no more until it has loaded the
    # next version (or, should a group be lost, `[broker] lease_deadline_s` on one version).
    # Pair it with `[broker] max_staleness = 0` (anything older than the learner's version is
    # evicted) and `[learner] publish_every = 1`; with several sync actors each takes a whole
    # batch per version and the surplus is evicted as stale.
    sync: bool = False


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


class CorrectionConfig(_Section):
    """`[learner.correction]`: how tokens sampled by older / other policies are corrected.

    Modes (see learner/correction.py): "none" | "tis" | "mis" | "decoupled" | "segment_trace".
    """

    mode: str = "decoupled"
    is_cap: float = 2.0  # tis, decoupled: truncation cap c of the importance weight
    mis_threshold: float = 2.0  # mis: keep tokens whose ratio lies in [1/thr, thr]
    level: str = "token"  # mis: drop single tokens ("token") or whole trajectories ("sequence")
    rho_bar: float = 1.0  # segment_trace: cap of the per-token importance weight
    c_bar: float = 1.0  # segment_trace: cap of the per-segment trace coefficient
    # segment_trace: traces of later ("suffix") or earlier ("prefix") segments
    trace: str = "suffix"
    alert: AlertConfig = msgspec.field(default_factory=AlertConfig)

    def __post_init__(self) -> None:
        if self.mode == "vtrace":
            raise ValueError(
                'mode "vtrace" was renamed to "segment_trace": it is a critic-free, '
                "segment-level trace heuristic (one trace coefficient per policy-version "
                "segment, no value function), not V-trace proper"
            )
        _check_choice(self, "mode", ("none", "tis", "mis", "decoupled", "segment_trace"))
        _check_choice(self, "level", ("token", "sequence"))
        _check_choice(self, "trace", ("suffix", "prefix"))
        if self.is_cap <= 0 or self.rho_bar <= 0 or self.c_bar <= 0:
            raise ValueError("is_cap, rho_bar and c_bar must be > 0")
        if self.mis_threshold <= 1:
            raise ValueError("mis_threshold must be > 1")


class AdvantageConfig(_Section):
    """`[learner.advantage]`: the critic-free advantage estimator (learner/advantages.py)."""

    estimator: str = "grpo"  # "grpo" | "rloo" | "turn_level" (TRLOO) | "gigpo"
    scale_by_std: bool = True  # grpo and both gigpo levels: divide by the group std
    gamma: float = 1.0  # turn_level, gigpo: discount of later turns' rewards in a turn's return
    step_weight: float = 1.0  # gigpo: w in A = A_episode + w * A_step
    # Rollouts cut by the turn or token limit get loss mask 0 (and leave the baseline)
    # instead of being trained on as failures.
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        _check_choice(self, "estimator", ("grpo", "rloo", "turn_level", "gigpo"))


def _default_role_weights() -> dict[str, float]:
    return {"prompt": 0.0, "observation": 0.0, "reasoning": 0.1, "action": 1.0, "template": 0.0}


class WeightingConfig(_Section):
    """`[learner.weighting]`: per-token loss weights by role (learner/weighting.py).

    "uniform": every trained token 1. "roles": `role_weights` by token role. "actfocus": role
    weights, then each turn's action-token weight is redistributed towards uncertain tokens.
    """

    mode: str = "uniform"
    # Roles left out keep these defaults; set reasoning > action to test HICRA's hypothesis.
    role_weights: dict[str, float] = msgspec.field(default_factory=_default_role_weights)
    energy: str = "entropy"  # actfocus: "entropy" | "neg_logprob" of the proximal policy
    tau: float = 1.0  # actfocus: softmax temperature over energies (inf: uniform)
    w_max: float = 3.0  # actfocus: cap of an action token's weight relative to the turn mean

    def __post_init__(self) -> None:
        _check_choice(self, "mode", ("uniform", "roles", "actfocus"))
        _check_choice(self, "energy", ("entropy", "neg_logprob"))
        self.role_weights = {**_default_role_weights(), **self.role_weights}
        unknown = set(self.role_weights) - set(_default_role_weights())
        if unknown:
            raise ValueError(f"unknown roles in role_weights: {', '.join(sorted(unknown))}")
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
    entropy_roles: list[str] = msgspec.field(default_factory=lambda: ["action"])
    # Linear lr warm-up: optimiser step k (1-based) uses lr * min(1, k / warmup_steps); 0: off
    warmup_steps: int = 0
    # After the warm-up: "constant" lr, or "cosine" decay to lr * min_lr_ratio at the run's
    # last optimiser step (steps x ppo_epochs x minibatches)
    lr_decay: str = "constant"
    min_lr_ratio: float = 0.1
    ppo_epochs: int = 1  # passes over each batch; > 1 makes the clip around the proximal bite
    minibatches: int = 1  # optimiser steps per pass (the batch split by trajectory)
    publish_every: int = 1
    # Gradient accumulation by token budget: each forward/backward pass takes at most this
    # many (padded) tokens; an optimiser step still covers the whole (mini)batch
    micro_batch_tokens: int = 16384
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
    correction: CorrectionConfig = msgspec.field(default_factory=CorrectionConfig)
    advantage: AdvantageConfig = msgspec.field(default_factory=AdvantageConfig)
    weighting: WeightingConfig = msgspec.field(default_factory=WeightingConfig)
    # LoRA adapters instead of full fine-tuning; actors then load only the adapter
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
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
        unknown = sorted(set(self.entropy_roles) - set(_default_role_weights()))
        if unknown:
            roles = ", ".join(_default_role_weights())
            raise ValueError(f"unknown roles in entropy_roles: {', '.join(unknown)} ({roles})")
        if self.entropy_coef > 0 and not self.entropy_roles:
            raise ValueError("entropy_roles is empty but entropy_coef > 0")
        _check_choice(self, "lr_decay", ("constant", "cosine"))
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


class SecurityConfig(_Section):
    """`[security]`: CurveZMQ on every socket (shared/security.py).

    `headrace keys generate DIR` writes `<role>.key` / `<role>.key_secret` for broker,
    learner, actor and cli, and the clients' public keys in `DIR/clients`. A path left ""
    resolves inside `keys_dir` by role, so one config serves every role; set `secret_key` only
    in a per-machine config (it applies to every role that reads the file).
    """

    curve: bool = False  # encrypt and authenticate every connection
    keys_dir: str = "keys"
    secret_key: str = ""  # this role's key pair; "": <keys_dir>/<role>.key_secret
    broker_public_key: str = ""  # the broker to trust; "": <keys_dir>/broker.key
    learner_public_key: str = ""  # the weight endpoint to trust; "": <keys_dir>/learner.key
    # Servers admit only the client public keys (*.key) in here; "": <keys_dir>/clients
    allowed_clients_dir: str = ""
    # Without curve, a broker or weight endpoint that binds beyond loopback lets anyone who
    # reaches the port act as any role; it refuses to start unless this says it is meant.
    insecure: bool = False


class Config(_Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    actor: ActorConfig = msgspec.field(default_factory=ActorConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def digest(self) -> str:
        return hashlib.blake2b(msgspec.json.encode(self), digest_size=8).hexdigest()


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The file's config (defaults without one), `--set` overrides applied (shared/overrides)."""
    from shared.overrides import apply_overrides, explain  # it imports ConfigError from here

    raw: dict = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    raw = apply_overrides(raw, overrides, Config)
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(explain(e, str(path or "the defaults"), overrides)) from None


def to_toml_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
