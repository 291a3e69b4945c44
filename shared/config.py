"""Typed TOML configuration shared by all roles.

One file configures the whole run; each role reads its own section. Unknown keys and wrong
types are errors (`ConfigError`, one line) rather than silently ignored settings.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import msgspec


class ConfigError(ValueError):
    pass


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Section):
    path: str = ".cache/models/tiny"
    build_tiny_if_missing: bool = True  # build the tiny random Llama + tokenizer at `path`
    seed: int = 0


class EnvConfig(_Section):
    """The built-in `symbols` environment and its task bank (see actor/envs/symbols.py)."""

    name: str = "symbols"
    levels: list[int] = msgspec.field(default_factory=lambda: [1, 2])  # task-bank levels
    tasks_per_level: int = 64
    reasoning_tokens: int = 4  # free tokens the agent writes before each action
    n_choices: int = 4
    n_turns: int = 3
    seed: int = 0


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
    max_staleness: int = 4  # policy versions; older trajectories are evicted unsampled
    replay_capacity: int = 4096
    max_times_sampled: int = 1
    min_size_to_sample: int = 1
    max_frame_bytes: int = 64 * 1024 * 1024
    commit_interval_s: float = 0.02  # group-commit window
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    replay: ReplayConfig = msgspec.field(default_factory=ReplayConfig)


class ActorConfig(_Section):
    broker: str = "tcp://127.0.0.1:5555"
    metrics_port: int = 9103
    max_concurrent_episodes: int = 32
    temperature: float = 1.0
    max_model_len: int = 512
    outbox_batch: int = 16
    outbox_flush_s: float = 0.2
    heartbeat_s: float = 2.0
    connect_timeout_s: float = 60.0  # retry budget to reach the broker
    seed: int = 0
    kv_cache_gib: int = 1
    engine_multiprocessing: bool = False


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
    is_cap: float = 2.0  # truncated importance weight cap (behaviour -> proximal)
    publish_every: int = 1
    checkpoint_every: int = 10
    checkpoint_dir: str = "runs/learner"
    connect_timeout_s: float = 60.0
    seed: int = 0


class Config(_Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    env: EnvConfig = msgspec.field(default_factory=EnvConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    actor: ActorConfig = msgspec.field(default_factory=ActorConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)

    def digest(self) -> str:
        return hashlib.blake2b(msgspec.json.encode(self), digest_size=8).hexdigest()


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_toml_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
