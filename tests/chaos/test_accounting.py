"""The chaos run's bookkeeping with retention on: a row deleted by retention is explained, not
lost, and is judged by its last state; an acked row never seen anywhere is lost."""

from __future__ import annotations

from collections import Counter

from tests.chaos.accounting import tally


def test_rows_deleted_by_retention_are_judged_by_their_last_state() -> None:
    final = [("kept", "stub0", 1, None, 5), ("fresh", "stub0", 0, None, 6)]
    seen = {
        "kept": ("kept", "stub0", 0, None, 5),  # sampled since: the final row wins
        "trained-then-deleted": ("trained-then-deleted", "stub0", 1, None, 1),
        "stale-then-deleted": ("stale-then-deleted", "stub1", 0, "stale", 2),
        "handed-never-trained": ("handed-never-trained", "stub1", 1, None, 3),
        "unconsumed-deleted": ("unconsumed-deleted", "actor0", 0, None, 4),
    }
    trained = Counter({"kept": 1, "trained-then-deleted": 1})
    acked = {"kept", "fresh", "trained-then-deleted", "stale-then-deleted", "never-seen"}
    out = tally(final, seen, set(), trained, acked, Counter({"actor0": 1}), 1)
    assert out["stored"] == 2 and out["deleted_by_retention"] == 4
    assert out["lost"] == 1  # "never-seen": acked, in no snapshot, not in the store
    assert out["never_trained_unexplained"] == 1  # "handed-never-trained"
    assert out["trained"] == 2 and out["trained_twice"] == 0
    assert out["evicted"] == {"stale": 1}
    assert out["real_acked_over_stored"] == 0  # actor0's one row was stored (then deleted)
