"""A few of a step's trajectories as text: what the policy wrote, and what it got for it.

The learner trains on token ids only; the text comes from the model's own tokenizer
(`[model] path`, which every checkpoint also carries), loaded on the first use. Without a
loadable tokenizer the ids themselves are shown.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np

from learner.tracking.base import Completion
from shared.protocol import Role, Trajectory

log = logging.getLogger("learner.tracking")

GENERATED = (int(Role.REASONING), int(Role.ACTION))
PROMPT_CHARS = 300  # the tail of a long opening: the question is at its end


def task_family(task_id: str, env: str) -> str:
    """The family of a bank task id `<prefix>-<family>-<index>` (broker/curriculum/banks.py);
    the environment's name for an id of another form."""
    _, _, rest = task_id.partition("-")
    family, _, index = rest.rpartition("-")
    return family if family and index.isdigit() else env


class Decoder:
    """Token ids -> text with the tokenizer at `model_path`, loaded lazily, once."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self._tok: object | None = None
        self._failed = False

    def __call__(self, ids: Sequence[int]) -> str:
        tok = self._tokenizer()
        if tok is None:
            return " ".join(str(i) for i in ids)
        return str(tok.decode(list(ids), skip_special_tokens=False))  # type: ignore[attr-defined]

    def _tokenizer(self) -> object | None:
        if self._tok is None and not self._failed:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.model_path)
            except Exception as e:  # noqa: BLE001 - text is a nicety: ids will do
                log.warning("no tokenizer at %s (%s): completions shown as ids", self.model_path, e)
                self._failed = True
        return self._tok


def generated_text(traj: Trajectory, decode: Decoder) -> str:
    """The trajectory's generated tokens (reasoning and action), one line per turn."""
    ids, role, turn = traj.array("token_ids"), traj.array("role"), traj.array("turn_idx")
    gen = np.isin(role, GENERATED)
    turns = dict.fromkeys(turn[gen].tolist())  # in order of appearance
    return "\n".join(decode(ids[gen & (turn == t)].tolist()) for t in turns)


def prompt_text(traj: Trajectory, decode: Decoder) -> str:
    ids, role = traj.array("token_ids"), traj.array("role")
    text = decode(ids[role == int(Role.PROMPT)].tolist())
    return text if len(text) <= PROMPT_CHARS else "..." + text[-PROMPT_CHARS:]


def sample_completions(
    items: Sequence[Trajectory], n: int, step: int, decode: Decoder
) -> list[Completion]:
    """`n` trajectories of the step drawn at random, best reward first.

    The draw has its own generator seeded by the step, so recording them leaves the training
    RNG streams (and a replay's determinism) untouched."""
    picked = random.Random(step).sample(range(len(items)), min(max(n, 0), len(items)))
    out = [
        Completion(
            step=step,
            task_id=t.task_id,
            family=task_family(t.task_id, t.env),
            reward=float(t.outcome_reward),
            success=bool(t.success),
            text=generated_text(t, decode),
            prompt=prompt_text(t, decode),
        )
        for t in (items[i] for i in picked)
    ]
    return sorted(out, key=lambda c: -c.reward)
