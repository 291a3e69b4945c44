"""Environments by name. `make_env(task, seed)` builds one episode's environment."""

from __future__ import annotations

from actor.envs.base import Env, EnvError
from actor.envs.symbols import SymbolsEnv
from shared.protocol import TaskSpec

REGISTRY: dict[str, type] = {"symbols": SymbolsEnv}


def make_env(task: TaskSpec, episode_seed: int) -> Env:
    try:
        cls = REGISTRY[task.env]
    except KeyError:
        raise EnvError(f"unknown environment {task.env!r}; known: {sorted(REGISTRY)}") from None
    return cls(dict(task.payload), episode_seed)
