"""`[logging]`: where the learner records a run for people (learner/tracking/).

A section module that shared/config.py assembles. Every backend but `jsonl` needs its own
package, imported only when chosen: a chosen backend that is not installed is a one-line error
naming the pip package.
"""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from shared.config_base import Section

# tensorboard: event files (`tensorboard --logdir DIR`); jsonl: scalars.jsonl and
# completions.jsonl, the files `headrace plot` reads; the others log to their own services.
Backend = Literal["tensorboard", "wandb", "mlflow", "trackio", "jsonl"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def _default_backends() -> list[Backend]:
    return ["tensorboard", "jsonl"]


class LoggingConfig(Section):
    backends: list[Backend] = msgspec.field(default_factory=_default_backends)
    # The run's tracking directory; "": `<learner checkpoint dir>/tb` (so `headrace run` puts it
    # in `<run dir>/learner/tb`)
    dir: str = ""
    completions_per_step: int = 4  # sampled completions recorded per step, with their rewards
    project: str = "headrace"  # wandb / trackio project, mlflow experiment
    run_name: str = ""  # "": the name of the run directory

    def __post_init__(self) -> None:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError("backends has duplicates")
        if self.completions_per_step < 0:
            raise ValueError("completions_per_step must be >= 0 (0: none)")
