"""The broker's curriculum: which task the next lease gets, and what finished groups teach.

Ties a task bank (banks.py) to the curator (curator.py):

- `pick(n)` asks the curator (uniform or learned probabilities over a candidate pool); every
  grant carries the probability and the curator version, and both travel back in the
  trajectories.
- `group_done(metas)` runs when a GRPO group is complete: its success rate and rewards are the
  progress signal of the task's arm (importance weighted by the grant's probability). With
  `signal = "abs_advantage"` the update waits for the learner's `TaskFeedback` instead.
- Zero-variance groups (every reward equal: no GRPO signal) are counted per family and fed to
  the curator as signal 0. With `[broker] exclude_zero_variance = true` they do not enter
  replay either; the learner's batches keep their size (the broker waits for more groups, it
  never hands out a short batch), and the exclusion is counted as an eviction with reason
  "zero_variance".
- The curator's state is saved in the store's key-value table (`save_if_changed`, called
  every reaper tick and at shutdown) and restored at start, so a restart resumes the
  curriculum where it was, up to the last tick.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec

from broker import metrics as M
from broker.curriculum.banks import Picked, TaskBank
from broker.curriculum.curator import Curator
from broker.store import TrajMeta
from shared import protocol as P
from shared.config import CuratorConfig

log = logging.getLogger(__name__)

STATE_KEY = "curriculum/curator"
AWAITING_MAX = 65536  # groups waiting for the learner's |A| (signal "abs_advantage")


class Curriculum:
    def __init__(self, bank: TaskBank, cfg: CuratorConfig) -> None:
        self.bank = bank
        self.cfg = cfg
        self.curator = Curator(cfg, bank.sample_candidates)
        self._saved_version = -1
        # task_id -> (sample_prob, rewards, successes, tokens, seconds) of groups whose
        # update waits for the learner's mean |advantage|.
        self._awaiting: OrderedDict[str, tuple] = OrderedDict()

    @property
    def version(self) -> int:
        return self.curator.version

    def pick(self, n: int) -> list[Picked]:
        return self.curator.pick(n) if n > 0 else []

    def group_done(self, task_id: str, metas: Sequence[TrajMeta]) -> bool:
        """Learn from a complete group; returns whether it had zero variance."""
        rewards = [m.reward for m in metas]
        successes = [bool(m.success) for m in metas]
        zero_var = len(set(rewards)) <= 1
        try:
            task = self.bank.task(task_id)
        except (KeyError, ValueError):  # a task of another bank (config changed): no arm
            log.debug("group of unknown task %s: not used by the curriculum", task_id)
            return zero_var
        family = task.family or task_id
        M.CURRICULUM_GROUPS.labels(family=family).inc()
        if zero_var:
            M.CURRICULUM_ZERO_VARIANCE.labels(family=family).inc()
        prob = metas[0].sample_prob if metas else 1.0
        tokens = sum(m.n_tokens for m in metas)
        seconds = sum(m.seconds for m in metas)
        if self.cfg.signal == "abs_advantage" and not zero_var:
            self._awaiting[task_id] = (task, prob, rewards, successes, tokens, seconds)
            while len(self._awaiting) > AWAITING_MAX:
                self._awaiting.popitem(last=False)
            return zero_var
        self.curator.update(task, prob, rewards, successes, tokens=tokens, seconds=seconds)
        return zero_var

    def feedback(self, fb: P.TaskFeedback) -> None:
        self.bank.feedback(fb)
        waiting = self._awaiting.pop(fb.task_id, None)
        if waiting is not None:
            task, prob, rewards, successes, tokens, seconds = waiting
            self.curator.update(
                task,
                prob,
                rewards,
                successes,
                mean_abs_advantage=fb.mean_abs_advantage,
                tokens=tokens,
                seconds=seconds,
            )

    def summary(self) -> dict[str, Any]:
        return self.curator.summary()

    def refresh_metrics(self) -> None:
        s = self.curator.summary()
        M.CURRICULUM_VERSION.set(self.version)
        M.CURRICULUM_ENTROPY.set(float(s["sampling_entropy"]))
        M.CURRICULUM_ZERO_VARIANCE_FRACTION.set(float(s["zero_variance_fraction"]))
        for family, f in s["families"].items():
            M.CURRICULUM_PASS_RATE.labels(family=family).set(f["pass_rate"])
            M.CURRICULUM_SHARE.labels(family=family).set(f["pick_share"])

    # ------------------------------------------------------------ state

    def state_if_changed(self) -> bytes | None:
        """The curator's state if it changed since the last call (for the store)."""
        if self.version == self._saved_version:
            return None
        self._saved_version = self.version
        return self.curator.state()

    def load(self, data: bytes | None) -> None:
        if data is None:
            return
        try:
            self.curator.load(data)
        except (ValueError, msgspec.DecodeError) as e:  # another layout: start fresh, say so
            log.warning("curriculum state not restored (%s); starting fresh", e)
            return
        self._saved_version = self.version
        log.info("curriculum restored at curator version %d", self.version)
