"""The replay table's item: one complete GRPO group, by key (its own module so that the table
and the removers, which both handle items, import it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GroupItem:
    key: int  # store seq of the trajectory that completed the group: FIFO order, cursor
    group_id: str
    task_id: str
    seqs: list[int]  # store seqs of its trajectories, the learner's sample_ids
    min_version: int  # oldest loss-token policy version over the group
    priority: float = 1.0
    times_sampled: int = 0
    is_weight: float = 1.0  # importance weight given when last sampled

    @property
    def n_trajs(self) -> int:
        return len(self.seqs)
