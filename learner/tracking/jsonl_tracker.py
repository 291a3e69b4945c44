"""`jsonl`: `scalars.jsonl` and `completions.jsonl` in the tracking directory.

`scalars.jsonl`: one line per `scalars` call, `{"step": N, "<tag>": value, ...}` (a
non-finite value is `null`); `headrace plot` reads it. `completions.jsonl`: one line per
sampled completion, `{"step", "task_id", "family", "reward", "success", "text", "prompt"}`.
Both are appended and flushed line by line, so a reader sees a crashed run up to its last
step; on resume the lines of steps after the checkpoint are cut (they are trained again).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from learner.tracking.base import Completion, Tracker

SCALARS = "scalars.jsonl"
COMPLETIONS = "completions.jsonl"


def _cut_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step`, up to the first unreadable one."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            break  # a torn last line of a crash
        kept.append(line + "\n")
    path.write_text("".join(kept))


class JsonlTracker(Tracker):
    def __init__(self, directory: Path, resume_step: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = (directory / SCALARS, directory / COMPLETIONS)
        for p in self.paths:
            _cut_after(p, resume_step)  # a fresh run (step 0) in a used directory: emptied
        self._files: list[IO[str]] = [open(p, "a") for p in self.paths]  # noqa: SIM115

    def _write(self, f: IO[str], obj: dict[str, object]) -> None:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self._write(self._files[0], {"step": step, **clean})

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        for c in items:
            self._write(self._files[1], c.as_dict())

    def close(self) -> None:
        for f in self._files:
            f.close()
