"""The tracker the learner loop holds: `Learner.tracker` (learner/loop.py).

After each step the loop calls `tracker.record_step(entry, batch.items)`: the entry's scalars
under the tags of learner/tracking/tags.py, and `[logging] completions_per_step` of the
batch's trajectories as text. Anything else the learner measures goes through the same
object, e.g. a periodic evaluation:

    self.tracker.scalars(self.step, {"eval/pass_at_1": 0.42, "eval/reward_mean": 0.51})

(tags are free-form; `eval/` ones are what `headrace plot` draws as the eval curve). Before
`Learner.run` opens the configured backends it is a tracker that records nothing, and so it
stays in follower ranks and the offline replay.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.tracking import build_tracker, tracking_dir
from learner.tracking.base import FanOut, Tracker
from learner.tracking.completions import Decoder, sample_completions
from learner.tracking.tags import scalar_tags
from shared.config import Config, to_toml_dict
from shared.protocol import Trajectory

log = logging.getLogger("learner.tracking")


class StepTracker(FanOut):
    """A fan-out over the chosen backends that also knows how to record a learner step."""

    def __init__(
        self,
        backends: Sequence[Tracker] = (),
        decode: Decoder | None = None,
        per_step: int = 0,
        directory: Path | None = None,
    ) -> None:
        super().__init__(backends)
        self.decode, self.per_step, self.directory = decode, per_step, directory

    def viewers(self) -> list[str]:
        """The commands that show what the file backends wrote (for the closing summary)."""
        names = {type(b).__name__ for b in self.backends}
        d = shlex.quote(str(self.directory))
        out = [f"tensorboard --logdir {d}"] if "TensorBoardTracker" in names else []
        return out + ([f"headrace plot {d}"] if "JsonlTracker" in names else [])

    def record_step(self, entry: dict[str, Any], items: Sequence[Trajectory]) -> None:
        if not self.backends:
            return
        step = int(entry["step"])
        self.scalars(step, scalar_tags(entry))
        if self.decode is not None and self.per_step > 0:
            self.completions(step, sample_completions(items, self.per_step, step, self.decode))


def open_step_tracker(cfg: Config, checkpoint_dir: Path, resume_step: int) -> StepTracker:
    """The backends of `[logging]` in their directory (ConfigError: one is not installed)."""
    lg = cfg.logging
    directory = tracking_dir(lg, checkpoint_dir)
    # `headrace run`'s checkpoints are <run dir>/learner: the run is named by its folder
    run_name = Path(checkpoint_dir).resolve().parent.name
    fan = build_tracker(
        lg, directory, resume_step=resume_step, run_name=run_name, config=to_toml_dict(cfg)
    )
    if fan.backends:
        log.info("tracking to %s (%s)", directory, ", ".join(lg.backends))
    decode = Decoder(cfg.model.path)
    return StepTracker(fan.backends, decode, lg.completions_per_step, directory)
