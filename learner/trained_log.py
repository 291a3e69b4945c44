"""`CHECKPOINT_DIR/trained.jsonl`: which trajectories each learner step trained.

One JSON line per step, `{"step", "batch_id", "traj_ids"}`, appended as the step ends. A
learner that resumes from a checkpoint at step `c` cuts the file back to steps <= c: what
later steps trained is gone with their weights, and the broker hands those batches again
(broker/batches.py). So the file always tells the lineage of the current weights, and a
trajectory appearing twice in it was trained twice (what the chaos benchmark checks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAME = "trained.jsonl"
MAX_REMEMBERED = 100_000  # batch ids a resumed learner recognises (the newest steps')


class TrainedLog:
    def __init__(self, directory: Path, resume_step: int) -> None:
        self.path = directory / NAME
        directory.mkdir(parents=True, exist_ok=True)
        kept = [e for e in read(self.path) if e["step"] <= resume_step]
        # What the current weights hold, by batch: a batch the broker offers again because
        # a crash took its acknowledgement must be acknowledged, not trained a second time.
        self.batches: dict[int, int] = {
            e["batch_id"]: e["step"] for e in kept[-MAX_REMEMBERED:] if e.get("batch_id")
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a")  # noqa: SIM115 - open for the learner's life

    def append(self, step: int, batch_id: int, traj_ids: list[str]) -> None:
        self._f.write(json.dumps({"step": step, "batch_id": batch_id, "traj_ids": traj_ids}))
        self._f.write("\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of a log; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("step"), int):
            yield e
