"""Environments by name. `make_env(task, seed)` builds one episode's environment.

The reasoning-gym and TextArena adapters import their packages only when an episode starts,
so importing this registry stays cheap for actors that never play them.
"""

from __future__ import annotations

from actor.envs.base import Env, EnvError
from actor.envs.reasoning_gym_env import ReasoningGymEnv
from actor.envs.symbols import SymbolsEnv
from actor.envs.textarena_env import TextArenaEnv
from shared.protocol import TaskSpec

REGISTRY: dict[str, type] = {
    "symbols": SymbolsEnv,
    "reasoning_gym": ReasoningGymEnv,
    "textarena": TextArenaEnv,
}


def make_env(task: TaskSpec, episode_seed: int) -> Env:
    try:
        cls = REGISTRY[task.env]
    except KeyError:
        raise EnvError(f"unknown environment {task.env!r}; known: {sorted(REGISTRY)}") from None
    return cls(dict(task.payload), episode_seed)
