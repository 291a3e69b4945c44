"""Task banks: the finite set of tasks the broker leases out, and how to pick from it.

Picking is uniform for now; a curator (ACTOR-CURATOR style, see METHODS.md) will replace
`pick` with learned probabilities and use the feedback recorded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared import protocol as P
from shared.config import ConfigError, EnvConfig


@dataclass(slots=True)
class Picked:
    task: P.TaskSpec
    prob: float  # probability this pick had (logged with the lease as `sample_prob`)


class TaskBank(Protocol):
    version: int  # curator version (0: uniform)

    def __len__(self) -> int: ...

    def pick(self, n: int) -> list[Picked]: ...

    def feedback(self, fb: P.TaskFeedback) -> None: ...


def _task_seed(base: int, level: int, index: int) -> int:
    # SeedSequence spreads (base, level, index) into well-mixed 32-bit seeds that stay stable
    # across processes and versions, so a task id always means the same episode. 32 bits fit
    # every RNG an environment might feed it to.
    return int(np.random.SeedSequence([base, level, index]).generate_state(1)[0])


class SymbolsBank:
    """Tasks of the built-in `symbols` environment (actor/envs/symbols.py plays them)."""

    version = 0

    def __init__(self, env: EnvConfig) -> None:
        if not env.levels or env.tasks_per_level < 1:
            raise ConfigError("env: the symbols bank needs levels and tasks_per_level >= 1")
        self.tasks: list[P.TaskSpec] = [
            P.TaskSpec(
                task_id=f"symbols-L{level}-{i}",
                env="symbols",
                family=f"L{level}",
                difficulty=float(level),
                payload={
                    "level": level,
                    "seed": _task_seed(env.seed, level, i),
                    "n_choices": env.n_choices,
                    "n_turns": env.n_turns,
                    "reasoning_tokens": env.reasoning_tokens,
                },
            )
            for level in env.levels
            for i in range(env.tasks_per_level)
        ]
        self.by_id = {t.task_id: t for t in self.tasks}
        self.rng = np.random.default_rng(env.seed)
        self.feedback_by_task: dict[str, P.TaskFeedback] = {}

    def __len__(self) -> int:
        return len(self.tasks)

    def pick(self, n: int) -> list[Picked]:
        """`n` tasks uniformly at random, with replacement."""
        if n <= 0:
            return []
        prob = 1.0 / len(self.tasks)
        return [Picked(self.tasks[i], prob) for i in self.rng.integers(len(self.tasks), size=n)]

    def feedback(self, fb: P.TaskFeedback) -> None:
        # Kept (latest per task) for the curator and for `Status`; uniform picking ignores it.
        self.feedback_by_task[fb.task_id] = fb


def make_bank(env: EnvConfig) -> TaskBank:
    if env.name == "symbols":
        return SymbolsBank(env)
    raise ConfigError(f"env.name: no task bank for environment {env.name!r} (known: symbols)")
