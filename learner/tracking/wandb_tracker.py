"""`wandb`: Weights & Biases (`pip install wandb`; online or `WANDB_MODE=offline`).

Scalars by tag against `learner_step`; completions as a table (`completions`) per step. The
run's files go under the tracking directory; project and name come from `[logging]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.tracking.base import Completion, Tracker

COLUMNS = ["step", "task_id", "family", "reward", "success", "text"]
STEP = "learner_step"


class WandbTracker(Tracker):
    def __init__(self, directory: Path, project: str, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=str(directory), config=config)
        # Every chart's x axis is the learner's step, logged as a value: an evaluation of an
        # earlier step arrives after later steps, and wandb's own step only goes forward.
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, STEP: step})

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        data = [[c.step, c.task_id, c.family, c.reward, c.success, c.text] for c in items]
        self.run.log({"completions": self.wandb.Table(columns=COLUMNS, data=data), STEP: step})

    def close(self) -> None:
        self.run.finish()
