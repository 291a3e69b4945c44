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


def test_a_real_actors_rows_deleted_between_snapshots_explain_its_acks() -> None:
    """A real actor's acks are only counted, and tombstones carry no actor: its rows that
    retention deleted before any snapshot saw them still explain its acked total, and an
    acked total beyond every row that could be its is still flagged."""
    final = [("r1", "actor0", 0, None, 3)]
    seen = {"r0": ("r0", "actor0", 1, None, 1)}  # seen, then deleted
    stubs = {"s0"}  # a stub's row, deleted unseen: not actor0's
    audited = {"r0", "unseen-r", "s0"}  # "unseen-r": actor0's, deleted between snapshots
    out = tally(final, seen, set(), Counter(), stubs, Counter({"actor0": 3}), 1, audited)
    assert out["real_acked_over_stored"] == 0 and out["lost"] == 0
    out = tally(final, seen, set(), Counter(), stubs, Counter({"actor0": 4}), 1, audited)
    assert out["real_acked_over_stored"] == 1  # 4 acked, at most 3 rows were actor0's
