"""The meaning fuzzer: its messages are well-formed (they reach the broker's handlers, not its
frame checks), its independent check of handed-out trajectories catches each broken
invariant, and a short run against a real broker under CurveZMQ finds none."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest

from benchmarks.fuzz_meaning import Run, run_meaning
from benchmarks.hostile import VOCAB, Hostile, Knowledge, valid_group
from shared import protocol as P

INBOUND = P.decoder_for(P.BrokerInbound)


def decodes(msg: P.Base) -> None:
    """Raises if the broker's decoder would refuse `msg` as a frame (a Hello of another
    protocol version is refused there on purpose: it is answered, not handled)."""
    try:
        P.decode(P.encode(msg), P.DEFAULT_MAX_FRAME_BYTES, INBOUND)
    except P.ProtocolError as e:
        if not (isinstance(msg, P.Hello) and e.reason == "version_mismatch"):
            raise


def test_every_hostile_message_is_well_formed_and_every_type_is_sent() -> None:
    hostile = Hostile(0, Knowledge())
    lease = P.Lease(
        lease_id="l-1", task=P.TaskSpec(task_id="symbols-L1-3", env="symbols"), group_size=2,
        deadline_s=60.0,
    )  # fmt: skip
    seen: set[str] = set()
    for i in range(3000):
        role = ["actor", "learner", "cli"][i % 3]
        msg = hostile.message(role, f"{role}-evil", [lease])
        decodes(msg)
        seen.add(type(msg).__name__)
    for _ in range(300):
        decodes(hostile.learner_message())
    types = {m.__name__ for m in P.Message.__args__}  # type: ignore[attr-defined]
    assert seen == types - {"TrajectoryBatchFrames"}


def _array(values: list, name: str) -> bytes:
    return np.array(values, dtype=P.TOKEN_ARRAYS[name]).tobytes()


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"token_ids": _array([1, 2, 3, 4, 5, 6, 7, VOCAB], "token_ids")}, "token id"),
        ({"role": _array([0, 0, 3, 3, 3, 3, 3, 9], "role")}, "role"),
        ({"loss_mask": _array([0, 0, 1, 1, 1, 1, 1, 2], "loss_mask")}, "loss mask"),
        ({"behav_logprob": _array([-0.5] * 7 + [float("nan")], "behav_logprob")}, "logprob"),
        ({"policy_version": _array([0] * 7 + [9], "policy_version")}, "version"),
        ({"policy_version": _array([1] * 7 + [0], "policy_version")}, "version"),
        ({"outcome_reward": float("inf")}, "reward"),
        ({"sample_prob": 0.0}, "sample_prob"),
        ({"group_id": "another"}, "lease"),
        ({"turn_idx": b""}, "array lengths"),
    ],
)
def test_the_check_of_handed_out_trajectories_names_each_defect(edit: dict, named: str) -> None:
    known = Knowledge(policy_version=1)
    run = Run({}, known, seed=0)
    run.granted.add("lease-1")
    (good,) = valid_group("lease-1", "symbols-L1-0", 1, 1, "actor-0", random.Random(0))
    assert run.invalid(good) is None
    assert run.invalid(msgspec.structs.replace(good, **edit)) == named


def test_a_short_run_against_a_real_broker_keeps_every_invariant() -> None:
    result = run_meaning(4000, seed=3, window=100)
    assert result["violations"] == {} and result["ok"], result["first_violations"]
    # served in most rounds (in the others the pipeline is full: backpressure for everyone)
    assert result["honest_groups"] >= 30
    assert result["learner_batches"] > 0 and result["policy_version"] == 4
    assert result["answers"].get("Error:forbidden", 0) > 0  # the hostile peers were refused
    assert sum(result["learner_slips_refused"].values()) > 0
