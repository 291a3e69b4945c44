"""Uniform and prioritized samplers, alone and inside the replay table (whole groups)."""

from __future__ import annotations

import math
from collections import Counter

import msgspec
import numpy as np
import pytest

from broker.replay import (
    CapacityRemover,
    MaxTimesSampledRemover,
    MinSize,
    PrioritizedSampler,
    StalenessRemover,
    Table,
    UniformSampler,
    build_table,
)
from shared.config import BrokerConfig, Config, ConfigError, ReplayConfig, load_config
from tests.broker_helpers import group


def table(sampler, capacity: int = 10_000, max_times: int = 1_000_000) -> Table:
    removers = [CapacityRemover(capacity), StalenessRemover(), MaxTimesSampledRemover(max_times)]
    return Table(sampler, removers, MinSize(1))


def test_importance_weights_match_a_hand_computed_three_item_example() -> None:
    s = PrioritizedSampler(alpha=1.0, beta0=0.5, beta_anneal_steps=10, seed=0)
    for key, p in ((1, 1.0), (2, 2.0), (3, 5.0)):
        s.insert(key, p)
    # P = (1/8, 2/8, 5/8), N = 3, beta = 0.5: w_i = (3 P_i)^-0.5 / max_j w_j
    # (3/8)^-.5 = 1.632993, (6/8)^-.5 = 1.154701, (15/8)^-.5 = 0.730297; max = 1.632993
    assert s.weights([1, 2, 3]) == pytest.approx([1.0, 0.707107, 0.447214], abs=1e-6)
    for _ in range(5):
        s.advance()
    assert s.beta == pytest.approx(0.75)  # 0.5 + (1 - 0.5) * 5 / 10
    # beta = 0.75: (3/8)^-.75 = 2.087798, (6/8)^-.75 = 1.241455, (15/8)^-.75 = 0.624410
    assert s.weights([3, 1]) == pytest.approx([0.299070, 1.0], abs=1e-6)
    for _ in range(20):
        s.advance()
    assert s.beta == 1.0  # annealed to 1 and stays there
    # alpha = 0.5 on the same priorities: leaves (1, 1.414214, 2.236068), total 4.650282
    s = PrioritizedSampler(alpha=0.5, beta0=1.0, seed=0)
    for key, p in ((1, 1.0), (2, 2.0), (3, 5.0)):
        s.insert(key, p)
    assert s.tree.total == pytest.approx(4.650282, abs=1e-6)
    assert s.weights([1, 2, 3]) == pytest.approx([1.0, 0.707107, 0.447214], abs=1e-6)


def test_prioritized_frequencies_follow_priority_alpha() -> None:
    s = PrioritizedSampler(alpha=0.5, seed=7)
    prios = {1: 1.0, 2: 4.0, 3: 9.0, 4: 0.0}
    for k, p in prios.items():
        s.insert(k, p)
    counts = Counter(k for _ in range(30_000) for k in s.sample(1))
    assert counts[4] == 0  # priority 0: never sampled
    # p^0.5 = 1, 2, 3 -> 1/6, 2/6, 3/6
    for k, share in ((1, 1 / 6), (2, 2 / 6), (3, 3 / 6)):
        assert counts[k] / 30_000 == pytest.approx(share, abs=0.012)
    assert sorted(s.sample(10)) == [1, 2, 3]  # distinct, and only the sampleable ones


def test_new_groups_get_the_max_priority_seen() -> None:
    t = table(PrioritizedSampler(seed=0))
    t.insert(group(1))
    assert t.items()[0].priority == 1.0  # nothing scored yet
    t.update_priorities([10, 11, 12, 13], [3.0, 1.0, 0.5, 0.5])  # max -> 3.0
    t.insert(group(2))
    assert [g.priority for g in t.items()] == [3.0, 3.0]
    t.update_priorities([20], [0.25])
    t.insert(group(3))
    assert [g.priority for g in t.items()] == [3.0, 0.25, 3.0]


def test_priority_updates_map_sample_ids_to_their_group() -> None:
    s = PrioritizedSampler(alpha=1.0, seed=0)
    t = Table(s, [], MinSize(1), priority_reduce="mean")
    for key in (1, 2, 3):
        t.insert(group(key))
    # sample ids of group 2 (20..23) and one of group 3; unknown ids are ignored
    assert t.update_priorities([20, 21, 22, 23, 30, 999], [1.0, 2.0, 3.0, 6.0, 0.0, 5.0]) == 5
    assert [g.priority for g in t.items()] == [1.0, 3.0, 0.0]
    assert s.tree.leaves()[: len(s)].tolist() == [1.0, 3.0, 0.0]
    for _ in range(50):  # group 3 has priority 0 now: never in a batch
        batch = t.sample(8)
        assert batch is not None and {g.key for g in batch} == {1, 2}


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_batches_never_split_a_group(kind: str) -> None:
    rng = np.random.default_rng(3)
    sampler = UniformSampler(seed=1) if kind == "uniform" else PrioritizedSampler(seed=1)
    t = table(sampler)
    sizes = {}
    for key in range(1, 41):
        sizes[key] = int(rng.integers(1, 9))
        t.insert(group(key, size=sizes[key]))
    t.update_priorities(list(range(10, 410)), rng.random(400).tolist())
    for _ in range(200):
        batch_size = int(rng.integers(1, 40))
        batch = t.sample(batch_size)
        assert batch is not None
        keys = [g.key for g in batch]
        assert len(keys) == len(set(keys))  # no group twice
        assert sum(g.n_trajs for g in batch) >= batch_size
        for g in batch:  # whole groups, exactly as inserted
            assert g.seqs == list(range(g.key * 10, g.key * 10 + sizes[g.key]))
        ws = t.weights(batch)
        assert len(ws) == sum(g.n_trajs for g in batch) and all(0 < w <= 1 for w in ws)
        # the weights of one group's trajectories are equal: one weight per group
        i = 0
        for g in batch:
            assert len(set(ws[i : i + g.n_trajs])) == 1
            i += g.n_trajs


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_staleness_capacity_and_reuse_removers_work_with_random_samplers(kind: str) -> None:
    sampler = UniformSampler(seed=2) if kind == "uniform" else PrioritizedSampler(seed=2)
    t = table(sampler, capacity=40, max_times=2)
    for key in range(1, 11):
        t.insert(group(key, version=key))  # versions 1..10, 40 trajectories
    assert len(t) == 10 and len(sampler) == 10
    removed = t.evict_stale(policy_version=10, max_staleness=4)  # floor 6: versions 1..5 go
    assert sorted(g.key for g, why in removed) == [1, 2, 3, 4, 5]
    assert {why for _, why in removed} == {"stale"}
    assert len(sampler) == 5
    if kind == "prioritized":
        assert sampler.tree.n_positive == 5  # evicted groups' leaves are 0 (slots freed)
    for _ in range(100):
        batch = t.sample(4)
        assert batch is not None or len(t) == 0
        if batch is None:
            break
        assert all(g.min_version >= 6 for g in batch)
    assert len(t) == 0 and len(sampler) == 0  # each sampled twice, then retired
    # capacity: the oldest go first, whatever the sampler
    for key in range(20, 31):
        t.insert(group(key, version=20))
    assert sorted(g.key for g in t.items()) == list(range(21, 31)) and len(sampler) == 10


def test_staleness_eviction_with_the_prioritized_sampler_frees_slots() -> None:
    s = PrioritizedSampler(alpha=1.0, seed=5)
    t = table(s)
    for key in range(1, 7):
        t.insert(group(key, version=key % 3))  # versions 1, 2, 0, 1, 2, 0
    t.update_priorities([30, 60], [50.0, 50.0])  # the stale ones are the likeliest
    removed = t.evict_stale(policy_version=3, max_staleness=2)  # floor 1: version 0 goes
    assert sorted(g.key for g, _ in removed) == [3, 6]
    assert s.tree.total == pytest.approx(4.0)  # four groups of priority 1 left
    seen = {g.key for _ in range(100) for g in t.sample(4) or []}
    assert seen == {1, 2, 4, 5}
    for key in (7, 8):  # freed leaves are reused
        t.insert(group(key, version=3))
    assert s.tree.capacity == 1024 and s._next == 6 and len(s) == 6


def test_restore_after_a_failed_hand_out_with_the_prioritized_sampler() -> None:
    s = PrioritizedSampler(seed=0)
    t = table(s, max_times=1)
    t.insert(group(1))
    t.insert(group(2))
    batch = t.sample(8)
    assert batch is not None and len(t) == 0 and s.tree.total == 0
    t.restore(batch)
    assert len(t) == 2 and s.tree.n_positive == 2 and t.rate_limiter.samples == 0


def test_uniform_sampler_is_uniform_and_distinct() -> None:
    s = UniformSampler(seed=11)
    for k in range(10):
        s.insert(k, 1.0)
    s.remove(3)
    s.remove(42)  # unknown: ignored
    counts = Counter(k for _ in range(20_000) for k in s.sample(3))
    assert 3 not in counts and len(counts) == 9
    assert all(abs(c / 60_000 - 1 / 9) < 0.01 for c in counts.values())
    assert sorted(s.sample(100)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_prioritized_sampler_grows_past_its_initial_capacity() -> None:
    s = PrioritizedSampler(alpha=1.0, seed=0, capacity=4)
    for k in range(10):
        s.insert(k, float(k))
    assert s.tree.capacity == 16 and len(s) == 10 and s.tree.total == pytest.approx(45.0)
    s.insert_many([100, 101], [2.0, 3.0])
    assert s.tree.total == pytest.approx(50.0)
    s.update_many([100, 101, 5, 77], [0.0, 0.0, 0.0, 9.0])  # 77: unknown, ignored
    assert s.tree.total == pytest.approx(40.0) and s.max_priority == 9.0
    assert set(s.sample(20)) == {1, 2, 3, 4, 6, 7, 8, 9}


def test_replay_config_round_trip_and_validation(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[broker]\nmin_size_to_sample = 16\n"
        "[broker.replay]\n"
        'sampler = "prioritized"\nalpha = 0.7\nbeta0 = 0.5\nbeta_anneal_steps = 200\n'
        'rate_limiter = "sample_to_insert"\nsamples_per_insert = 2.0\nerror_buffer = 40.0\n'
    )
    cfg = load_config(p)
    r = cfg.broker.replay
    assert (r.sampler, r.alpha, r.beta0, r.beta_anneal_steps) == ("prioritized", 0.7, 0.5, 200)
    assert (r.rate_limiter, r.samples_per_insert, r.error_buffer) == ("sample_to_insert", 2.0, 40.0)
    again = msgspec.convert(msgspec.to_builtins(cfg), Config)  # dict form (TOML) and back
    assert again == cfg and again.digest() == cfg.digest()
    t = table_of(cfg.broker)
    assert isinstance(t.sampler, PrioritizedSampler) and t.sampler.alpha == 0.7
    rl = t.rate_limiter.state(0)
    assert rl["kind"] == "sample_to_insert" and (rl["min_diff"], rl["max_diff"]) == (-8.0, 72.0)
    # defaults: FIFO + MinSize, as before [broker.replay] existed
    default = table_of(Config().broker)
    assert default.sampler.state() == {"kind": "fifo"}
    assert default.rate_limiter.state(0)["kind"] == "min_size"
    assert math.isfinite(ReplayConfig().error_buffer)


def table_of(b: BrokerConfig) -> Table:
    return build_table(
        b.replay,
        capacity=b.replay_capacity,
        max_times_sampled=b.max_times_sampled,
        min_size_to_sample=b.min_size_to_sample,
    )


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        # a choice outside its Literal: the key, the choices and the value
        ('sampler = "heap"', r"sampler must be one of fifo, prioritized, uniform, not 'heap'"),
        ('rate_limiter = "token_bucket"', r"rate_limiter must be one of .*'token_bucket'"),
        ('priority_reduce = "sum"', r"priority_reduce must be one of max, mean, not 'sum'"),
        ("samplr = 1", "samplr"),
        # the chosen sampler's and rate limiter's values, checked once, at decode
        ('sampler = "prioritized"\nbeta0 = 1.5', "beta0"),
        ('rate_limiter = "sample_to_insert"\nsamples_per_insert = 0.0', "samples_per_insert"),
        (
            'rate_limiter = "sample_to_insert"\nsamples_per_insert = 4.0\nerror_buffer = 3.0',
            r"error_buffer too small.* - at `\$\.broker\.replay`",
        ),
    ],
)
def test_bad_replay_settings_are_refused_at_decode(tmp_path, toml: str, match: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"[broker.replay]\n{toml}\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_settings_of_the_samplers_not_chosen_are_not_checked() -> None:
    fifo = msgspec.convert({"beta0": 7.0, "error_buffer": 0.0}, ReplayConfig)
    assert table_of(BrokerConfig(replay=fifo)).sampler.state() == {"kind": "fifo"}


def test_table_does_not_read_the_config() -> None:
    import ast
    import inspect

    from broker.replay import table

    tree = ast.parse(inspect.getsource(table))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(m.startswith("shared") for m in imported), imported
