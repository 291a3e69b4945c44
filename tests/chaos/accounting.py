"""What a chaos run's store, trained log and acks add up to (tests/chaos/harness.py).

Rows are `ROW_COLS` tuples. `final`: the store's rows at the end; `seen`: every row the monitor
snapshotted during the run, by traj_id, as last seen (a row seen and gone at the end was
deleted by retention, and is judged by that last state); `audited`: the store's tombstones,
the traj_ids retention deleted (the only evidence for a row acked and deleted between two
snapshots).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROW_COLS = "traj_id, actor_id, times_sampled, evicted, seq"
Row = tuple  # (traj_id, actor_id, times_sampled, evicted, seq)


def refused_policies(log: Path) -> list[str]:
    """The broker log's lines refusing an older policy ("ignoring policy ..."): regressions."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    return [line.strip()[-120:] for line in lines if "ignoring policy" in line]


def orphan_engines(sessions: set[int]) -> set[int]:
    """Live vLLM engine processes (they rename themselves `VLLM::EngineCore`, `VLLM::Worker`)
    in one of `sessions` (every role starts its own session, and its engines stay in it after
    it dies: another job's engines on the machine are not this run's) that no actor process
    owns any more (no `-m actor` among their ancestors)."""
    import psutil

    out = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if not title.startswith("VLLM::") or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) not in sessions:
                continue
            owners = [" ".join(a.cmdline()) for a in p.parents()]
            if not any(" -m actor " in f"{o} " for o in owners):
                out.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return out


@dataclass
class ChaosResult:
    kills: dict[str, int]
    steps_reached: int
    acked: int
    stored: int
    trained_twice: int
    version_regressions: int
    seconds: float
    never_trained_unexplained: int = 0
    trained: int = 0
    unconsumed: int = 0
    evicted: dict[str, int] = field(default_factory=dict)
    sampled_over_cap: int = 0
    orphans: int = 0  # vLLM engine processes left without their actor after the run
    aimed_kills: int = 0  # the broker's own SIGKILLs at crash points (`aimed`)
    aimed_by_point: dict[str, int] = field(default_factory=dict)
    deleted_by_retention: int = 0  # rows gone at the end that a tombstone or a snapshot names
    unaudited_deletes: int = 0  # rows a snapshot saw that left the store without a tombstone
    deleted_unseen: int = 0  # rows deleted before any snapshot saw them (only tombstones know)
    snapshot_errors: int = 0  # snapshots that could not read the store (no store yet, locked)
    lost: int = 0
    real_acked: int = 0
    real_acked_over_stored: int = 0
    learner_exit: int | None = None
    stub_exits: list[int | None] = field(default_factory=list)
    max_times_sampled: int = 1
    regressions: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def tally(
    final: list[Row],
    seen: dict[str, Row],
    kept: set[int],
    trained: Counter[str],
    acked: set[str],
    real_acked: Counter[str],
    max_times_sampled: int,
    audited: set[str],
) -> dict[str, object]:
    """The ChaosResult fields the data decides. `kept`: seqs of the batches the broker still
    keeps for the learner; `trained`: trajectory id -> times in the trained log; `acked`: the
    stub actors' acked ids; `audited`: the store's tombstones; `real_acked`: acked
    per real actor (summed over incarnations)."""
    stored = {r[0] for r in final}
    deleted = [r for t, r in seen.items() if t not in stored]
    rows = final + deleted  # every row the run had
    per_actor = Counter(r[1] for r in rows)
    # Rows deleted before any snapshot saw them are known by traj_id alone (tombstones): those
    # no stub was acked are a real actor's, unattributable to one; each real actor's acked
    # total may lean on them.
    unseen_real = len(audited - stored - set(seen) - acked)
    return {
        "acked": len(acked) + sum(real_acked.values()),
        "stored": len(stored),
        "deleted_by_retention": len(({r[0] for r in deleted} | audited) - stored),
        "lost": len(acked - stored - {r[0] for r in deleted} - audited),
        "unaudited_deletes": len({r[0] for r in deleted} - audited),
        "deleted_unseen": len(audited - stored - set(seen)),
        "trained_twice": sum(1 for n in trained.values() if n > 1),
        "never_trained_unexplained": sum(
            1 for r in rows if r[2] > 0 and not trained[r[0]] and r[3] is None and r[4] not in kept
        ),
        "trained": sum(1 for r in rows if trained[r[0]]),
        "unconsumed": sum(1 for r in final if r[2] == 0 and r[3] is None),
        "evicted": dict(Counter(r[3] for r in rows if r[3] is not None)),
        "sampled_over_cap": sum(1 for r in rows if r[2] > max_times_sampled),
        "real_acked": sum(real_acked.values()),
        "real_acked_over_stored": sum(
            1 for n, k in real_acked.items() if k > per_actor[n] + unseen_real
        ),
    }
