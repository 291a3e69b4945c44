"""`trackio`: Hugging Face's local-first tracker (`pip install trackio`; `trackio show`).

The wandb-like API: scalars by tag at the learner's step, completions as a table per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from learner.tracking.base import Completion, Tracker

COLUMNS = ["step", "task_id", "family", "reward", "success", "text"]


class TrackioTracker(Tracker):
    def __init__(self, project: str, name: str, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=name, config=config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        data = [[c.step, c.task_id, c.family, c.reward, c.success, c.text] for c in items]
        table = self.trackio.Table(columns=COLUMNS, data=data)
        self.trackio.log({"completions": table}, step=step)

    def close(self) -> None:
        self.trackio.finish()
