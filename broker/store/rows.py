"""The index rows of a group commit: what `Trajectories.commit` inserts for each new
trajectory, read off its zero-copy view, with duplicates (by traj_id) set aside."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.store import integrity
from broker.store.records import Claimed, Incoming, PutResult, TrajMeta
from shared import protocol as P

TOKEN_BYTES = P.TOKEN_ARRAYS["token_ids"].itemsize


@dataclass(slots=True)
class NewRows:
    """One group commit's new trajectories and the seq after the last of them."""

    next_seq: int
    # INSERT parameters in `schema.INSERT`'s column order; seg_id and seg_offset (at
    # `schema.SEG_COLUMN`) stay None until the bodies are appended to a segment.
    rows: list[list[Any]] = field(default_factory=list)
    frames: list[Any] = field(default_factory=list)  # the bodies to append, in row order
    bodies: dict[int, Claimed] = field(default_factory=dict)  # in memory: kept as received
    results: list[PutResult] = field(default_factory=list)  # one per batch


def new_rows(
    batches: list[list[Incoming]], seen: set[str], first_seq: int, now: float, in_memory: bool
) -> NewRows:
    """Rows for the trajectories of `batches` whose traj_id is not in `seen` (stored before)
    nor earlier in `batches`. Adds the new ids to `seen`.

    In memory the bodies stay in the received frames (no checksum: nothing at rest to
    damage); on disk they are checksummed and listed in `frames` for the segment log.
    """
    out = NewRows(next_seq=first_seq)
    seq = first_seq
    for trajs in batches:
        new, dups = [], []
        for item in trajs:
            t = item.view
            tid = t.traj_id
            if tid in seen:
                dups.append(tid)
                continue
            seen.add(tid)
            gid, task, lease, actor = t.group_id, t.task_id, t.lease_id, t.actor_id
            mv, nt = P.min_policy_version(t), len(t.token_ids) // TOKEN_BYTES
            r, ok, p = t.outcome_reward, t.success, t.sample_prob
            sec = t.timings.get("episode_s", 0.0)
            meta = (seq, tid, gid, task, lease, actor, mv, nt, r, ok, p, sec)  # TrajMeta's order
            frame = item.frame
            check = None if in_memory else integrity.checksum(frame)
            # an INSERT row: TrajMeta's columns, then created, seg_id, seg_offset, nbytes, checksum
            out.rows.append([*meta, now, None, None, len(frame), check])
            new.append(TrajMeta(*meta))
            if in_memory:
                raw = frame if isinstance(frame, msgspec.Raw) else msgspec.Raw(frame)
                out.bodies[seq] = Claimed(seq, mv, raw)
            else:
                out.frames.append(frame)
            seq += 1
        out.results.append(PutResult(new, dups))
    out.next_seq = seq
    return out
