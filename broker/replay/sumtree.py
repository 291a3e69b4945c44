"""An array-backed sum tree (with a min tree beside it) for prioritized sampling.

`capacity` leaves (a power of two) hold non-negative values; node `i` of the implicit binary
tree holds the sum (and the minimum positive value) of its two children `2i` and `2i + 1`, the
root is node 1 and leaf `j` is node `capacity + j`. Every parent is recomputed from its children
(never patched by a delta), so the tree stays exactly consistent however many updates it sees.

- one update walks its leaf-to-root path: O(log n), on `array.array` storage, which Python
  indexes several times faster than a numpy array;
- batch updates and sampling are vectorised with numpy over the same memory: a batch of k
  updates or k draws costs O(log n) numpy operations on arrays of length k, not k Python loops;
- `total` and `min` (the smallest positive leaf, for importance-weight normalisation) are O(1).

Zero leaves are never sampled. The tree grows by doubling when asked (`grow`).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import numpy as np

INF = math.inf


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class SumTree:
    def __init__(self, capacity: int = 1024) -> None:
        self._alloc(_pow2(max(1, capacity)))
        self.n_positive = 0  # leaves holding a value > 0: how many items can be sampled

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.depth = capacity.bit_length() - 1  # levels below the root
        self._s = array("d", bytes(16 * capacity))  # sums, node 0 unused
        self._m = array("d", [INF]) * (2 * capacity)  # minimum positive leaf below a node
        # numpy views of the same memory, for the vectorised paths
        self._sv = np.frombuffer(self._s, dtype=np.float64)
        self._mv = np.frombuffer(self._m, dtype=np.float64)

    # ------------------------------------------------------------ reads

    @property
    def total(self) -> float:
        return self._s[1]

    @property
    def min(self) -> float:
        """The smallest positive leaf (`inf` when no leaf is positive)."""
        return self._m[1]

    def __len__(self) -> int:
        return self.capacity

    def __getitem__(self, i: int) -> float:
        return self._s[self.capacity + i]

    def get_many(self, idx: np.ndarray | Sequence[int]) -> np.ndarray:
        return self._sv[np.asarray(idx, dtype=np.int64) + self.capacity]

    def leaves(self) -> np.ndarray:
        """A copy of every leaf value."""
        return self._sv[self.capacity :].copy()

    # ------------------------------------------------------------ writes

    def __setitem__(self, i: int, value: float) -> None:
        self.set(i, value)

    def set(self, i: int, value: float) -> None:
        """Set leaf `i`; O(log n)."""
        v = float(value)
        if not v >= 0.0 or v == INF:  # also rejects NaN
            raise ValueError(f"sum-tree values must be finite and >= 0, got {value!r}")
        if not 0 <= i < self.capacity:
            raise IndexError(f"leaf {i} outside capacity {self.capacity}")
        s, m = self._s, self._m
        node = i + self.capacity
        old = s[node]
        self.n_positive += (v > 0.0) - (old > 0.0)
        s[node] = v
        m[node] = v if v > 0.0 else INF
        node >>= 1
        # The min tree usually stops changing a few levels up; the sums change all the way.
        min_done = False
        while node:
            left = node << 1
            s[node] = s[left] + s[left + 1]
            if not min_done:
                a, b = m[left], m[left + 1]
                new = a if a < b else b
                if m[node] == new:
                    min_done = True
                else:
                    m[node] = new
            node >>= 1

    def set_many(
        self, idx: np.ndarray | Sequence[int], values: np.ndarray | Sequence[float]
    ) -> None:
        """Set many leaves at once (the last value wins for a repeated index); vectorised."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        vals = np.asarray(values, dtype=np.float64).ravel()
        if idx.shape != vals.shape:
            raise ValueError("idx and values differ in length")
        if idx.size == 0:
            return
        if not (vals.min() >= 0.0 and math.isfinite(vals.max())):
            raise ValueError("sum-tree values must be finite and >= 0")
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise IndexError(f"leaf index outside capacity {self.capacity}")
        if idx.size > 1 and len(set(idx.tolist())) < idx.size:  # keep each index's last value
            idx, first = np.unique(idx[::-1], return_index=True)
            vals = vals[::-1][first]
        S, M = self._sv, self._mv
        nodes = idx + self.capacity
        old = S[nodes]
        self.n_positive += int(np.count_nonzero(vals > 0.0)) - int(np.count_nonzero(old > 0.0))
        S[nodes] = vals
        M[nodes] = np.where(vals > 0.0, vals, INF)
        self._propagate(nodes)

    def _propagate(self, nodes: np.ndarray) -> None:
        """Recompute every ancestor of the leaf nodes `nodes`, level by level.

        Levels much wider than the batch are updated along the paths only (a repeated ancestor
        is just recomputed twice, harmlessly); the narrow levels near the root are recomputed
        whole, which is cheaper there than gathering along k paths.
        """
        S, M = self._sv, self._mv
        sparse = 0  # levels (from the bottom) whose width exceeds 4 * batch
        while (self.capacity >> (sparse + 1)) > 4 * nodes.size:
            sparse += 1
        if sparse:
            up = nodes[None, :] >> np.arange(1, sparse + 1, dtype=np.int64)[:, None]
            left = up << 1
            right = left | 1
            for a, lt, rt in zip(up, left, right, strict=True):
                S.put(a, S.take(lt) + S.take(rt))
                M.put(a, np.minimum(M.take(lt), M.take(rt)))
        self._rebuild_from(self.capacity >> (sparse + 1))

    def _rebuild_from(self, width: int) -> None:
        """Recompute the levels whose nodes are [width, 2 * width) and every level above."""
        S, M = self._sv, self._mv
        while width >= 1:
            lo, hi = width, 2 * width
            S[lo:hi] = S[2 * lo : 2 * hi : 2] + S[2 * lo + 1 : 2 * hi : 2]
            M[lo:hi] = np.minimum(M[2 * lo : 2 * hi : 2], M[2 * lo + 1 : 2 * hi : 2])
            width >>= 1

    def grow(self, capacity: int) -> None:
        """Make room for at least `capacity` leaves (a power of two); keeps every value."""
        capacity = _pow2(capacity)
        if capacity <= self.capacity:
            return
        leaves = self._sv[self.capacity :].copy()
        self._alloc(capacity)
        self._sv[capacity : capacity + leaves.size] = leaves
        self._mv[capacity : capacity + leaves.size] = np.where(leaves > 0.0, leaves, INF)
        self._rebuild_from(capacity >> 1)

    # ------------------------------------------------------------ sampling

    # Up to this many draws a Python descent over the array.array beats numpy's per-call cost
    # (measured: break-even near 40 draws at 1e4..1e6 leaves); above it, numpy.
    SCALAR_DRAWS = 40

    def find(self, u: np.ndarray | Sequence[float]) -> np.ndarray:
        """Leaf index of each prefix sum in `u` (values in [0, total)): the leaf `j` with
        sum(leaves[:j]) <= u < sum(leaves[:j + 1]). Vectorised descent, one step per level."""
        u = np.array(u, dtype=np.float64)  # a copy: consumed below
        if u.size <= self.SCALAR_DRAWS:
            return np.asarray(self._find_scalar(u.tolist()), dtype=np.int64).reshape(u.shape)
        S = self._sv
        node = np.ones(u.shape, dtype=np.int64)
        for _ in range(self.depth):
            node <<= 1  # left child
            lv = S.take(node)
            right = u >= lv
            np.subtract(u, lv, out=u, where=right)
            node += right
        return node - self.capacity

    def _find_scalar(self, us: list[float]) -> list[int]:
        s, depth, cap = self._s, self.depth, self.capacity
        out = []
        for u in us:
            node = 1
            for _ in range(depth):
                node <<= 1
                lv = s[node]
                if u >= lv:
                    u -= lv
                    node += 1
            out.append(node - cap)
        return out

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """`k` leaf indices drawn independently, each with probability leaf / total.

        Never returns a zero leaf: a float rounding that steers a draw into one (possible only
        at a boundary) is redrawn.
        """
        return np.asarray(self.sample_list(k, rng), dtype=np.int64)

    def sample_list(self, k: int, rng: np.random.Generator) -> list[int]:
        """`sample` as a list of ints."""
        total = self.total
        if k <= 0:
            return []
        if not total > 0.0:
            raise ValueError("cannot sample from a sum tree whose total is 0")
        u = rng.random(k) * total
        if k <= self.SCALAR_DRAWS:
            out = self._find_scalar(u.tolist())
            s, cap = self._s, self.capacity
            for i, j in enumerate(out):
                while s[cap + j] <= 0.0:
                    j = self._find_scalar([rng.random() * total])[0]
                out[i] = j
            return out
        arr = self.find(u)
        while True:
            bad = np.flatnonzero(self._sv.take(arr + self.capacity) <= 0.0)
            if bad.size == 0:
                return arr.tolist()
            arr[bad] = self.find(rng.random(bad.size) * total)
