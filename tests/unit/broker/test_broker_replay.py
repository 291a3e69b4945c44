"""Replay table (sampler, removers, rate limiter), group assembly and the symbols task bank."""

from __future__ import annotations

import pytest

from broker.curriculum.banks import SymbolsBank
from broker.curriculum.factory import make_bank
from broker.groups import GroupAssembler
from broker.replay import (
    CapacityRemover,
    FifoSampler,
    MaxTimesSampledRemover,
    MinSize,
    StalenessRemover,
    Table,
)
from broker.store import TrajMeta
from shared.config import ConfigError, EnvConfig, SymbolsConfig
from tests.broker_helpers import group


def table(capacity: int = 1000, max_times: int = 1, min_size: int = 1) -> Table:
    return Table(
        FifoSampler(),
        [CapacityRemover(capacity), StalenessRemover(), MaxTimesSampledRemover(max_times)],
        MinSize(min_size),
    )


def test_fifo_returns_oldest_whole_groups() -> None:
    t = table()
    for key in (3, 1, 2):  # completion order differs from arrival order after a restore
        t.insert(group(key))
    assert t.size == 12 and len(t) == 3
    got = t.sample(5)  # 5 trajectories -> two whole groups of 4, never one and a bit
    assert got is not None and [g.key for g in got] == [1, 2]
    assert t.size == 4  # max_times_sampled=1: sampled groups left the table
    assert t.sample(5) is None  # fewer groups than asked for: not served at all
    assert [g.key for g in t.sample(4) or []] == [3]
    assert t.sample(1) is None


def test_mixed_group_sizes_still_fill_the_batch() -> None:
    t = table()
    t.insert(group(1, size=2))
    t.insert(group(2, size=2))
    t.insert(group(3, size=8))
    got = t.sample(6)
    assert got is not None and [g.key for g in got] == [1, 2, 3]
    assert sum(g.n_trajs for g in got) == 12


def test_staleness_evicts_only_too_old_groups() -> None:
    t = table()
    t.insert(group(1, version=1))
    t.insert(group(2, version=3))
    t.insert(group(3, version=5))
    removed = t.evict_stale(policy_version=6, max_staleness=3)  # floor: version 3
    assert [(g.key, why) for g, why in removed] == [(1, "stale")]
    assert t.evict_stale(policy_version=6, max_staleness=-1) == []  # -1 disables the cap
    assert [g.key for g in t.sample(8) or []] == [2, 3]


def test_max_times_sampled_allows_reuse_up_to_the_cap() -> None:
    t = table(max_times=2)
    t.insert(group(1))
    first, second = t.sample(4), t.sample(4)
    assert first and second and first[0].key == second[0].key == 1
    assert second[0].times_sampled == 2
    assert t.sample(4) is None and len(t) == 0


def test_restore_undoes_a_failed_hand_out() -> None:
    t = table()
    t.insert(group(1))
    t.insert(group(2))
    items = t.sample(4)
    assert items and len(t) == 1
    t.restore(items)
    assert len(t) == 2 and items[0].times_sampled == 0
    assert [g.key for g in t.sample(4) or []] == [1]  # back at the front of the FIFO


def test_min_size_rate_limiter() -> None:
    t = table(min_size=12)
    t.insert(group(1))
    t.insert(group(2))
    assert not t.can_sample(4) and t.sample(4) is None
    assert t.state()["rate_limiter"] == {
        "kind": "min_size",
        "min_size_to_sample": 12,
        "inserts": 8,
        "samples": 0,
        "can_sample": False,
        "can_insert": True,  # MinSize never blocks inserts
    }
    t.insert(group(3))
    assert t.can_sample(4) and t.sample(4) is not None


def test_capacity_remover_drops_oldest() -> None:
    t = table(capacity=8)
    t.insert(group(1))
    t.insert(group(2))
    removed = t.insert(group(3))
    assert [(g.key, why) for g, why in removed] == [(1, "capacity")]
    assert t.size == 8


def test_priority_updates_apply_to_live_groups_only() -> None:
    t = table()
    t.insert(group(1))
    assert t.update_priorities([10, 11, 999], [0.5, 2.0, 1.0]) == 2
    assert t.sample(4)[0].priority == 2.0  # type: ignore[index]  # max over its updates
    assert t.update_priorities([10], [3.0]) == 0  # sampled out: ignored
    t = Table(FifoSampler(), [], MinSize(1), priority_reduce="mean")
    t.insert(group(1))
    assert t.update_priorities([10, 11], [0.5, 2.0]) == 2
    assert t.items()[0].priority == 1.25


def meta(group_id: str, seq: int, version: int = 0) -> TrajMeta:
    return TrajMeta(
        seq, f"{group_id}-{seq}", group_id, "t", group_id, "a", version, 8, 0.0, False, 1.0, 0.0
    )


def test_groups_complete_only_when_full() -> None:
    asm = GroupAssembler()
    assert asm.add(meta("g", 1, version=4), 3, now=0) is None
    assert asm.add(meta("h", 2), 3, now=0) is None
    assert asm.add(meta("g", 3, version=2), 3, now=0) is None
    assert asm.delivered("g") == 2 and asm.n_trajs == 3
    done = asm.add(meta("g", 5, version=7), 3, now=0)
    assert done is not None
    item, metas = done
    assert item.seqs == [1, 3, 5] and item.key == 5 and [m.seq for m in metas] == [1, 3, 5]
    assert item.min_version == 2
    assert asm.add(meta("g", 6), 3, now=0) is None  # extra trajectory: joins no group
    assert len(asm) == 1 and asm.n_trajs == 1
    # a partial group without a lease and idle for long is abandoned
    assert asm.drop_abandoned(now=5, idle_s=10, has_lease=lambda g: False) == []
    dropped = asm.drop_abandoned(now=11, idle_s=10, has_lease=lambda g: False)
    assert [d.group_id for d in dropped] == ["h"] and len(asm) == 0


def test_symbols_bank_tasks_and_uniform_pick() -> None:
    symbols = SymbolsConfig(levels=[1, 3], tasks_per_level=5, n_choices=6, n_turns=2)
    env = EnvConfig(symbols=symbols, seed=7)
    bank = SymbolsBank(env)
    assert len(bank) == 10
    t = bank.by_id["symbols-L3-4"]
    assert (t.env, t.family, t.difficulty) == ("symbols", "L3", 3.0)
    assert t.payload["n_choices"] == 6 and t.payload["n_turns"] == 2
    assert t.payload["reasoning_tokens"] == symbols.reasoning_tokens and t.payload["level"] == 3
    seeds = {x.payload["seed"] for x in bank.tasks}
    assert len(seeds) == 10 and all(isinstance(s, int) and s >= 0 for s in seeds)
    # stable across instances (task ids mean the same episode everywhere), seeded picking
    again = SymbolsBank(env)
    assert [x.payload["seed"] for x in again.tasks] == [x.payload["seed"] for x in bank.tasks]
    picks = bank.pick(2000)
    assert [p.task.task_id for p in picks[:20]] == [p.task.task_id for p in again.pick(20)]
    counts = {tid: 0 for tid in bank.by_id}
    for p in picks:
        counts[p.task.task_id] += 1
        assert p.prob == pytest.approx(0.1)
    assert min(counts.values()) > 120 and max(counts.values()) < 280
    with pytest.raises(ConfigError):
        make_bank(EnvConfig(name="nope"))
