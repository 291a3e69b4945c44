"""The sum tree behind prioritized replay: property tests (hypothesis) and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.replay.sumtree import SumTree

priority = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6))
updates = st.lists(
    st.tuples(st.integers(min_value=0, max_value=99), priority), min_size=1, max_size=200
)


def consistent(t: SumTree) -> bool:
    """Every internal node is exactly the sum (and min) of its children."""
    c = t.capacity
    s, m = t._sv, t._mv
    return bool(
        np.array_equal(s[1:c], s[2 : 2 * c : 2] + s[3 : 2 * c : 2])
        and np.array_equal(m[1:c], np.minimum(m[2 : 2 * c : 2], m[3 : 2 * c : 2]))
    )


@settings(max_examples=60, deadline=None)
@given(updates, st.booleans())
def test_total_min_and_count_follow_random_updates(ops: list, batched: bool) -> None:
    t = SumTree(100)  # padded to 128 leaves
    assert t.capacity == 128
    ref = np.zeros(100)
    if batched:  # in a few batches, with repeated indices (the last value wins)
        for chunk in (ops[i : i + 37] for i in range(0, len(ops), 37)):
            idx, vals = zip(*chunk, strict=True)
            t.set_many(idx, vals)
            for i, v in chunk:
                ref[i] = v
    else:
        for i, v in ops:
            t[i] = v
            ref[i] = v
    assert t.total == pytest.approx(ref.sum(), rel=1e-12, abs=1e-12)
    assert t.n_positive == int((ref > 0).sum())
    positive = ref[ref > 0]
    assert t.min == (positive.min() if positive.size else math.inf)
    assert np.array_equal(t.leaves()[:100], ref)
    assert consistent(t)


@settings(max_examples=40, deadline=None)
@given(st.lists(priority, min_size=1, max_size=64), st.integers(0, 2**32 - 1))
def test_zero_priority_items_are_never_sampled(prios: list[float], seed: int) -> None:
    t = SumTree(len(prios))
    t.set_many(range(len(prios)), prios)
    rng = np.random.default_rng(seed)
    if t.total == 0:
        with pytest.raises(ValueError):
            t.sample(1, rng)
        return
    drawn = t.sample(2000, rng)
    assert np.all(np.asarray(prios)[drawn] > 0)


@settings(max_examples=60, deadline=None)
@given(updates, st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=50))
def test_update_then_find_matches_the_prefix_sums(ops: list, fractions: list[float]) -> None:
    t = SumTree(100)
    ref = np.zeros(t.capacity)
    for i, v in ops:
        t[i] = v
        ref[i] = v
    if t.total == 0:
        return
    u = np.asarray(fractions) * t.total
    got = t.find(u)
    # the leaf whose interval [prefix, prefix + value) holds u, up to float rounding
    cum = np.cumsum(ref)
    tol = 1e-9 * t.total
    assert np.all(cum[got] - ref[got] <= u + tol) and np.all(u < cum[got] + tol)
    exact = np.searchsorted(cum, u, side="right")
    assert np.all((got == exact) | (np.abs(u - cum[np.minimum(got, exact)]) <= tol))


def test_sampling_frequency_is_proportional_to_priority() -> None:
    prios = np.array([1.0, 2.0, 0.0, 3.0, 10.0, 0.5, 0.0, 4.0, 7.5, 1.0])
    t = SumTree(len(prios))
    for i, p in enumerate(prios):
        t[i] = p
    rng = np.random.default_rng(1234)
    n = 200_000
    counts = np.bincount(t.sample(n, rng), minlength=t.capacity)[: len(prios)]
    assert counts[prios == 0].sum() == 0
    expected = n * prios / prios.sum()
    live = prios > 0
    chi2 = float((((counts - expected) ** 2)[live] / expected[live]).sum())
    # 7 degrees of freedom: P(chi2 > 24.3) ~ 0.001
    assert chi2 < 24.3, (chi2, counts, expected)


def test_grow_keeps_values_and_bulk_build_is_consistent() -> None:
    rng = np.random.default_rng(0)
    vals = rng.random(3000) * (rng.random(3000) > 0.3)
    t = SumTree(8)
    t.set_many(range(5), vals[:5])
    t.grow(3000)
    assert t.capacity == 4096 and t.total == pytest.approx(vals[:5].sum())
    t.set_many(range(3000), vals)  # most of the tree: rebuilt level by level
    assert consistent(t) and t.total == pytest.approx(vals.sum())
    assert t.n_positive == int((vals > 0).sum())
    t.set_many([7, 9], [0.0, 5.0])  # a small batch after: updated along its paths
    vals[7], vals[9] = 0.0, 5.0
    assert consistent(t) and t.total == pytest.approx(vals.sum())


def test_bad_values_are_refused() -> None:
    t = SumTree(4)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            t[0] = bad
        with pytest.raises(ValueError):
            t.set_many([0], [bad])
    with pytest.raises(IndexError):
        t[4] = 1.0
    with pytest.raises(IndexError):
        t.set_many([4], [1.0])
    assert t.total == 0 and t.min == math.inf and t.n_positive == 0


@settings(max_examples=30, deadline=None)
@given(updates, st.integers(min_value=0, max_value=99), st.integers(0, 2**32 - 1))
def test_sampling_follows_the_latest_update(ops: list, hot: int, seed: int) -> None:
    t = SumTree(100)
    for i, v in ops:
        t[i] = v
    rng = np.random.default_rng(seed)
    t[hot] = 1e9 * (t.total + 1.0)  # one leaf now holds all but ~1e-9 of the mass
    assert np.all(t.sample(64, rng) == hot)  # vectorised path
    assert np.all(t.sample(8, rng) == hot)  # scalar path
    t[hot] = 0.0  # and then none: never drawn again
    if t.total > 0:
        assert not np.any(t.sample(64, rng) == hot) and not np.any(t.sample(8, rng) == hot)


def test_scalar_and_vectorised_descents_agree() -> None:
    rng = np.random.default_rng(9)
    t = SumTree(5000)
    t.set_many(range(5000), rng.random(5000) * (rng.random(5000) > 0.5))
    u = rng.random(500) * t.total
    assert t.find(u).tolist() == t._find_scalar(u.tolist())
    assert len(t.find(u[:10])) == 10  # the small-batch (scalar) path behind the same API
