"""Typed TOML configuration shared by all roles: the single source of truth for settings.

One file configures the whole run; each role reads its own section. Unknown keys, wrong types,
values outside a key's choices and moved keys are errors (`ConfigError`, one line) rather than
silently ignored settings, and each is checked here, once, when the file is decoded.

This module assembles `Config` from the section modules (config_broker.py, config_learner.py,
env_config.py, lora_config.py, logging_config.py) and re-exports their sections: import any
section from here.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from shared.affinity import check_cpus
from shared.config_base import ConfigError, find_moved
from shared.config_base import Section as _Section
from shared.config_broker import (
    BrokerConfig,
    CuratorConfig,
    ReplayConfig,
    RetentionConfig,
)
from shared.config_learner import (
    AdvantageConfig,
    AlertConfig,
    CorrectionConfig,
    CorrectionMode,
    LearnerConfig,
    WeightingConfig,
)
from shared.env_config import (
    EnvConfig,
    ReasoningGymConfig,
    SymbolsConfig,
    SymbolsFamily,
    TextArenaConfig,
)
from shared.logging_config import LoggingConfig
from shared.lora_config import LoraConfig
from shared.overrides import apply_overrides, explain, set_argv

__all__ = [
    "TINY_MARKER",
    "ActorConfig",
    "AdvantageConfig",
    "AlertConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "CorrectionConfig",
    "CorrectionMode",
    "CuratorConfig",
    "EnvConfig",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ReasoningGymConfig",
    "ReplayConfig",
    "RetentionConfig",
    "SecurityConfig",
    "SymbolsConfig",
    "SymbolsFamily",
    "TextArenaConfig",
    "WeightingConfig",
    "load_config",
    "to_toml_dict",
]

# Written by `learner.tiny_model` beside the tiny model's weights: {"seed": N}.
TINY_MARKER = "headrace_tiny.json"


class ModelConfig(_Section):
    """`[model]`: what every role loads (shared/models.py resolves `path`)."""

    # A Hugging Face model directory, or a hub id found in the local HF cache
    path: str = ".cache/models/tiny"
    build_tiny_if_missing: bool = False  # build the tiny random Llama + tokenizer at `path`
    seed: int = 0  # the tiny model's initialisation (when built here)
    # Precision of the actors' engines and of the learner's forward passes (autocast; its
    # weights and optimiser stay float32): "auto" is the checkpoint's own
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "auto": the tokenizer's own chat template (raw text prompts when it has none); "none":
    # raw text prompts; or the path of a Jinja template file (actor/chat.py)
    chat_template: str = "auto"
    system_prompt: str = ""  # with a chat template: the system message ("": the template's)

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


class ActorConfig(_Section):
    broker: str = "tcp://127.0.0.1:5555"
    metrics_port: int = 9103
    max_concurrent_episodes: int = 32
    # Groups of leases asked for before their slots free up, so a group that ends is followed
    # without waiting for the broker (0: ask only when a group's slots are free). [actor] sync
    # holds none: a lease held ahead would be played on the next policy version. A lease's
    # [broker] episode_timeout_s counts from its grant, so one held ahead has that much less
    # time to play: set 0 where an episode takes a good part of that timeout.
    leases_ahead: int = 1
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
    # CPU core ids this actor's process and its engine run on (shared/affinity.py): on a CPU
    # the engine's OpenMP threads are bound to them (VLLM_CPU_OMP_THREADS_BIND, unless set in
    # the environment); [] (default): unpinned, the engine's threads unbound
    cpus: list[int] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        check_cpus(self.cpus, "[actor] cpus")
        if self.leases_ahead < 0:
            raise ValueError(f"[actor] leases_ahead is {self.leases_ahead}: want 0 or more")
        if self.cpus and len(self.cpus) < self.tensor_parallel_size:
            raise ValueError(
                f"[actor] cpus lists {len(self.cpus)} cores for tensor_parallel_size = "
                f"{self.tensor_parallel_size} engine workers: want one each at least"
            )


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
    moved = find_moved(raw)
    if moved:
        with_sets = f" with {' '.join(set_argv(overrides))}" if overrides else ""
        raise ConfigError(f"{path or 'the defaults'}{with_sets}: {moved}")
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(explain(e, str(path or "the defaults"), overrides, Config)) from None


def to_toml_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
