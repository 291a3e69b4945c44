"""The chaos run's bookkeeping with retention on: a row deleted by retention is explained, not
lost, and is judged by its last state; an acked row deleted between two snapshots is explained
by the broker's audit of its deletes; an acked row found nowhere is lost."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from broker.store.maintenance import audit_deletes
from shared.logs import setup_logging
from tests.chaos.accounting import read_broker_log, tally


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
    assert out["unaudited_deletes"] == 1  # "unconsumed-deleted" left with no audit line
    assert out["deleted_unseen"] == 1  # "between-snapshots"
    assert out["never_trained_unexplained"] == 1  # "handed-never-trained"
    assert out["trained"] == 2 and out["trained_twice"] == 0
    assert out["evicted"] == {"stale": 1}
    assert out["real_acked_over_stored"] == 0  # actor0's one row was stored (then deleted)


def test_the_audit_is_read_back_from_the_broker_log_format(tmp_path: Path) -> None:
    """The harness parses the lines shared.logs writes: a format change must fail here."""
    log_path = tmp_path / "broker.log"
    handler = logging.FileHandler(log_path)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    setup_logging("INFO,broker.store.maintenance=DEBUG", role="broker")
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]
    try:
        audit_deletes(["t-1", "t-2"])
        logging.getLogger("broker.relay").warning("ignoring policy v3 (have v5)")
    finally:
        handler.close()
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("broker.store.maintenance").setLevel(logging.NOTSET)
    audited, refused = read_broker_log(log_path, "broker.store.maintenance")
    assert audited == {"t-1", "t-2"}
    assert len(refused) == 1 and "ignoring policy v3" in refused[0]
