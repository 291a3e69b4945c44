"""Environments by name. `make_env(task, seed, options)` builds one episode's environment.

Built-in names map to their classes here; any other `task.env` is a user's environment
("pkg.module:Name" or a `headrace.envs` entry point, shared/env_loader.py), built with
`[env.options]`. The reasoning-gym, TextArena and verifiers adapters import their packages
only when an episode starts, so importing this registry stays cheap for actors that never
play them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actor.envs.base import Env, EnvError
from actor.envs.dataset_env import DatasetEnv
from actor.envs.reasoning_gym_env import ReasoningGymEnv
from actor.envs.symbols import SymbolsEnv
from actor.envs.textarena_env import TextArenaEnv
from actor.envs.verifiers_env import VerifiersEnv
from shared.config import ConfigError, EnvConfig
from shared.env_loader import EnvLoadError, load_env_class, load_function
from shared.protocol import TaskSpec

REGISTRY: dict[str, type] = {
    "symbols": SymbolsEnv,
    "reasoning_gym": ReasoningGymEnv,
    "textarena": TextArenaEnv,
}
# Built-ins that take `[env.options]` as their third argument, as users' envs do
WITH_OPTIONS: dict[str, type] = {"dataset": DatasetEnv, "verifiers": VerifiersEnv}


def make_env(task: TaskSpec, episode_seed: int, options: Mapping[str, Any] | None = None) -> Env:
    payload = dict(task.payload)
    if task.env in REGISTRY:
        return REGISTRY[task.env](payload, episode_seed)
    try:
        cls = WITH_OPTIONS.get(task.env) or load_env_class(task.env)
    except EnvLoadError as e:
        known = sorted([*REGISTRY, *WITH_OPTIONS])
        raise EnvError(f"unknown environment {task.env!r} (built-in: {known}): {e}") from None
    return cls(payload, episode_seed, dict(options or {}))


def check_env(env: EnvConfig) -> None:
    """Load the user code `[env]` names, once, at the actor's start: a module this machine
    lacks is one line and exit code 2 here, not a failed episode per lease forever after."""
    try:
        if env.name not in (*REGISTRY, *WITH_OPTIONS, "mixed"):
            load_env_class(env.name)
        if env.name == "dataset":
            if ":" in env.reward:
                load_function(env.reward, "reward")
            if env.step:
                load_function(env.step, "step")
    except EnvLoadError as e:
        raise ConfigError(f"env: {e}") from None
