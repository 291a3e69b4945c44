"""`tensorboard`: event files in the tracking directory (`tensorboard --logdir DIR`).

Scalars under their tags; completions as one text summary per step (`completions`), a
Markdown table of reward, task and text. On resume the writer purges the events of steps
after the checkpoint, which the run trains again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from learner.tracking.base import Completion, Tracker

TEXT_TAG = "completions"


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, lines joined by <br>."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def completions_markdown(items: Sequence[Completion]) -> str:
    rows = ["| reward | task | family | completion |", "|---|---|---|---|"]
    for c in items:
        rows.append(
            f"| {c.reward:.3f} | {_cell(c.task_id)} | {_cell(c.family)} | {_cell(c.text)} |"
        )
    return "\n".join(rows)


class TensorBoardTracker(Tracker):
    def __init__(self, directory: Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        kwargs = {"purge_step": resume_step + 1} if resume_step > 0 else {}
        self.writer = SummaryWriter(log_dir=str(directory), flush_secs=10, **kwargs)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        self.writer.add_text(TEXT_TAG, completions_markdown(items), step)

    def close(self) -> None:
        self.writer.close()
