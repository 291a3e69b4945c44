"""Chaos: SIGKILL the broker, the learner and actors again and again; the run still finishes.

Two broker, two learner and two actor kills, each role started again at once with the same
arguments. One actor is a real vLLM actor: it runs on the broker alone first, is acked, is
killed and must be acked again after its restart (an engine takes 20-110 s to start on two
shared cores, so this happens before the learner starts, or the stubs would finish the run
meanwhile); then it must load the learner's policy. The other actors are
`tests.synthetic_actor`s (the real outbox and client, no vLLM); the other kills - both broker
kills, both learner kills and one stub kill - come in a seeded random order, and between kills
the learner must take at least one more step. Then: the learner reached its step count and
exited 0, every trajectory acked to a stub is in the store or was deleted by retention, which
runs throughout (and no real actor was acked more trajectories than the store held of it),
nothing was handed to the learner more than
`max_times_sampled` times, and policy versions never went backwards (learner summary, actors'
engines, the broker never refused an older policy). `benchmarks/chaos.py` runs it longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import Chaos

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

KILLS = {"broker": 2, "learner": 2, "actor": 2}
STEPS = 40


def test_random_sigkills_lose_nothing_and_never_go_back(tmp_path: Path, tiny_model: Path) -> None:
    # Steps enough for every kill: the stubs feed the learner faster than roles restart, and a
    # run that ends before its schedule has fewer kills than asked (20 ran out on a quiet machine).
    chaos = Chaos(tmp_path, tiny_model, steps=STEPS, real_actors=1, stub_actors=2, seed=6)
    try:
        result = chaos.run(KILLS)
    finally:
        chaos.close()
    print(result.as_json())
    logs = chaos.logs()
    assert result.kills == KILLS, result
    assert result.steps_reached == STEPS and result.learner_exit == 0, logs
    assert result.lost == 0, f"{result.lost} acked trajectories missing from the store"
    assert result.real_acked > 0 and result.real_acked_over_stored == 0, result
    assert result.stored + result.deleted_by_retention >= result.acked > 0, result
    assert result.deleted_by_retention > 0, result  # retention (and compaction) ran
    assert result.unaudited_deletes == 0, result  # nothing else took rows out of the store
    assert result.trained_twice == 0 and result.sampled_over_cap == 0, result
    assert result.never_trained_unexplained == 0, result
    assert result.orphans == 0, result
    assert result.trained >= STEPS * 8, result  # every step's batch is in the trained log
    assert result.version_regressions == 0, result.regressions
    assert all(code == 0 for code in result.stub_exits), (result.stub_exits, logs)
