"""The one synthetic-trajectory factory (shared/synthetic.py): what it makes is trainable by
the tiny model and accepted by the broker's validation, and it is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from learner.tiny_model import SPECIAL_TOKENS, vocabulary
from shared import protocol as P
from shared import synthetic as S
from shared.protocol import Role
from shared.validation import Limits, check_trajectory

TINY = Limits(vocab_size=S.TINY_VOCAB_SIZE, max_tokens=512, policy_version=9)


def test_the_vocabulary_is_the_tiny_models() -> None:
    assert S.TINY_VOCAB_SIZE == len(vocabulary())
    assert S.N_SPECIAL == len(SPECIAL_TOKENS)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"n_tokens": 300, "n_turns": 4, "n_observation": 5, "reasoning": True},
        {"n_tokens": 3, "n_prompt": 3},  # no loss token at all
        {"n_tokens": 64, "policy_version": np.repeat([2, 3, 9], [20, 20, 24])},
    ],
)
def test_trajectories_are_valid_and_hold_no_special_tokens(kw) -> None:
    t = S.trajectory("t-0", "g", **kw)
    assert check_trajectory(t, TINY) is None
    ids = t.array("token_ids")
    assert ids.min() >= S.N_SPECIAL and ids.max() < S.TINY_VOCAB_SIZE
    assert t.n_turns == len(t.turns) == t.array("turn_idx").max() + 1


def test_the_layout_is_an_actors() -> None:
    t = S.trajectory("t", "g", n_tokens=40, n_prompt=6, n_turns=2, n_observation=4, reward=1.0)
    role, mask, turn = t.array("role"), t.array("loss_mask"), t.array("turn_idx")
    assert (role[:6] == Role.PROMPT).all() and (turn[:20] == 0).all() and (turn[20:] == 1).all()
    assert (role[20:24] == Role.OBSERVATION).all()  # the tool's answer opens turn 1
    # exactly the generated tokens are trained
    assert (mask == np.isin(role, [Role.ACTION, Role.REASONING])).all() and mask.sum() == 30
    assert [x.reward for x in t.turns] == [0.0, 1.0] and t.turns[-1].done
    assert t.success and t.termination == P.Termination.DONE


def test_the_same_arguments_give_the_same_bytes() -> None:
    """An outbox resends what it sent: the broker must see a duplicate, byte for byte."""
    assert P.encode(S.trajectory("a-1", "a")) == P.encode(S.trajectory("a-1", "a"))
    assert S.trajectory("a-1", "a").token_ids != S.trajectory("a-2", "a").token_ids
    one, two = S.synthetic_batch(2, 4, 32, seed=3), S.synthetic_batch(2, 4, 32, seed=3)
    assert [P.encode(t) for t in one] == [P.encode(t) for t in two]


def test_a_lease_group_is_group_size_episodes_of_its_task() -> None:
    task = P.TaskSpec(task_id="symbols-L1-3", env="symbols")
    lease = P.Lease(lease_id="L", task=task, group_size=4, deadline_s=10.0)
    group = S.lease_group(lease, "actor-1", policy_version=2, n_tokens=20)
    assert [t.traj_id for t in group] == ["L-0", "L-1", "L-2", "L-3"]
    assert {(t.group_id, t.lease_id, t.task_id, t.env) for t in group} == {
        ("L", "L", "symbols-L1-3", "symbols")
    }
    assert [t.outcome_reward for t in group] == [0.0, 1.0, 0.0, 1.0]  # a spread to learn from
    assert all(check_trajectory(t, TINY) is None for t in group)
