"""Prioritized replay throughput: the broker's sum-tree sampler vs a naive numpy sampler.

For each table size (1e4, 1e5, 1e6 items; 1e7 too with --full) both samplers hold the same
priorities, and the same run measures, per operation:

- sample: one learner batch of 32 distinct groups drawn with P(i) ~ p_i^alpha. Ours also
  computes the batch's importance weights (beta) and advances the beta schedule; the naive
  baseline is `Generator.choice(n, 32, p=p / p.sum())` on the priority^alpha array, which
  is O(n) per call (normalise, cumulative sum) and draws with replacement — less work per
  call than ours, so the ratio is conservative;
- insert: one new group at its priority (ours: key map + O(log n) tree path; naive: write
  into a preallocated array, O(1));
- update: one PriorityUpdate for 32 groups (ours: one vectorised O(log n) pass; naive: a
  fancy-index assignment, O(1)).

Prints a table, then one JSON object as the last line: `ratio_vs_naive_1e6` (naive time per
sample / ours at 1e6 items), `sample_us` (items -> microseconds per sample op), and the insert
and update figures.

    python benchmarks/replay.py [--full] [--batch 32] [--alpha 0.6] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.replay.samplers import PrioritizedSampler  # noqa: E402


def per_op_us(fn: Callable[[], object], min_s: float = 0.4, max_ops: int = 5000) -> float:
    """Microseconds per call of `fn`: best of 3 timed rounds (each at least `min_s` / 3)."""
    fn()  # warm up
    best = float("inf")
    ops = 1
    for _ in range(3):
        t0 = time.perf_counter()
        n = 0
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s / 3 or n >= max_ops:
                break
        best = min(best, dt / n)
        ops = max(ops, n)
    return best * 1e6


class NaiveSampler:
    """A flat array of priority^alpha; sampling normalises it and calls Generator.choice."""

    def __init__(self, leaves: np.ndarray, reserve: int, seed: int) -> None:
        self.n = leaves.size
        self.p = np.zeros(leaves.size + reserve)
        self.p[: leaves.size] = leaves
        self.rng = np.random.default_rng(seed)

    def sample(self, k: int) -> np.ndarray:
        p = self.p[: self.n]
        return self.rng.choice(self.n, k, p=p / p.sum())

    def insert(self, leaf: float) -> None:
        self.p[self.n] = leaf
        self.n += 1

    def update(self, idx: np.ndarray, leaves: np.ndarray) -> None:
        self.p[idx] = leaves


def bench_size(n: int, batch: int, alpha: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    prios = rng.exponential(1.0, n) + 1e-3  # skewed, all sampleable
    reserve = 20_000  # room for the insert runs
    ours = PrioritizedSampler(alpha=alpha, beta0=0.4, beta_anneal_steps=10_000, seed=seed)
    ours._grow(n + reserve)  # capacity up front, as a long run reaches it once
    t0 = time.perf_counter()
    ours.insert_many(range(n), prios)
    build_s = time.perf_counter() - t0
    naive = NaiveSampler(prios**alpha, reserve, seed)

    def our_sample() -> None:
        keys = ours.sample(batch)
        ours.weights(keys)
        ours.advance()

    sample_us = per_op_us(our_sample)
    naive_sample_us = per_op_us(lambda: naive.sample(batch), min_s=0.6, max_ops=200)

    upd_keys = [rng.integers(0, n, batch).tolist() for _ in range(64)]
    upd_vals = [rng.exponential(1.0, batch).tolist() for _ in range(64)]
    i = iter(range(10**9))

    def our_update() -> None:
        j = next(i) % 64
        ours.update_many(upd_keys[j], upd_vals[j])

    update_us = per_op_us(our_update)
    naive_idx = [np.asarray(k) for k in upd_keys]
    naive_val = [np.asarray(v) ** alpha for v in upd_vals]

    def naive_update() -> None:
        j = next(i) % 64
        naive.update(naive_idx[j], naive_val[j])

    naive_update_us = per_op_us(naive_update)

    new_key = iter(range(n, n + reserve - 100))
    ins_prio = rng.exponential(1.0, 64).tolist()
    insert_us = per_op_us(lambda: ours.insert(next(new_key), ins_prio[0]), max_ops=reserve // 4)
    naive_insert_us = per_op_us(lambda: naive.insert(ins_prio[1]), max_ops=reserve // 4)

    # sanity: our sampler draws in proportion to p^alpha (top decile mass vs its share)
    drawn = np.concatenate([np.asarray(ours.sample(batch)) for _ in range(200)])
    drawn = drawn[drawn < n]
    top = np.argsort(prios)[-n // 10 :]
    share = float((prios[top] ** alpha).sum() / (prios[:n] ** alpha).sum())
    got = float(np.isin(drawn, top).mean())
    return {
        "build_s": build_s,
        "sample_us": sample_us,
        "naive_sample_us": naive_sample_us,
        "update_us": update_us,
        "naive_update_us": naive_update_us,
        "insert_us": insert_us,
        "naive_insert_us": naive_insert_us,
        "top_decile_share": share,
        "top_decile_drawn": got,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also 1e7 items (~2 GB, minutes)")
    ap.add_argument("--batch", type=int, default=32, help="groups per sample")
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [10**4, 10**5, 10**6] + ([10**7] if args.full else [])

    results: dict[int, dict[str, float]] = {}
    hdr = (
        f"{'items':>10} | {'sample':>9} {'naive':>10} {'ratio':>7} | "
        f"{'update':>8} {'naive':>7} | {'insert':>7} {'naive':>6} | {'build':>6} | p-check"
    )
    print(f"prioritized replay, batch of {args.batch} groups, alpha {args.alpha}; µs per op")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        r = results[n] = bench_size(n, args.batch, args.alpha, args.seed)
        gc.collect()
        print(
            f"{n:>10.0e} | {r['sample_us']:>9.1f} {r['naive_sample_us']:>10.1f} "
            f"{r['naive_sample_us'] / r['sample_us']:>6.1f}x | "
            f"{r['update_us']:>8.1f} {r['naive_update_us']:>7.1f} | "
            f"{r['insert_us']:>7.1f} {r['naive_insert_us']:>6.2f} | {r['build_s']:>5.2f}s | "
            f"{r['top_decile_drawn']:.3f}~{r['top_decile_share']:.3f}",
            flush=True,
        )
    print(
        "sample: one batch of distinct groups + importance weights; update: one PriorityUpdate"
        f" of {args.batch} groups; insert: one group; p-check: share of draws in the top"
        " decile of priorities vs its probability mass"
    )

    def col(name: str) -> dict[str, float]:
        return {str(n): round(results[n][name], 2) for n in sizes}

    ratios = {
        str(n): round(results[n]["naive_sample_us"] / results[n]["sample_us"], 1) for n in sizes
    }
    small, big = sizes[0], sizes[-1]
    out = {
        "benchmark": "replay",
        "batch_groups": args.batch,
        "alpha": args.alpha,
        "ratio_vs_naive_1e6": ratios[str(10**6)],
        "sample_us": col("sample_us"),
        "naive_sample_us": col("naive_sample_us"),
        "ratio_vs_naive": ratios,
        "sample_growth": round(results[big]["sample_us"] / results[small]["sample_us"], 2),
        "insert_us": col("insert_us"),
        "naive_insert_us": col("naive_insert_us"),
        "update_us": col("update_us"),
        "naive_update_us": col("naive_update_us"),
        "build_s": {str(n): round(results[n]["build_s"], 3) for n in sizes},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
