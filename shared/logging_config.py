"""`[logging]`: where the learner records a run for people (learner/tracking/).

Kept apart from shared/config.py (at its size budget); like `LoraConfig` it imports nothing
from it. Every backend but `jsonl` needs its own package, imported only when chosen: a chosen
backend that is not installed is a one-line error naming the pip package.
"""

from __future__ import annotations

import msgspec

# tensorboard: event files (`tensorboard --logdir DIR`); jsonl: scalars.jsonl and
# completions.jsonl, the files `headrace plot` reads; the others log to their own services.
BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio", "jsonl")


def _default_backends() -> list[str]:
    return ["tensorboard", "jsonl"]


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backends: list[str] = msgspec.field(default_factory=_default_backends)
    # The run's tracking directory; "": `<learner checkpoint dir>/tb` (so `headrace run` puts it
    # in `<run dir>/learner/tb`)
    dir: str = ""
    completions_per_step: int = 4  # sampled completions recorded per step, with their rewards
    project: str = "headrace"  # wandb / trackio project, mlflow experiment
    run_name: str = ""  # "": the name of the run directory

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(
                f"unknown backends {', '.join(unknown)} (choose from {', '.join(BACKENDS)})"
            )
        if len(set(self.backends)) != len(self.backends):
            raise ValueError("backends has duplicates")
        if self.completions_per_step < 0:
            raise ValueError("completions_per_step must be >= 0 (0: none)")
