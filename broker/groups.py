"""Group assembly: stored trajectories wait here, by group_id, until their group is complete;
and retirement: groups that leave replay (or assembly) without being trained on.

Only complete groups enter the replay table (GRPO-style advantages need the whole group).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker import metrics as M
from broker.replay.table import GroupItem
from broker.store import Store, TrajMeta


@dataclass(slots=True)
class PendingGroup:
    group_id: str
    task_id: str
    group_size: int
    metas: list[TrajMeta]
    updated: float  # clock of the last trajectory added
    owner: bytes = b""  # routing id of the actor whose lease it was (b"": unknown)

    def item(self, key: int = 0, times_sampled: int = 0) -> GroupItem:
        return GroupItem(
            key=key,
            group_id=self.group_id,
            task_id=self.task_id,
            seqs=[m.seq for m in self.metas],
            min_version=min((m.min_version for m in self.metas), default=0),
            times_sampled=times_sampled,
        )


class GroupAssembler:
    # Late extras arrive soon after their group completed; remembering the most recent
    # completions is enough and keeps memory flat over a long run.
    REMEMBER_COMPLETED = 65536

    def __init__(self) -> None:
        self.pending: dict[str, PendingGroup] = {}
        self.completed: OrderedDict[str, None] = OrderedDict()  # recent complete group ids
        self.n_trajs = 0  # trajectories waiting in pending groups
        self.by_owner: Counter[bytes] = Counter()  # the same, per owner (admission's shares)

    def __len__(self) -> int:
        return len(self.pending)

    def delivered(self, group_id: str) -> int:
        g = self.pending.get(group_id)
        return len(g.metas) if g else 0

    def add(
        self,
        meta: TrajMeta,
        group_size: int,
        now: float,
        times_sampled: int = 0,
        owner: bytes = b"",
    ) -> tuple[GroupItem, list[TrajMeta]] | None:
        """Add a stored trajectory; returns its group as a replay item, with the group's
        trajectories (for the curriculum), once complete. `owner`: who holds its lease, for a
        group this starts.

        Returns None while incomplete, and for a trajectory of an already completed group (an
        actor sending more than `group_size`): it stays stored but joins no group.
        """
        gid = meta.group_id
        if gid in self.completed:
            return None
        g = self.pending.get(gid)
        if g is None:
            g = self.pending[gid] = PendingGroup(gid, meta.task_id, group_size, [], now, owner)
        g.metas.append(meta)
        g.updated = now
        self.n_trajs += 1
        self.by_owner[g.owner] += 1
        if len(g.metas) < g.group_size:
            return None
        self._remove(g)
        self.completed[gid] = None
        if len(self.completed) > self.REMEMBER_COMPLETED:
            self.completed.popitem(last=False)
        # The completing trajectory's seq orders groups FIFO and survives a restart.
        return g.item(key=max(m.seq for m in g.metas), times_sampled=times_sampled), g.metas

    def drop_abandoned(
        self, now: float, idle_s: float, has_lease: Callable[[str], bool]
    ) -> list[GroupItem]:
        """Partial groups with no live lease and no news for `idle_s`: they will never fill."""
        out = []
        for g in list(self.pending.values()):
            if not has_lease(g.group_id) and now - g.updated > idle_s:
                self._remove(g)
                out.append(g.item())
        return out

    def _remove(self, g: PendingGroup) -> None:
        del self.pending[g.group_id]
        self.n_trajs -= len(g.metas)
        self.by_owner[g.owner] -= len(g.metas)
        if not self.by_owner[g.owner]:
            del self.by_owner[g.owner]


class Retirement:
    """Groups evicted unsampled, counted by reason (Status, `headrace_broker_evicted_total`)
    and marked in the store, so a restart does not bring them back into replay."""

    def __init__(self, store: Store, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.store = store
        self.spawn = spawn
        self.counts: Counter[str] = Counter()

    def retire(self, removals: list[tuple[GroupItem, str]]) -> None:
        by_reason: dict[str, list[int]] = {}
        for item, reason in removals:
            self.count(reason)
            by_reason.setdefault(reason, []).extend(item.seqs)
        for reason, seqs in by_reason.items():
            self.spawn(self.store.retire(seqs, reason))

    def count(self, reason: str, n: int = 1) -> None:
        """Counted only: for rows deleted outright (retention) rather than marked."""
        M.EVICTED.labels(reason=reason).inc(n)
        self.counts[reason] += n
