"""`mlflow`: MLflow (`pip install mlflow`; `mlflow ui --backend-store-uri DIR/mlruns`).

Metrics by tag at the learner's step, into `$MLFLOW_TRACKING_URI` when set, else a file store
in the tracking directory; the experiment is `[logging] project`. Completions are one JSON
artifact per step (`completions/step_000012.json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.tracking.base import Completion, Tracker


class MlflowTracker(Tracker):
    def __init__(self, directory: Path, project: str, name: str, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((directory / "mlruns").resolve().as_uri())
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=name)
        # mlflow params are flat strings: the config as one artifact instead
        mlflow.log_dict(config, "config.json")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        text = json.dumps([c.as_dict() for c in items], ensure_ascii=False, indent=1)
        self.mlflow.log_text(text, f"completions/step_{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()
