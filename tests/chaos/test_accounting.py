"""The chaos run's bookkeeping with retention on: a row deleted by retention is explained, not
lost, and is judged by its last state; an acked row deleted between two snapshots is explained
by the store's tombstones; an acked row found nowhere is lost."""

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
    acked |= {"between-snapshots"}
    audited = set(seen) - {"kept", "unconsumed-deleted"} | {"between-snapshots"}
    out = tally(final, seen, set(), trained, acked, Counter({"actor0": 1}), 1, audited)
    assert out["stored"] == 2 and out["deleted_by_retention"] == 5
    assert out["lost"] == 1  # "never-seen": acked, in no snapshot or audit, not in the store
    assert out["unaudited_deletes"] == 1  # "unconsumed-deleted" left with no tombstone
    assert out["deleted_unseen"] == 1  # "between-snapshots"
    assert out["never_trained_unexplained"] == 1  # "handed-never-trained"
    assert out["trained"] == 2 and out["trained_twice"] == 0
    assert out["evicted"] == {"stale": 1}
    assert out["real_acked_over_stored"] == 0  # actor0's one row was stored (then deleted)
