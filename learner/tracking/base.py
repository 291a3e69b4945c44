"""The interface every tracking backend implements, and the fan-out the learner holds.

A backend receives scalars by tag (`train/reward_mean`, `eval/pass_at_1`, ...; the learner's
tags are made in learner/tracking/tags.py, any other caller may add its own prefix) and
sampled completions; it never raises for a value it cannot show (NaN is a value).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

log = logging.getLogger("learner.tracking")


@dataclass(frozen=True)
class Completion:
    """One sampled trajectory of a step: its generated text, decoded, and its outcome."""

    step: int
    task_id: str
    family: str
    reward: float
    success: bool
    text: str  # the generated tokens (reasoning and action), one line per turn
    prompt: str = ""  # the opening the model was shown (its tail, when long)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Tracker(ABC):
    """Where a run's numbers and samples go. `step` is the learner's global step."""

    @abstractmethod
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def completions(self, step: int, items: Sequence[Completion]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class FanOut(Tracker):
    """Every call goes to each backend in turn; no backend (the default) records nothing.

    A backend that fails mid-run (a full disk, a service gone) is logged once and dropped: a
    training run never stops for its dashboards."""

    def __init__(self, backends: Sequence[Tracker] = ()) -> None:
        self.backends = list(backends)

    def _each(self, what: str, *args: object) -> None:
        for b in list(self.backends):
            try:
                getattr(b, what)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.warning("tracking backend %s failed (%s); it is off", type(b).__name__, e)
                self.backends.remove(b)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._each("scalars", step, values)

    def completions(self, step: int, items: Sequence[Completion]) -> None:
        if items:
            self._each("completions", step, items)

    def close(self) -> None:
        self._each("close")
        self.backends = []
