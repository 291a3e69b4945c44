"""Which task bank an `[env]` config names: the one place that knows every kind of bank.

Built-in procedural banks (banks.py), datasets (dataset_bank.py), verifiers tasksets
(verifiers_bank.py), users' environments by import path or entry point (user_banks.py), and
"mixed" over several of them. Its own module so that none of those imports another's factory.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.curriculum.banks import (
    MixedBank,
    ProceduralBank,
    SymbolsBank,
    TaskBank,
)
from broker.curriculum.dataset_bank import DatasetBank
from broker.curriculum.gym_banks import ReasoningGymBank, TextArenaBank
from broker.curriculum.user_banks import user_env_bank
from broker.curriculum.verifiers_bank import VerifiersBank
from shared.config import ConfigError, EnvConfig
from shared.env_loader import entry_point_names, is_import_path

_BANKS: dict[str, Callable[[EnvConfig], ProceduralBank]] = {
    "symbols": SymbolsBank,
    "reasoning_gym": ReasoningGymBank,
    "textarena": TextArenaBank,
    "dataset": DatasetBank,
    "verifiers": VerifiersBank,
}


def _bank(name: str, env: EnvConfig) -> ProceduralBank:
    if name in _BANKS:
        return _BANKS[name](env)
    if is_import_path(name) or name in entry_point_names():
        return user_env_bank(name, env)
    known = ", ".join([*_BANKS, "mixed", "pkg.module:Name"])
    raise ConfigError(f"env.name: no task bank for environment {name!r} (known: {known})")


def make_bank(env: EnvConfig) -> TaskBank:
    if env.name == "mixed":
        if "mixed" in env.mixed:
            raise ConfigError("env.mixed: a mixed bank cannot contain itself")
        return MixedBank([_bank(b, env) for b in env.mixed], env.seed)
    return _bank(env.name, env)
