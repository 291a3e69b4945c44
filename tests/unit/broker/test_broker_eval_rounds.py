"""Evaluation rounds on the broker: held-out tasks out as eval leases, scores in, nothing
stored; expired leases are played again for the same round, never as training tasks."""

from __future__ import annotations

import msgspec
import pytest

from broker.evaluation import EvalRounds
from broker.leases import LeaseBook
from shared import protocol as P


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class HeldoutBank:
    """Two families of held-out tasks (what `TaskBank.heldout` gives)."""

    def heldout(self, n: int) -> dict[str, list[P.TaskSpec]]:
        return {
            f: [P.TaskSpec(task_id=f"t-{f}-{i}", env="symbols", family=f) for i in range(n)]
            for f in ("easy", "hard")
        }


def rounds(clock: Clock | None = None) -> EvalRounds:
    return EvalRounds(HeldoutBank(), LeaseBook(30.0, 10.0, clock or Clock(), requeue=False))  # type: ignore[arg-type]


def outcome(lease: P.Lease, wins: list[bool], version: int = 3) -> P.EvalOutcome:
    return P.EvalOutcome(
        lease_id=lease.lease_id,
        task_id=lease.task.task_id,
        rewards=[float(w) for w in wins],
        successes=wins,
        policy_versions=[version] * len(wins),
    )


def test_a_round_hands_out_eval_leases_and_scores_pass_at_k() -> None:
    r = rounds()
    report = r.request(P.EvalRequest(version=3, tasks=2, samples=2))
    assert (report.state, report.total_tasks) == ("running", 4)
    leases = r.grant(b"a", 10)
    assert len(leases) == 4 and all(x.purpose == "eval" and x.group_size == 2 for x in leases)
    assert r.grant(b"a", 10) == []  # each task once per round
    wins = {"t-easy-0": [True, True], "t-easy-1": [True, False]}
    for lease in leases:
        assert r.outcome(b"a", outcome(lease, wins.get(lease.task.task_id, [False, False]))) is None
    report = r.request(P.EvalRequest(version=3, tasks=2, samples=2))
    assert report.state == "done" and report.done_tasks == 4
    s = report.scores
    assert s["n"] == 4 and s["k"] == 2
    assert s["pass_at_1"] == pytest.approx(0.75 / 2)  # (1 + 0.5 + 0 + 0) / 4
    assert s["pass_at_k"] == pytest.approx(0.5)  # two tasks of four solved in 2 samples
    assert s["families"]["easy"]["pass_at_1"] == pytest.approx(0.75)
    assert s["families"]["hard"]["pass_at_k"] == 0.0
    assert s["policy_version_min"] == s["policy_version_max"] == 3


def test_outcomes_of_unknown_or_foreign_or_malformed_leases_are_refused() -> None:
    r = rounds()
    r.request(P.EvalRequest(version=1, tasks=1, samples=2))
    lease = r.grant(b"a", 1)[0]
    assert r.outcome(b"b", outcome(lease, [True, True])) is not None  # another actor's
    assert r.outcome(b"a", outcome(lease, [True])) is not None  # one episode of two
    nan = outcome(lease, [True, True])
    assert (
        r.outcome(
            b"a", P.EvalOutcome(**{**msgspec.structs.asdict(nan), "rewards": [0.0, float("nan")]})
        )
        is not None
    )
    bogus = P.Lease(lease_id="nope", task=lease.task, group_size=2, deadline_s=1.0)
    assert r.outcome(b"a", outcome(bogus, [True, True])) is not None
    assert r.request(P.EvalRequest(version=1, tasks=1, samples=2)).done_tasks == 0


def test_an_expired_eval_lease_is_played_again_for_its_round_not_for_training() -> None:
    clock = Clock()
    r = rounds(clock)
    r.request(P.EvalRequest(version=5, tasks=1, samples=1))
    first = r.grant(b"a", 2)
    assert len(first) == 2
    clock.t = 100.0  # actor a went silent
    r.requeue(r.book.expire(lambda ident: None))
    assert not r.book.requeued  # nothing left for the training lease path
    again = r.grant(b"b", 2)
    assert sorted(x.task.task_id for x in again) == sorted(x.task.task_id for x in first)
    for lease in again:
        assert r.outcome(b"b", outcome(lease, [True], version=6)) is None
    assert r.request(P.EvalRequest(version=5, tasks=1, samples=1)).state == "done"
    # the old actor's late outcome is not counted twice
    assert r.outcome(b"a", outcome(first[0], [False])) is not None


def test_concurrent_rounds_share_tasks_but_not_scores() -> None:
    r = rounds()
    r.request(P.EvalRequest(version=2, tasks=1, samples=1))
    r.request(P.EvalRequest(version=4, tasks=1, samples=1))
    leases = r.grant(b"a", 10)
    assert len(leases) == 4  # the same two tasks, once per round
    for lease in leases:
        r.outcome(b"a", outcome(lease, [True]))
    for v in (2, 4):
        report = r.request(P.EvalRequest(version=v, tasks=1, samples=1))
        assert report.state == "done" and report.scores["pass_at_1"] == 1.0


def test_a_bank_with_nothing_held_out_finishes_at_once_with_n_zero() -> None:
    r = rounds()
    report = r.request(P.EvalRequest(version=1, tasks=0, samples=4))
    assert report.state == "done" and report.scores["n"] == 0
    assert r.grant(b"a", 4) == []


def test_a_round_goes_only_to_actors_that_hold_its_policy() -> None:
    r = rounds()
    r.request(P.EvalRequest(version=5, tasks=1, samples=1))
    assert r.grant(b"a", 4, holds=4.0) == []  # still on v4: the round waits for it
    assert r.pending() == 2
    leases = r.grant(b"b", 4, holds=5.0)
    assert len(leases) == 2 and r.pending() == 0
    r.request(P.EvalRequest(version=7, tasks=1, samples=1))
    assert len(r.grant(b"c", 4, holds=None)) == 2  # an actor that never said: not held back
